// hla bench — seeded inputs for one linear-family op, and the error measure.
//
// Every element is a pure function of (seed, tensor, its coordinates in the FULL problem), so the
// problem of the first h heads is exactly a slice of the full one: the error measured on 2 heads is
// the error of the first 2 heads of the run that was timed.
//
// Input ranges (realistic for the models, and keeping the delta rule contractive):
//   q, v ~ N(0, 1);  k ~ N(0, 1) then each token's row scaled to unit L2 norm;
//   g: fixed  γ_h from lightning_attn_log_decay (MiniMax, layer 0 of 2);
//      scalar / vector  uniform in [−1, −0.001] per token (and key channel);
//   β uniform in [0, 1].
#pragma once

#include <cstdint>

#include "hla/hla.hpp"

namespace hla::cli {

// The shape of one problem. H heads of the full problem's H_full (HV / H value heads per key head).
struct BenchShape {
    int64_t B = 1, T = 1, H = 1, HV = 1, K = 1, V = 1;
    int64_t H_full = 1;  // heads of the problem this one is the first-H-heads slice of
};

struct OpInputs {
    Tensor q, k, v, g, beta;  // g / beta undefined when the op takes none
    LinearForwardArgs args() const;
    LinearDecodeArgs decode_args() const;
    OpInputs to(Device device) const;  // copies every defined tensor
    OpInputs to(DType dtype) const;    // converts q, k, v and per-token g, beta (CPU); fixed g stays f32
};

// f32 inputs of `shape` for the op `cfg`.
OpInputs make_inputs(const LinearConfig& cfg, const BenchShape& shape, uint64_t seed);

// Softmax attention: N(0, 1) q [B, T, H, K] and k, v [B, T, HV, K] (g, beta undefined).
OpInputs make_attention_inputs(const BenchShape& shape, uint64_t seed);

// N(0, 1) tensors: the output gradient [B, T, HV, V] and a recurrent state [B, HV, K, V] (scaled).
Tensor make_output_grad(const BenchShape& shape, uint64_t seed);
Tensor make_state(const BenchShape& shape, double scale, uint64_t seed);

// A [.., 1, ..] view of token t of a [rows, T, heads, inner] tensor (works for device memory too).
TensorView token_slice(const TensorView& x, int64_t t);

// Relative RMS and max-abs error of `out` against `ref` (same shape, any floating dtype, any device).
// NaN or Inf anywhere in `out` makes the result non-finite.
struct ErrorStats {
    double rel = 0, max_abs = 0;
    bool finite = true;
    void merge(const ErrorStats& other);  // the worse of the two
};
ErrorStats compare(const Tensor& out, const Tensor& ref);

// Fills a tensor (CPU or CUDA) with NaN so an element a backend forgot to write cannot pass.
void poison(const Tensor& t);

}  // namespace hla::cli
