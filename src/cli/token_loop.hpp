// hla bench — the baseline: a straightforward fp32 token-by-token loop of the linear recurrence.
//
// This is the per-token program of SPECS.md §1 written the plain way (what ggml's
// ggml_gated_delta_net and most inference engines run on the CPU): for each head, for each token,
// decay the [K, V] state, apply the update, read the output, each as its own pass over the state.
// Inner loops run over V (contiguous), so -O3 -march=native vectorises them; heads are spread over
// the threads with hla::parallel_for. The bench reports the chunked backend's speed-up over it.
#pragma once

#include <cstdint>

#include "hla/linear.hpp"

namespace hla::cli {

// Contiguous f32 tensors: q, k [B, T, H, K]; v, o [B, T, HV, V]; g per the decay ([HV] fixed,
// [B, T, HV] scalar, [B, T, HV, K] vector, raw log decay); beta [B, T, HV] for the delta update.
// state [B, HV, K, V]: read and written when given (the decode step); a zero start otherwise.
struct TokenLoopArgs {
    const float *q = nullptr, *k = nullptr, *v = nullptr, *g = nullptr, *beta = nullptr;
    float* o = nullptr;
    float* state = nullptr;
    int64_t B = 1, T = 1, H = 1, HV = 1, K = 1, V = 1;
    float scale = 1.0f;
    Decay decay = Decay::None;
    Update update = Update::Additive;
};

void token_loop(const TokenLoopArgs& args);

}  // namespace hla::cli
