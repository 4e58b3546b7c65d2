// hla — the linear family's validated problem: what every backend (reference, CPU, CUDA) receives.
//
// dispatch.cpp checks every argument once (shapes, dtypes, devices, strides, cu_seqlens) and builds a
// Problem; backends trust it and never re-check. A Problem is a list of sequences, each a run of
// tokens inside one batch row, so padded batches and cu_seqlens-packed batches look the same.
#pragma once

#include <cstdint>
#include <vector>

#include "hla/linear.hpp"

namespace hla::linear {

struct Sequence {
    int64_t batch;  // batch row of its tokens
    int64_t start;  // first token inside that row
    int64_t len;    // number of tokens (0 allowed)
};

struct Problem {
    const char* op = "linear_forward";  // the public name, used in error messages
    LinearConfig cfg;
    int64_t B = 0, T = 0, H = 0, HV = 0, K = 0, V = 0;
    int64_t G = 1;        // HV / H: value head hv reads q/k head hv / G
    double scale = 1.0;   // resolved (K^-0.5 unless given)
    std::vector<Sequence> seqs;  // N of them
    LinearForwardArgs args;      // views as given (validated)

    int64_t N() const { return int64_t(seqs.size()); }
    bool delta() const { return cfg.update == Update::Delta; }
    bool has_gate_params() const { return cfg.gate_activation != GateActivation::None; }
};

// Validates a forward call. Throws hla::Error naming the argument on any problem.
Problem make_forward_problem(const char* op, const LinearConfig& cfg, const LinearForwardArgs& args);

// Validates the extra arguments of a backward call against a forward problem.
void check_backward_args(const Problem& p, const TensorView& d_o, const TensorView& d_final_state,
                         const LinearGrads& grads);

// Decode: N sequences of T tokens (usually 1) against state slots. Validated likewise.
struct DecodeProblem {
    const char* op = "linear_decode";
    LinearConfig cfg;
    int64_t N = 0, T = 0, H = 0, HV = 0, K = 0, V = 0, G = 1, slots = 0;
    double scale = 1.0;
    LinearDecodeArgs args;
};
DecodeProblem make_decode_problem(const char* op, const LinearConfig& cfg, const LinearDecodeArgs& args);

// Element offset of (batch b, token t, head h, channel 0) in a [B, T, heads, ...] view, and of head h
// in a [heads] or [heads, K] parameter view.
inline int64_t token_offset(const TensorView& x, int64_t b, int64_t t, int64_t h) {
    return b * x.stride[0] + t * x.stride[1] + h * x.stride[2];
}

// Backends. Each is defined in its own file; CUDA ones throw when hla is built without CUDA.
namespace reference {
void forward(const Problem& p);
void backward(const Problem& p, const TensorView& d_o, const TensorView& d_final_state, const LinearGrads& grads);
void decode(const DecodeProblem& p);
// The same recurrence evaluated in fp32 arithmetic with the state and outputs rounded to `dtype`
// after every token: "the reference run in precision P" of the tolerance policy (DESIGN.md).
void forward_in_precision(const Problem& p, DType dtype);
}  // namespace reference

namespace cpu {
void forward(const Problem& p);
void backward(const Problem& p, const TensorView& d_o, const TensorView& d_final_state, const LinearGrads& grads);
void decode(const DecodeProblem& p);
}  // namespace cpu

namespace cuda {
void forward(const Problem& p);
void backward(const Problem& p, const TensorView& d_o, const TensorView& d_final_state, const LinearGrads& grads);
void decode(const DecodeProblem& p);
}  // namespace cuda

}  // namespace hla::linear
