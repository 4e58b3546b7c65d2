// hla tests — one description of a linear-family test case drives the reference, CPU, CUDA and bench
// paths: shapes, options and input ranges, and the inputs it generates.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "hla/hla.hpp"

namespace hla::test {

struct LinearCase {
    std::string name = "case";
    LinearConfig cfg;
    int64_t B = 1, T = 64, H = 2, HV = 2, K = 16, V = 16;
    DType dtype = DType::F32;            // q, k, v, g, beta (and o) dtype
    DType gate_dtype = DType::F64;       // g's dtype when it is not `dtype` (F64: `dtype`)
    std::vector<int64_t> cu_seqlens;     // non-empty: varlen packing (B must be 1, back() == T)
    bool initial_state = false;          // generate an initial state
    double initial_state_scale = 1.0;    // its magnitude (large-state stress: e.g. 100)
    // Input ranges (DESIGN.md: each op's test states them).
    double gate_min = -3.0, gate_max = -0.01;  // log decay, uniform (with a gate activation the raw gate
                                               // input is N(0, 1) and A_log, dt_bias are uniform in [-1, 1])
    double beta_min = 0.0, beta_max = 1.0;     // β, uniform (logit when a beta activation is set)
    bool normalize_k = true;                   // k rows to unit norm (keeps the delta rule contractive) unless qk_l2norm
};

// Inputs owned by the test; views() wires them into the API's argument struct.
struct LinearInputs {
    Tensor q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens;
    int64_t N = 0;  // number of sequences
    LinearForwardArgs args(const Tensor& o, const Tensor* final_state = nullptr) const;
    LinearInputs move_to(Device device) const;  // copies every defined tensor
};

LinearInputs make_inputs(const LinearCase& c, uint64_t seed);

// A NaN-filled output of the case's output shape [B, T, HV, V] (dtype of the case) / state [N, HV, K, V] f32.
Tensor poisoned_output(const LinearCase& c, Device device = Device::CPU);
Tensor poisoned_state(const LinearCase& c, int64_t N, Device device = Device::CPU);

// Error of `out` against `ref` (both any dtype, any device): relative RMS and max abs, NaN/Inf aware.
struct ErrorStats {
    double rel_rms = 0, max_abs = 0;
    bool finite = true;
    std::string str() const;
};
ErrorStats compare(const Tensor& out, const Tensor& ref);

// The tolerance policy: passes when out is finite and
//   rel_rms(out, ref64) <= 2 * rel_rms(ref_in_p, ref64) + rel_floor.
// Emits a gtest failure naming `what` and both errors otherwise.
void expect_close(const std::string& what, const Tensor& out, const Tensor& ref64, const Tensor& ref_in_p,
                  double rel_floor = 1e-5);
// Fixed-bound check for fp32 paths where no precision reference is needed.
void expect_close_abs(const std::string& what, const Tensor& out, const Tensor& ref64, double rel_tol);

// A tensor of N(0, scale²) entries (d_o, d_final_state, ...), reproducible from the seed.
Tensor random_normal(const std::vector<int64_t>& shape, DType dtype, uint64_t seed, double scale = 1.0);

// Every gradient the case has (dg only with a decay, dbeta only for delta, dA_log/ddt_bias only with a
// gate activation, dinitial_state only with an initial state), NaN-filled. dq/dk/dv in the case dtype.
struct LinearGradTensors {
    Tensor dq, dk, dv, dg, dbeta, dA_log, ddt_bias, dinitial_state;
    LinearGrads views() const;
    LinearGradTensors move_to(Device device) const;
};
LinearGradTensors poisoned_grads(const LinearCase& c, int64_t N, Device device = Device::CPU);

// Every gradient of `got` (any device) against `ref64` by expect_close_abs at rel_tol; the two must
// define the same gradients.
void expect_grads_close(const std::string& what, const LinearGradTensors& got, const LinearGradTensors& ref64,
                        double rel_tol);

// The reference run in precision P (fp32 arithmetic, state and outputs rounded to P every token):
// the yardstick of the tolerance policy. args.o (and args.final_state) receive the result.
void reference_forward_in_precision(const LinearConfig& cfg, const LinearForwardArgs& args, DType dtype);

}  // namespace hla::test
