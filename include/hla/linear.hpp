// hla — the linear-attention family: one recurrence, two axes (SPECS.md §1, docs/design.md).
//
//   additive:  S_t = D_t S_{t-1} + k_t v_tᵀ
//   delta:     S_t = (I − β_t k_t k_tᵀ) D_t S_{t-1} + β_t k_t v_tᵀ
//   output:    o_t = S_tᵀ (scale · q_t)
//
// Shape letters (declared once, used everywhere below):
//   B  batch (1 when cu_seqlens packs N variable-length sequences)
//   T  tokens per batch row        N  sequences (B, or len(cu_seqlens) − 1)
//   H  query/key heads             HV value heads, a multiple of H (grouped value heads, G = HV / H)
//   K  key head dim                V  value head dim
//
// Tensors (innermost dimension contiguous; other strides free, so q/k/v may be slices of a fused
// projection):
//   q, k          [B, T, H, K]     f32 | bf16 | f16
//   v             [B, T, HV, V]    f32 | bf16 | f16
//   g  decay None:   —
//         Fixed:  [HV]             f32, log decay γ_h ≤ 0 per value head
//         Scalar: [B, T, HV]       log decay per token (or the raw gate input, see GateActivation)
//         Vector: [B, T, HV, K]    log decay per token and key channel
//   beta          [B, T, HV]       delta update only; β (or its logit, see BetaActivation)
//   A_log         [HV]             f32, with an in-kernel gate activation
//   dt_bias       [HV] (Scalar) or [HV, K] (Vector), f32, with an in-kernel gate activation
//   state         [N, HV, K, V]    f32, row-major: state[n][h][key][value]
//   cu_seqlens    [N + 1]          i32 | i64, 0 = cu[0] ≤ cu[1] ≤ … ≤ cu[N] = T (empty sequences allowed)
//   o             [B, T, HV, V]    any floating dtype (usually that of v)
//
// Device: all tensors on one device; the device picks the backend unless LinearConfig::backend says.
#pragma once

#include <optional>

#include "hla/tensor.hpp"

