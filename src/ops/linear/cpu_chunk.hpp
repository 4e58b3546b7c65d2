// hla — the chunked algorithm of the linear family on the CPU (SPECS.md §1), one chunk at a time.
//
// One implementation for the whole family: the decay shape (kVector: per key channel; otherwise one
// log decay per token, which also covers "none" (0) and "fixed" (γ_h)) and the update (kDelta) are
// compile-time parameters. Within a chunk of L ≤ 64 tokens, with b_i the cumulative log decay and
// ⟨x_i, y_j⟩_b = Σ_c x_ic y_jc exp(b_ic − b_jc) the decayed inner product:
//
//   P_ij = ⟨q_i, k_j⟩_b (j ≤ i)        D_ij = ⟨k_i, k_j⟩_b (j < i),  A = diag(β) D
//   Y    = V − (K ⊙ γ) S_0             X solves (I + A) X = diag(β) Y   (delta; additive: X = V)
//   O    = (Q ⊙ γ) S_0 + P X
//   S_C  = diag(γ_L) S_0 + (K ⊙ γ_L ⊘ γ)ᵀ X
//
// Numerics: exp(b) and exp(−b) are never formed over a chunk (with g = −1000 they leave fp32).
// Decayed products split the chunk into 16-token blocks: an off-diagonal block (J before I) is factored
// around r, the last token before I, as [X_I ⊙ exp(b_I − b_r)] [Y_J ⊙ exp(b_r − b_J)]ᵀ with both
// factors ≤ 1, so it runs as a matrix product without overflow; a diagonal block is a matrix product
// with within-block decay products when its decays are shallow, else exp(b_i − b_j) ≤ 1 is computed
// per element (cpu_chunk.cpp, Decayed<true>).
// Every decay factor exp(b_i − b_j) is formed from the gates between j and i alone, never from the
// difference of two cumulative sums: after a run of deep gates b reaches −500, where a float resolves
// only 3e-5, and exp(b_i − b_j) of two nearby shallow tokens would inherit that error. One decay per
// token: exp of the sum Σ_{j<t≤i} g_t accumulated from the nearer end; vector decay: running products
// of the per-token decays exp(g_t), one exp per token and channel.
#pragma once

#include <cstdint>
#include <vector>

#include "core/cpu_math.hpp"

namespace hla::linear::cpu {

constexpr int kChunk = 64;  // the largest chunk: the workspace's size, and the backward's chunk
constexpr int kBlock = 16;
// The forward's chunk (cpu.cpp), any multiple of kBlock up to kChunk. Per token, the chunked forward
// does 2KV (Q S₀) + 2KV (state update) [+ 2KV (K S₀), delta] in chunk-by-state products whatever the
// chunk, plus intra-chunk products and decay factors that grow with it (~C(K+V)/2 flops per product).
// At C = 32 against 64, T = 4096, H = 16, K = V = 128, 2 threads (busy host, interleaved medians of 9):
// delta_rule 51.0 -> 44.2 ms, GDN 55.3 -> 47.5, KDA 65.6 -> 55.3, GLA 44.2 -> 37.0, linear_attn
// 33.0 -> 32.3; C = 16 was then within noise of 32. Once the state's decay went into the update
// product (no pass over the state per chunk) and Γ's exps stopped at the diagonal, C = 16 came out ahead
// for every op (same runs, previous / this binary alternated, autogroup nice -15, x loop of 3 runs):
// GDN 3.05/2.84/2.86 -> 3.09/3.11/3.03 (45.0 -> 42.7 ms), simple_gla 3.20/3.12/3.15 -> 3.37/3.30/3.25,
// KDA 3.07/3.05/2.76 -> 3.23/3.12/2.94: the chunk-by-state products are 3KV (delta) or 2KV multiply-adds
// a token whatever C, the intra-chunk ones ~C(K+V)/2 each, and at C = 16 the causal blocks are the
// 16 × 16 diagonal ones alone (no blocked solve). GLA (vector decay, additive) was the exception, the
// same at both (3.31/3.22/3.20 -> 3.33/3.29/3.14), and keeps 32. The backward keeps kChunk: its stored
// states scale as T/C.
constexpr int forward_chunk(bool vector_decay, bool delta) { return vector_decay && !delta ? 32 : 16; }

// One chunk's inputs after the per-token transforms, fp32, rows contiguous.
struct ChunkView {
    int L = 0;            // tokens in this chunk
    int64_t K = 0, V = 0;
    const float* q;       // [L, K] q̂ · scale
    const float* k;       // [L, K]
    const float* v;       // [L, V]
    const float* g;       // log decay per token: [L, K] (vector) or [L]
    const float* b;       // one decay per token: its cumulative sum inside the chunk [L] (unused for vector decay)
    const float* beta;    // [L]
    bool decay = true;    // false: every g is 0 (Decay::None), so the decay factors are all 1 and are skipped
};

// Scratch owned by one worker thread, sized for K, V and the chunk length once.
struct Workspace {
    Workspace(int64_t K, int64_t V);
    int64_t K, V;
    hla::cpu::FloatBuffer eb, ebar, ea, kt, kg, qg, kbar, y, x, xt, d, a, p, gamma_lower, s0t, dst, dx, dp, z, da, dqg, dkbar, dkg, dy,
        tmp1, tmp2, blk_x, blk_yt, blk_out, before, row, row2, diag, u, w, f, db;
    // Vector decay, diagonal blocks: within_block [L, K] holds Π_{i0≤t≤i} exp(g_t) for row i of the block
    // starting at i0, within_block_inv its reciprocal; block_as_product[I] says whether block I is
    // shallow enough to be computed as a matrix product with them (cpu_chunk.cpp, Decayed<true>).
    hla::cpu::FloatBuffer within_block, within_block_inv, diag_block;
    std::vector<unsigned char> block_as_product;
    // One decay per token: the chunk's Γ (gamma_lower) for the scores' masks, or nullptr without decay.
    const float* gamma = nullptr;
};

// Forward of one chunk: o [L, V] ← outputs; S [K, V] ← the state after the chunk (in place).
// With o == nullptr only the state advances (the backward's forward sweep).
template <bool kVector, bool kDelta>
void chunk_forward(const ChunkView& c, float* S, float* o, Workspace& w);

// Gradients of one chunk, given its start state S0 [K, V], dO [L, V] and dS [K, V] = ∂loss/∂S_C
// (replaced by ∂loss/∂S_0). Accumulates into dq, dk [L, K]; writes dv [L, V], dg (∂/∂ log decay of
// each token: [L, K] or [L]) and dbeta [L].
template <bool kVector, bool kDelta>
void chunk_backward(const ChunkView& c, const float* S0, const float* dO, float* dS, float* dq, float* dk, float* dv,
                    float* dg, float* dbeta, Workspace& w);

}  // namespace hla::linear::cpu
