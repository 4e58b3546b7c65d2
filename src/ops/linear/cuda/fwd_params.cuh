// hla — what the chunked forward's kernels share (chunk_fwd.cuh, chunk_prepare_mma.cuh): the chunk
// size, the per-chunk and per-sequence tables, the one parameter struct of every launch, and the
// q/k row factors both prepare kernels apply.
#pragma once

#include <cstdint>

#include "hla/dtype.hpp"
#include "hla/linear.hpp"
#include "ops/linear/activations.hpp"
#include "ops/linear/cuda/common.cuh"

namespace hla::linear::cuda {

constexpr int kChunk = 64;          // tokens per chunk
constexpr int kSub = 16;            // row block of the factored scores
constexpr float kSafeSpan = 80.f;   // e^80 · |k| stays far inside fp32

// Per-chunk and per-sequence metadata, computed on the host from Problem::seqs.
struct ChunkInfo {
    int batch, start, len, seq;  // tokens [start, start + len) of batch row `batch`
};
struct SeqInfo {
    int batch, start, len, first_chunk;
};

// One POD for both kernels: pointers, strides (elements) of [B, T, heads, D] views, options.
// Rows of qk_rowf per (chunk, value head): fq, fk and (with Tw) φ, at these row indices; prepare
// writes them and the scans and the state pass read them.
constexpr int kRowFactorRows = 3;
constexpr int kRowFq = 0, kRowFk = 1, kRowPhi = 2;

struct FwdParams : CellOptions {
    const void *q, *k, *v, *g, *beta, *A_log, *dt_bias, *h0;
    void *o, *ht;
    // The scan's blocks of sequence-table entry n write the final state of entry n − ht_seq0, and none
    // below ht_seq0: the parallel pieces' scan (forward_chunked_impl), whose table holds every piece
    // and only the last piece ends a sequence. 0 otherwise.
    int ht_seq0;
    DType g_dtype, beta_dtype, o_dtype;
    int64_t qs[3], ks[3], vs[3], gs[3], bs[3], os[3], h0s[4], hts[4];
    int H, HV, G, K, V;
    const ChunkInfo* chunks;
    const SeqInfo* seqs;
    // Workspace, per (chunk, value head): Qg, Kd, W [64, K]; U [64, V]; P [64, 64] in the input dtype;
    // gC [K] fp32.
    void *Qg, *Kd, *W, *U, *P;
    float* gC;
    // Raw operands (forward_chunked_impl says when; null otherwise, and always in the backward's
    // recompute), for one decay number per token on bf16 inputs: per (chunk, value head) the row factors fq_i = s/‖q_i‖·e^{b_i} and
    // fk_i = e^{b_C − b_i}/‖k_i‖ (0 past the chunk's end), fp32 [kRowFactorRows][64] (the third row: see Tw). With them the scan reads q, k
    // (and v for the additive update) straight from the inputs and applies the factors to its fp32
    // products and to Ũ, and prepare writes neither Qg nor Kd (nor U = V): two (three) fewer [T, K]
    // tensors written to device memory and read back.
    float* qk_rowf;
    // The single-shot delta rule on bf16 whose v rows the copy engine can read (forward_chunked_impl:
    // not the concurrent forward, not pieces, not the backward's recompute; null otherwise): the scan
    // forms U = T v itself (chunk_scan_ws_kernel's forming warpgroup), so prepare neither writes U nor
    // reads v; with raw operands also W = T diag(φ) k, φ_i = e^{b_i}/‖k_i‖ being a third row of
    // qk_rowf (0 past the chunk's end), and prepare writes no W (with vector decay it writes K⊙γ
    // instead and the scan forms W from that, Kg below; else W stays prepare's). Per (chunk,
    // value head) T = L diag(β), bf16 [64][64], zero above the diagonal blocks: one [T, 64] tensor
    // written and read back instead of [T, V] (and [T, K]).
    void* Tw;
    // With Tw and vector decay (KDA): K⊙γ = k̂ ⊙ e^{b_i}, bf16 [64][K] per (chunk, value head), which
    // prepare writes instead of W (as rounded for its own product), and the scan forms W = T (K⊙γ)
    // from it; null otherwise.
    void* Kg;
    // Backward recompute only (null in the forward): the state at the start of every chunk, [chunk, HV,
    // K, V] in the operand dtype E, as the scan's products use it. With it, o may be null (not written).
    void* states;
    // Backward recompute of the delta rule on bf16 inputs only (null otherwise): T = (I + A)^{-1} of
    // every (chunk, value head), fp32 [64][64], zero above the diagonal (chunk_prepare_mma).
    float* Tinv;
    // Backward recompute of the delta rule with vector decay on bf16 inputs only (null otherwise): the
    // decayed key products D_ij = ⟨k̂_i, k̂_j⟩_b (j < i, zero elsewhere; no β) of every (chunk, value
    // head), fp32 [64][64]: the tensor-core stage 3 needs them for dβ and cannot cheaply rebuild them.
    float* Dm;
    // Concurrent forward only (forward_chunked_impl; null otherwise): prepare and the scan run at the
    // same time, the scan waiting for each (chunk, value head) until prepare has published it:
    // ready[slot] = 1 (publish_ready / wait_ready, common.cuh).
    int* ready;
    // Where set (the tensor-core prepare: the concurrent forward and the single-shot one), prepare's
    // block b takes chunk prep_order[b / HV] and value head b % HV: concurrent, the chunks in the order
    // the scans need them; single-shot, the reverse, so that the scan's first chunks are still in L2.
    const int* prep_order;
};

// 1 / ‖q‖ and 1 / ‖k‖ of a token's rows from their sums of squares with the in-kernel L2 norm, else 1.
__device__ __forceinline__ float2 qk_inv_norms(float sq, float sk, bool qk_l2norm) {
    if (!qk_l2norm) return make_float2(1.f, 1.f);
    return make_float2(rsqrtf(sq + float(kL2NormEps)), rsqrtf(sk + float(kL2NormEps)));
}
// The factors a token's q and k rows are multiplied by: scale / ‖q‖ and 1 / ‖k‖ with the in-kernel L2
// norm, else scale and 1.
__device__ __forceinline__ float2 qk_row_factors_of_sums(float sq, float sk, float scale, bool qk_l2norm) {
    const float2 n = qk_inv_norms(sq, sk, qk_l2norm);
    return make_float2(scale * n.x, n.y);
}
// The same from one warp's per-lane partial sums (every lane gets the factors).
__device__ __forceinline__ float2 qk_row_factors(float sq, float sk, float scale, bool qk_l2norm) {
    if (!qk_l2norm) return make_float2(scale, 1.f);
    return qk_row_factors_of_sums(lane_group_sum<32>(sq), lane_group_sum<32>(sk), scale, qk_l2norm);
}

}  // namespace hla::linear::cuda
