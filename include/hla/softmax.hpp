// hla — the softmax-attention family (SPECS.md §2): causal flash attention with grouped heads, a sliding
// window, the Forgetting Transformer's log-forget bias, a sigmoid output gate, varlen packing, the
// log-sum-exp, a backward, and KV-cache decode.
//
//   s_ij = scale · q_i·k_j + bias_ij             bias_ij = Σ_{s=j+1..i} g_s   (0 without g)
//   o_i  = Σ_{j visible from i} softmax_j(s_ij) v_j     visible: j ≤ i (causal) and j > i − w (window w)
//   o_i ← o_i ⊙ sigmoid(z_i)                      (output gate, when `gate` = z is given)
//   lse_i = log Σ_{j visible} exp(s_ij)           (natural log; −inf for a row that sees no key)
//
// A row that sees no key (only possible in decode, or with an empty window) gets o_i = 0, lse_i = −inf.
//
// Shape letters (declared once, used everywhere below):
//   B   batch (1 when cu_seqlens packs N variable-length sequences)
//   T   tokens per batch row (queries and keys of the same sequence)
//   N   sequences (B, or len(cu_seqlens) − 1)
//   HQ  query heads          HKV key/value heads, HQ % HKV == 0 (query head h reads kv head h / (HQ/HKV))
//   D   head dim of q, k and v. CUDA: 64, 128 or 256. Reference and CPU: any D in [1, 256].
//
// Tensors (innermost dimension contiguous; other strides free, so q/k/v may be slices of a fused
// projection):
//   q             [B, T, HQ, D]    f32 | bf16 | f16 (CUDA: bf16 | f16)
//   k, v          [B, T, HKV, D]   same dtype as q
//   g             [B, T, HQ]       optional log forget gate (≤ 0 in the Forgetting Transformer; any
//                                  finite value is accepted), f32 | bf16 | f16; needs causal
//   gate          [B, T, HQ, D]    optional output-gate logits z, any input dtype
//   cu_seqlens    [N + 1]          optional i32 | i64, 0 = cu[0] ≤ … ≤ cu[N] = T (empty sequences allowed)
//   o             [B, T, HQ, D]    out, any floating dtype (usually that of q)
//   lse           [B, HQ, T]       optional out, f32 (FlashAttention's softmax_lse layout)
//
// Device: all tensors on one device; the device picks the backend unless SoftmaxConfig::backend says.
#pragma once

#include <optional>

#include "hla/linear.hpp"  // Backend
#include "hla/tensor.hpp"

