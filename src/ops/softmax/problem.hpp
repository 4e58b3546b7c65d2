// hla — the softmax family's validated problems: what every backend (reference, CPU, CUDA) receives.
//
// dispatch.cpp checks every argument once and builds a Problem; backends trust it and never re-check.
// A forward Problem is a list of sequences, each a run of tokens inside one batch row, so padded and
// cu_seqlens-packed batches look the same. A DecodeProblem is N query blocks against a KV cache.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "hla/softmax.hpp"

namespace hla::softmax {

struct Sequence {
    int64_t batch;  // batch row of its tokens
    int64_t start;  // first token inside that row
    int64_t len;    // number of tokens (0 allowed)
};

struct Problem {
    const char* op = "softmax_attention_forward";
    SoftmaxConfig cfg;
    int64_t B = 0, T = 0, HQ = 0, HKV = 0, D = 0;
    int64_t G = 1;       // HQ / HKV: query head h reads kv head h / G
    double scale = 1.0;  // resolved (D^-0.5 unless given)
    int64_t window = 0;  // 0 = unlimited
    int64_t max_len = 0; // longest sequence
    std::vector<Sequence> seqs;
    SoftmaxForwardArgs args;

    int64_t N() const { return int64_t(seqs.size()); }
    bool has_g() const { return args.g.defined(); }
    bool has_gate() const { return args.gate.defined(); }
};

Problem make_forward_problem(const char* op, const SoftmaxConfig& cfg, const SoftmaxForwardArgs& args);
// Backward: args.o and args.lse required; checks d_o and the gradients.
void check_backward_args(const Problem& p, const TensorView& d_o, const SoftmaxGrads& grads);

struct DecodeProblem {
    const char* op = "softmax_attention_kvcache";
    SoftmaxConfig cfg;
    int64_t N = 0, TQ = 0, HQ = 0, HKV = 0, D = 0, G = 1;
    int64_t slots = 0;      // S (contiguous) or P (pages)
    int64_t capacity = 0;   // tokens a sequence can hold: TC, or MB · PS when paged
    int64_t page_size = 0;  // PS when paged, 0 otherwise
    int64_t max_blocks = 0; // MB when paged
    bool append = false;    // k, v given
    double scale = 1.0;
    int64_t window = 0;
    SoftmaxKVCacheArgs args;
    bool paged() const { return page_size > 0; }
};
DecodeProblem make_decode_problem(const char* op, const SoftmaxConfig& cfg, const SoftmaxKVCacheArgs& args);

// Element offset of (batch b, token t, head h, channel 0) in a [B, T, heads, ...] view.
inline int64_t token_offset(const TensorView& x, int64_t b, int64_t t, int64_t h) {
    return b * x.stride[0] + t * x.stride[1] + h * x.stride[2];
}

// The visible key range [lo, hi) of a query at position `pos` among `keys` keys.
inline void visible_keys(bool causal, int64_t window, int64_t pos, int64_t keys, int64_t& lo, int64_t& hi) {
    hi = causal ? std::min(pos + 1, keys) : keys;
    lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
    if (hi < lo) hi = lo;
}

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Backends, each in its own file; CUDA ones throw when hla is built without CUDA.
namespace reference {
void forward(const Problem& p);
void backward(const Problem& p, const TensorView& d_o, const SoftmaxGrads& grads);
void decode(const DecodeProblem& p);
// "The reference run in precision P" of the tolerance policy (DESIGN.md): the same math with inputs as
// given, fp32 accumulation, and the probabilities, the output and (backward) dS and the gradients
// rounded to `dtype` where a tensor-core kernel rounds them.
void forward_in_precision(const Problem& p, DType dtype);
void backward_in_precision(const Problem& p, const TensorView& d_o, const SoftmaxGrads& grads, DType dtype);
}  // namespace reference

namespace cpu {
void forward(const Problem& p);
void backward(const Problem& p, const TensorView& d_o, const SoftmaxGrads& grads);
void decode(const DecodeProblem& p);
}  // namespace cpu

namespace cuda {
void forward(const Problem& p);
void backward(const Problem& p, const TensorView& d_o, const SoftmaxGrads& grads);
void decode(const DecodeProblem& p);
}  // namespace cuda

}  // namespace hla::softmax
