// hla tests — one description of a softmax-attention test case drives the reference, CPU, CUDA and
// bench paths: shapes, options, input ranges, and the inputs it generates.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "hla/hla.hpp"

namespace hla::test::sm {

struct SoftmaxCase {
    int64_t B = 1, T = 64, HQ = 4, HKV = 2, D = 32;
    DType dtype = DType::F32;         // q, k, v, g, gate, d_o
    DType out_dtype = DType::F32;     // o and the gradients
    std::vector<int64_t> cu_seqlens;  // non-empty: varlen packing (B must be 1, back() == T)
    SoftmaxConfig cfg;
    bool forget_gate = false, output_gate = false;
    // Input ranges: q, k, v ~ N(0, 1) with q multiplied by q_scale (large values stress the softmax);
    // log forget gates uniform in [g_min, g_max].
    double q_scale = 1.0;
    double g_min = -0.5, g_max = 0.0;
};

struct SoftmaxInputs {
    Tensor q, k, v, g, gate, cu_seqlens, d_o;
    SoftmaxForwardArgs args(const Tensor& o, const Tensor* lse = nullptr) const;
    SoftmaxInputs to(Device device) const;  // copies every defined tensor
};

SoftmaxInputs make_inputs(const SoftmaxCase& c, uint64_t seed);

// A NaN-filled tensor (an unwritten element then fails every comparison).
Tensor poisoned(const std::vector<int64_t>& shape, DType dtype, Device device = Device::CPU);
// Random normal values of a dtype (rounded to it).
Tensor randn(const std::vector<int64_t>& shape, DType dtype, uint64_t seed, double scale = 1.0);

// Gradients of a case, NaN-filled, on a device.
struct GradTensors {
    Tensor dq, dk, dv, dg, dgate;
    SoftmaxGrads views() const;
};
GradTensors poisoned_grads(const SoftmaxCase& c, DType dtype, Device device = Device::CPU);

struct ErrorStats {
    double rel_rms = 0, rms_abs = 0, max_abs = 0;
    bool finite = true;
    std::string str() const;
};
// Error of `out` against `ref` (any dtypes, any devices; −inf matching −inf counts as equal, for lse).
ErrorStats compare(const Tensor& out, const Tensor& ref);

// The tolerance policy (DESIGN.md): passes when out is finite and
//   rel_rms(out, ref64) <= 2 * rel_rms(ref_in_p, ref64) + rel_floor,
// or when the absolute RMS error is at most abs_floor: a gradient that vanishes exactly (dq at T = 1,
// window 1) has a reference of rounding noise around zero, against which relative error means nothing.
void expect_close(const std::string& what, const Tensor& out, const Tensor& ref64, const Tensor& ref_in_p,
                  double rel_floor = 1e-5, double abs_floor = 0);
// A fixed relative-RMS bound (fp32 paths, or two paths that should agree to rounding).
void expect_close_abs(const std::string& what, const Tensor& out, const Tensor& ref, double rel_tol);

}  // namespace hla::test::sm