namespace hla {

enum class Decay : uint8_t { None, Fixed, Scalar, Vector };
enum class Update : uint8_t { Additive, Delta };

// How the gate tensor g becomes the log decay (SPECS.md §1, in-kernel gates).
enum class GateActivation : uint8_t {
    None,            // g is the log decay itself (g ≤ 0)
    SoftplusDecay,   // log decay = −exp(A_log) · softplus(g + dt_bias)      (Gated DeltaNet, KDA)
    BoundedSigmoid,  // log decay = lower_bound · sigmoid(exp(A_log) · (g + dt_bias))   (KDA, bounded)
};

enum class BetaActivation : uint8_t {
    None,       // beta is β
    Sigmoid,    // β = sigmoid(beta)
    Sigmoid2x,  // β = 2 · sigmoid(beta)   ("negative eigenvalues", β ∈ [0, 2])
};

// Which implementation runs. Auto: Cpu for CPU tensors, Cuda for CUDA tensors.
// Reference: the fp64 per-token recurrence (CPU tensors only), the oracle every path is tested against.
enum class Backend : uint8_t { Auto, Reference, Cpu, Cuda };
const char* backend_name(Backend backend);

// One cell of the family plus the options that change the math.
struct LinearConfig {
    Decay decay = Decay::None;
    Update update = Update::Additive;
    std::optional<double> scale;  // multiplies q; default K^-0.5
    bool qk_l2norm = false;       // q ← q/sqrt(Σq²+1e-6), same for k, before the scale
    GateActivation gate_activation = GateActivation::None;
    float lower_bound = -5.0f;  // for BoundedSigmoid, in [−5, 0)
    BetaActivation beta_activation = BetaActivation::None;
    Backend backend = Backend::Auto;
};

// Named cells of the family (the public op names).
LinearConfig linear_attn_config();            // decay None,   additive
LinearConfig lightning_attn_config();         // decay Fixed,  additive  (RetNet, MiniMax Lightning)
LinearConfig simple_gla_config();             // decay Scalar, additive  (simple GLA, Mamba2 SSD)
LinearConfig gla_config();                    // decay Vector, additive
LinearConfig delta_rule_config();             // decay None,   delta     (DeltaNet)
LinearConfig gated_delta_rule_config();       // decay Scalar, delta     (Gated DeltaNet)
LinearConfig kda_config();                    // decay Vector, delta     (Kimi Delta Attention)

// MiniMax Lightning attention: the per-head log decay γ_h of layer `layer_idx` of `num_layers`
// (Hugging Face `minimax`: slope_h · (1 − layer_idx/(num_layers−1) + 1e-5), negated). Writes [H] f32.
void lightning_attn_log_decay(int64_t num_heads, int64_t layer_idx, int64_t num_layers, float* out);

struct LinearForwardArgs {
    TensorView q, k, v;
    TensorView g;              // per Decay (see above); undefined for Decay::None
    TensorView beta;           // Update::Delta only
    TensorView A_log, dt_bias; // in-kernel gate activation only
    TensorView initial_state;  // optional [N, HV, K, V] f32
    TensorView cu_seqlens;     // optional [N + 1]
    TensorView o;              // out [B, T, HV, V]
    TensorView final_state;    // optional out [N, HV, K, V] f32
};

// o (and final_state) ← the recurrence over every sequence.
void linear_forward(const LinearConfig& config, const LinearForwardArgs& args);

// Gradients, each optional (an undefined view is not computed). Shapes and dtypes as the input they
// belong to, except dg/dbeta/dA_log/ddt_bias/dinitial_state which are f32. dg is the gradient with
// respect to the g that was passed (the raw gate input when a gate activation is set); likewise dbeta.
// For Decay::Fixed, dg [HV] sums over all tokens of all sequences.
struct LinearGrads {
    TensorView dq, dk, dv, dg, dbeta, dA_log, ddt_bias, dinitial_state;
};

// Backward of linear_forward. `args` holds the forward's inputs (args.o and args.final_state are
// ignored); d_o [B, T, HV, V] is the output gradient and d_final_state (optional, [N, HV, K, V] f32)
// that of the final state. Recomputes what it needs: no context is saved between the two calls.
void linear_backward(const LinearConfig& config, const LinearForwardArgs& args, const TensorView& d_o,
                     const TensorView& d_final_state, const LinearGrads& grads);

// Decode / multi-token step from a cache of recurrent states, updated in place.
//   q, k [N, T, H, K]; v [N, T, HV, V]; g, beta per Decay/Update with N in place of B;
//   state [S, HV, K, V] f32 (S ≥ N slots); state_indices optional i32 | i64 [N]: sequence n reads
//   and writes slot state_indices[n] (default n); a negative index skips the sequence (its o is
//   left untouched). o [N, T, HV, V].
// No allocation and no host synchronisation: safe to call per token, capturable in a CUDA graph.
struct LinearDecodeArgs {
    TensorView q, k, v, g, beta, A_log, dt_bias;
    TensorView state;
    TensorView state_indices;
    TensorView o;
};
void linear_decode(const LinearConfig& config, const LinearDecodeArgs& args);

// Named forward entry points (thin wrappers over linear_forward with the matching config).
struct LinearOptions {
    std::optional<double> scale;
    bool use_qk_l2norm_in_kernel = false;
    TensorView initial_state, final_state, cu_seqlens;
    Backend backend = Backend::Auto;
};
void linear_attn(TensorView q, TensorView k, TensorView v, TensorView o, const LinearOptions& opt = {});
void lightning_attn(TensorView q, TensorView k, TensorView v, TensorView log_decay, TensorView o,
                    const LinearOptions& opt = {});
void simple_gla(TensorView q, TensorView k, TensorView v, TensorView g, TensorView o, const LinearOptions& opt = {});
void gla(TensorView q, TensorView k, TensorView v, TensorView g, TensorView o, const LinearOptions& opt = {});
void delta_rule(TensorView q, TensorView k, TensorView v, TensorView beta, TensorView o,
                const LinearOptions& opt = {});
void gated_delta_rule(TensorView q, TensorView k, TensorView v, TensorView g, TensorView beta, TensorView o,
                      const LinearOptions& opt = {});
void kda(TensorView q, TensorView k, TensorView v, TensorView g, TensorView beta, TensorView o,
         const LinearOptions& opt = {});

}  // namespace hla
