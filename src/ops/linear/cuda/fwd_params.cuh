// hla — what the chunked forward's kernels share (chunk_fwd.cuh, chunk_prepare_mma.cuh): the chunk
// size, the per-chunk and per-sequence tables and the one parameter struct of every launch.
#pragma once

#include <cstdint>

#include "hla/dtype.hpp"
#include "hla/linear.hpp"

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
struct FwdParams {
    const void *q, *k, *v, *g, *beta, *A_log, *dt_bias, *h0;
    void *o, *ht;
    DType g_dtype, beta_dtype, o_dtype;
    int64_t qs[3], ks[3], vs[3], gs[3], bs[3], os[3], h0s[4], hts[4];
    int H, HV, G, K, V;
    float scale;
    bool qk_l2norm;
    GateActivation gate_act;
    float lower_bound;
    BetaActivation beta_act;
    const ChunkInfo* chunks;
    const SeqInfo* seqs;
    // Workspace, per (chunk, value head): Qg, Kd, W [64, K]; U [64, V]; P [64, 64] in the input dtype;
    // gC [K] fp32.
    void *Qg, *Kd, *W, *U, *P;
    float* gC;
};

}  // namespace hla::linear::cuda