namespace hla {

struct SoftmaxConfig {
    bool causal = true;
    // Sliding window of w tokens: query i sees keys j with i − w < j ≤ i. 0 = unlimited. Needs causal.
    int64_t window = 0;
    std::optional<double> scale;  // multiplies q·k; default D^-0.5
    Backend backend = Backend::Auto;
};

struct SoftmaxForwardArgs {
    TensorView q, k, v;
    TensorView g;           // optional forget-gate log bias [B, T, HQ]
    TensorView gate;        // optional output-gate logits [B, T, HQ, D]
    TensorView cu_seqlens;  // optional [N + 1]
    TensorView o;           // out [B, T, HQ, D]
    TensorView lse;         // optional out [B, HQ, T] f32
};

// o (and lse) ← attention over every sequence.
void softmax_attention_forward(const SoftmaxConfig& config, const SoftmaxForwardArgs& args);

// Gradients, each optional (an undefined view is not computed). dq [B, T, HQ, D]; dk, dv [B, T, HKV, D]
// (summed over the query heads that share a kv head); dg [B, T, HQ] f32; dgate [B, T, HQ, D].
struct SoftmaxGrads {
    TensorView dq, dk, dv, dg, dgate;
};

// Backward of softmax_attention_forward, FlashAttention-style: `args` holds the forward's inputs AND
// its outputs — args.o (the gated output as written by the forward) and args.lse are required, so the
// probabilities are recomputed from the log-sum-exp without a second softmax pass. d_o [B, T, HQ, D].
void softmax_attention_backward(const SoftmaxConfig& config, const SoftmaxForwardArgs& args, const TensorView& d_o,
                                const SoftmaxGrads& grads);

// KV-cache attention: decode (T_q = 1), speculative / small T_q, and chunked prefill against a cache.
//
// Cache layout (FlashAttention's):
//   contiguous: k_cache, v_cache [S, TC, HKV, D]: S slots of TC tokens; sequence n uses slot
//               cache_batch_idx[n] (default n).
//   paged:      k_cache, v_cache [P, PS, HKV, D]: P pages of PS tokens; block_table [N, MB] i32 lists
//               the pages of sequence n in order, so token t of sequence n lives in page
//               block_table[n][t / PS] at row t % PS. Capacity per sequence: MB · PS tokens.
//   g_cache     optional forget gates of the cached tokens, f32, [S, TC, HQ] or paged [P, PS, HQ].
//
// Per sequence n, with L_n = cache_seqlens[n] tokens already in the cache:
//   1. when k, v (new tokens [N, TQ, HKV, D]) are given, they are written into the cache at positions
//      L_n … L_n + TQ − 1 (and g [N, TQ, HQ] into g_cache); the key length becomes Lk = L_n + TQ.
//      Without k, v the key length is Lk = L_n (the caller appended already).
//   2. query t of sequence n sits at position Lk − TQ + t (bottom-right aligned, FlashAttention's
//      convention) and attends causally (and within the window) over cache positions [0, Lk).
// cache_seqlens optional when no k, v are given (then Lk = TC for every sequence).
// On the CPU the lengths are checked against the capacity ("cache too short"); on CUDA they stay on the
// device (no host synchronisation, capturable in a CUDA graph) and the kernel clamps them to it.
struct SoftmaxKVCacheArgs {
    TensorView q;                 // [N, TQ, HQ, D]
    TensorView k_cache, v_cache;  // see above; updated in place when k, v are given
    TensorView cache_seqlens;     // [N] i32 | i64
    TensorView k, v;              // optional new tokens [N, TQ, HKV, D]
    TensorView cache_batch_idx;   // optional [N] i32 | i64 (contiguous layout only)
    TensorView block_table;       // optional [N, MB] i32 (paged layout)
    TensorView g_cache, g;        // optional forget gates (see above)
    TensorView gate;              // optional output-gate logits [N, TQ, HQ, D]
    TensorView o;                 // out [N, TQ, HQ, D]
    TensorView lse;               // optional out [N, HQ, TQ] f32
};
void softmax_attention_kvcache(const SoftmaxConfig& config, const SoftmaxKVCacheArgs& args);

// ---- FlashAttention-named entry points ------------------------------------------------------------

struct FlashAttnOptions {
    std::optional<double> softmax_scale;
    bool causal = true;
    int64_t window = 0;    // sliding window (0 = unlimited)
    TensorView g;          // forget-gate log bias
    TensorView gate;       // output-gate logits
    TensorView softmax_lse;  // optional out
    Backend backend = Backend::Auto;
};

void flash_attn_func(TensorView q, TensorView k, TensorView v, TensorView o, const FlashAttnOptions& opt = {});
// Packed sequences: q [1, T, HQ, D], k/v [1, T, HKV, D], cu_seqlens [N + 1]; lse [1, HQ, T].
void flash_attn_varlen_func(TensorView q, TensorView k, TensorView v, TensorView cu_seqlens, TensorView o,
                            const FlashAttnOptions& opt = {});

struct KVCacheOptions {
    TensorView k, v;  // new tokens to append
    TensorView cache_batch_idx, block_table, g_cache, g, gate, softmax_lse;
    std::optional<double> softmax_scale;
    bool causal = true;
    int64_t window = 0;
    Backend backend = Backend::Auto;
};
void flash_attn_with_kvcache(TensorView q, TensorView k_cache, TensorView v_cache, TensorView cache_seqlens,
                             TensorView o, const KVCacheOptions& opt = {});

}  // namespace hla
