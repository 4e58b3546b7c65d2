// hla — the linear family's front door: checks every argument once, builds the Problem, picks the
// backend. Backends never re-check.
#include <cmath>

#include "core/checks.hpp"
#include "ops/linear/problem.hpp"

namespace hla {

using detail::check_absent;
using detail::check_tensor;
using detail::Dim;

static LinearConfig cell(Decay d, Update u) {
    LinearConfig c;
    c.decay = d;
    c.update = u;
    return c;
}

LinearConfig linear_attn_config() { return cell(Decay::None, Update::Additive); }
LinearConfig lightning_attn_config() { return cell(Decay::Fixed, Update::Additive); }
LinearConfig simple_gla_config() { return cell(Decay::Scalar, Update::Additive); }
LinearConfig gla_config() { return cell(Decay::Vector, Update::Additive); }
LinearConfig delta_rule_config() { return cell(Decay::None, Update::Delta); }
LinearConfig gated_delta_rule_config() { return cell(Decay::Scalar, Update::Delta); }
LinearConfig kda_config() { return cell(Decay::Vector, Update::Delta); }

void lightning_attn_log_decay(int64_t num_heads, int64_t layer_idx, int64_t num_layers, float* out) {
    HLA_CHECK(num_heads >= 1, "lightning_attn_log_decay: num_heads: expected at least 1, got ", num_heads);
    HLA_CHECK(num_layers >= 1, "lightning_attn_log_decay: num_layers: expected at least 1, got ", num_layers);
    HLA_CHECK(layer_idx >= 0 && layer_idx < num_layers, "lightning_attn_log_decay: layer_idx: expected in [0, ",
              num_layers, "), got ", layer_idx);
    // MiniMax: slope_h = (2^(-8/H))^(h+1), scaled down linearly with depth; decay = exp(-slope).
    const double base = 1.0 / std::pow(2.0, 8.0 / double(num_heads));
    const double factor = 1.0 - double(layer_idx) / (double(num_layers) - 1.0 + 1e-5) + 1e-5;
    for (int64_t h = 0; h < num_heads; ++h) out[h] = float(-std::pow(base, double(h + 1)) * factor);
}

namespace linear {

static const std::initializer_list<DType> kInputDtypes = {DType::F32, DType::BF16, DType::F16};
static const std::initializer_list<DType> kOutputDtypes = {DType::F32, DType::BF16, DType::F16, DType::F64};
static const std::initializer_list<DType> kF32 = {DType::F32};

static const char* decay_name(Decay d) {
    switch (d) {
        case Decay::None: return "none";
        case Decay::Fixed: return "fixed";
        case Decay::Scalar: return "scalar";
        case Decay::Vector: return "vector";
    }
    return "?";
}

// The checks of g, beta, A_log and dt_bias are the same for forward ([B, T, ...]) and decode
// ([N, T, ...]): `rows` is B or N.
static void check_gates(const char* op, const LinearConfig& c, const TensorView& g, const TensorView& beta,
                        const TensorView& A_log, const TensorView& dt_bias, const char* rows_letter, int64_t rows,
                        int64_t T, int64_t HV, int64_t K, Device dev, int dev_i) {
    switch (c.decay) {
        case Decay::None: check_absent(op, "g", g, "this op has no decay"); break;
        case Decay::Fixed: check_tensor(op, "g", g, {{"HV", HV}}, kF32, dev, dev_i); break;
        case Decay::Scalar: check_tensor(op, "g", g, {{rows_letter, rows}, {"T", T}, {"HV", HV}}, kInputDtypes, dev, dev_i); break;
        case Decay::Vector:
            check_tensor(op, "g", g, {{rows_letter, rows}, {"T", T}, {"HV", HV}, {"K", K}}, kInputDtypes, dev, dev_i);
            break;
    }
    if (c.update == Update::Delta)
        check_tensor(op, "beta", beta, {{rows_letter, rows}, {"T", T}, {"HV", HV}}, kInputDtypes, dev, dev_i);
    else
        check_absent(op, "beta", beta, "the additive update takes no beta");
    if (c.gate_activation != GateActivation::None) {
        HLA_CHECK(c.decay == Decay::Scalar || c.decay == Decay::Vector, op,
                  ": gate_activation: an in-kernel gate needs a per-token decay (scalar or vector), got decay ",
                  decay_name(c.decay));
        check_tensor(op, "A_log", A_log, {{"HV", HV}}, kF32, dev, dev_i);
        if (c.decay == Decay::Scalar)
            check_tensor(op, "dt_bias", dt_bias, {{"HV", HV}}, kF32, dev, dev_i);
        else
            check_tensor(op, "dt_bias", dt_bias, {{"HV", HV}, {"K", K}}, kF32, dev, dev_i);
        if (c.gate_activation == GateActivation::BoundedSigmoid)
            HLA_CHECK(c.lower_bound < 0 && c.lower_bound >= -5, op, ": lower_bound: expected in [-5, 0), got ",
                      c.lower_bound);
    } else {
        check_absent(op, "A_log", A_log, "no in-kernel gate activation is set");
        check_absent(op, "dt_bias", dt_bias, "no in-kernel gate activation is set");
    }
    if (c.beta_activation != BetaActivation::None)
        HLA_CHECK(c.update == Update::Delta, op, ": beta_activation: only the delta update takes beta");
}

static double resolve_scale(const char* op, const LinearConfig& c, int64_t K) {
    if (!c.scale) return 1.0 / std::sqrt(double(K));
    HLA_CHECK(std::isfinite(*c.scale), op, ": scale: expected a finite number, got ", *c.scale);
    return *c.scale;
}

Problem make_forward_problem(const char* op, const LinearConfig& cfg, const LinearForwardArgs& a) {
    Problem p;
    p.op = op;
    p.cfg = cfg;
    p.args = a;
    HLA_CHECK(a.q.defined(), op, ": q: required, got none");
    HLA_CHECK(a.q.ndim == 4, op, ": q: expected rank 4 [B, T, H, K], got shape ", a.q.shape_string());
    HLA_CHECK(a.v.defined() && a.v.ndim == 4, op, ": v: expected rank 4 [B, T, HV, V], got shape ",
              a.v.shape_string());
    const Device dev = a.q.device;
    const int dev_i = a.q.device_index;
    p.B = a.q.shape[0];
    p.T = a.q.shape[1];
    p.H = a.q.shape[2];
    p.K = a.q.shape[3];
    p.HV = a.v.shape[2];
    p.V = a.v.shape[3];
    HLA_CHECK(p.H >= 1 && p.K >= 1, op, ": q: expected H >= 1 and K >= 1, got shape ", a.q.shape_string());
    HLA_CHECK(p.HV >= 1 && p.V >= 1, op, ": v: expected HV >= 1 and V >= 1, got shape ", a.v.shape_string());
    HLA_CHECK(p.HV % p.H == 0, op, ": v: the value heads HV = ", p.HV, " must be a multiple of the query/key heads H = ",
              p.H, " (grouped value heads)");
    p.G = p.HV / p.H;
    check_tensor(op, "q", a.q, {{"B", p.B}, {"T", p.T}, {"H", p.H}, {"K", p.K}}, kInputDtypes, dev, dev_i);
    check_tensor(op, "k", a.k, {{"B", p.B}, {"T", p.T}, {"H", p.H}, {"K", p.K}}, kInputDtypes, dev, dev_i);
    check_tensor(op, "v", a.v, {{"B", p.B}, {"T", p.T}, {"HV", p.HV}, {"V", p.V}}, kInputDtypes, dev, dev_i);
    check_tensor(op, "o", a.o, {{"B", p.B}, {"T", p.T}, {"HV", p.HV}, {"V", p.V}}, kOutputDtypes, dev, dev_i);
    check_gates(op, cfg, a.g, a.beta, a.A_log, a.dt_bias, "B", p.B, p.T, p.HV, p.K, dev, dev_i);
    p.scale = resolve_scale(op, cfg, p.K);
    p.cfg.backend = detail::resolve_backend(op, cfg.backend, dev);

    if (a.cu_seqlens.defined()) {
        HLA_CHECK(p.B == 1, op, ": cu_seqlens: variable-length packing needs B == 1, got B = ", p.B);
        detail::check_same_device(op, "cu_seqlens", a.cu_seqlens, dev, dev_i);
        const std::vector<int64_t> off = detail::read_cu_seqlens(op, a.cu_seqlens, p.T);
        for (size_t n = 0; n + 1 < off.size(); ++n) p.seqs.push_back({0, off[n], off[n + 1] - off[n]});
    } else {
        for (int64_t b = 0; b < p.B; ++b) p.seqs.push_back({b, 0, p.T});
    }
    const int64_t N = p.N();
    if (a.initial_state.defined())
        check_tensor(op, "initial_state", a.initial_state, {{"N", N}, {"HV", p.HV}, {"K", p.K}, {"V", p.V}}, kF32, dev,
                     dev_i);
    if (a.final_state.defined())
        check_tensor(op, "final_state", a.final_state, {{"N", N}, {"HV", p.HV}, {"K", p.K}, {"V", p.V}}, kF32, dev,
                     dev_i);
    return p;
}

void check_backward_args(const Problem& p, const TensorView& d_o, const TensorView& d_final_state,
                         const LinearGrads& g) {
    const char* op = p.op;
    const Device dev = p.args.q.device;
    const int di = p.args.q.device_index;
    check_tensor(op, "d_o", d_o, {{"B", p.B}, {"T", p.T}, {"HV", p.HV}, {"V", p.V}}, kInputDtypes, dev, di);
    if (d_final_state.defined())
        check_tensor(op, "d_final_state", d_final_state, {{"N", p.N()}, {"HV", p.HV}, {"K", p.K}, {"V", p.V}}, kF32, dev,
                     di);
    if (g.dq.defined()) check_tensor(op, "dq", g.dq, {{"B", p.B}, {"T", p.T}, {"H", p.H}, {"K", p.K}}, kOutputDtypes, dev, di);
    if (g.dk.defined()) check_tensor(op, "dk", g.dk, {{"B", p.B}, {"T", p.T}, {"H", p.H}, {"K", p.K}}, kOutputDtypes, dev, di);
    if (g.dv.defined()) check_tensor(op, "dv", g.dv, {{"B", p.B}, {"T", p.T}, {"HV", p.HV}, {"V", p.V}}, kOutputDtypes, dev, di);
    if (g.dg.defined()) {
        switch (p.cfg.decay) {
            case Decay::None: check_absent(op, "dg", g.dg, "this op has no decay"); break;
            case Decay::Fixed: check_tensor(op, "dg", g.dg, {{"HV", p.HV}}, kF32, dev, di); break;
            case Decay::Scalar: check_tensor(op, "dg", g.dg, {{"B", p.B}, {"T", p.T}, {"HV", p.HV}}, kF32, dev, di); break;
            case Decay::Vector:
                check_tensor(op, "dg", g.dg, {{"B", p.B}, {"T", p.T}, {"HV", p.HV}, {"K", p.K}}, kF32, dev, di);
                break;
        }
    }
    if (g.dbeta.defined()) {
        HLA_CHECK(p.delta(), op, ": dbeta: the additive update has no beta");
        check_tensor(op, "dbeta", g.dbeta, {{"B", p.B}, {"T", p.T}, {"HV", p.HV}}, kF32, dev, di);
    }
    if (g.dA_log.defined() || g.ddt_bias.defined())
        HLA_CHECK(p.has_gate_params(), op, ": dA_log/ddt_bias: no in-kernel gate activation is set");
    if (g.dA_log.defined()) check_tensor(op, "dA_log", g.dA_log, {{"HV", p.HV}}, kF32, dev, di);
    if (g.ddt_bias.defined()) {
        if (p.cfg.decay == Decay::Scalar)
            check_tensor(op, "ddt_bias", g.ddt_bias, {{"HV", p.HV}}, kF32, dev, di);
        else
            check_tensor(op, "ddt_bias", g.ddt_bias, {{"HV", p.HV}, {"K", p.K}}, kF32, dev, di);
    }
    if (g.dinitial_state.defined())
        check_tensor(op, "dinitial_state", g.dinitial_state, {{"N", p.N()}, {"HV", p.HV}, {"K", p.K}, {"V", p.V}}, kF32,
                     dev, di);
}

DecodeProblem make_decode_problem(const char* op, const LinearConfig& cfg, const LinearDecodeArgs& a) {
    DecodeProblem p;
    p.op = op;
    p.cfg = cfg;
    p.args = a;
    HLA_CHECK(a.q.defined() && a.q.ndim == 4, op, ": q: expected rank 4 [N, T, H, K], got shape ", a.q.shape_string());
    HLA_CHECK(a.v.defined() && a.v.ndim == 4, op, ": v: expected rank 4 [N, T, HV, V], got shape ", a.v.shape_string());
    const Device dev = a.q.device;
    const int di = a.q.device_index;
    p.N = a.q.shape[0];
    p.T = a.q.shape[1];
    p.H = a.q.shape[2];
    p.K = a.q.shape[3];
    p.HV = a.v.shape[2];
    p.V = a.v.shape[3];
    HLA_CHECK(p.H >= 1 && p.K >= 1 && p.HV >= 1 && p.V >= 1, op, ": q/v: empty head dimensions, q ",
              a.q.shape_string(), ", v ", a.v.shape_string());
    HLA_CHECK(p.HV % p.H == 0, op, ": v: the value heads HV = ", p.HV, " must be a multiple of the query/key heads H = ",
              p.H, " (grouped value heads)");
    p.G = p.HV / p.H;
    check_tensor(op, "q", a.q, {{"N", p.N}, {"T", p.T}, {"H", p.H}, {"K", p.K}}, kInputDtypes, dev, di);
    check_tensor(op, "k", a.k, {{"N", p.N}, {"T", p.T}, {"H", p.H}, {"K", p.K}}, kInputDtypes, dev, di);
    check_tensor(op, "v", a.v, {{"N", p.N}, {"T", p.T}, {"HV", p.HV}, {"V", p.V}}, kInputDtypes, dev, di);
    check_tensor(op, "o", a.o, {{"N", p.N}, {"T", p.T}, {"HV", p.HV}, {"V", p.V}}, kOutputDtypes, dev, di);
    check_gates(op, cfg, a.g, a.beta, a.A_log, a.dt_bias, "N", p.N, p.T, p.HV, p.K, dev, di);
    HLA_CHECK(a.state.defined() && a.state.ndim == 4, op, ": state: expected rank 4 [S, HV, K, V] (S slots), got shape ",
              a.state.shape_string());
    p.slots = a.state.shape[0];
    check_tensor(op, "state", a.state, {{"S", p.slots}, {"HV", p.HV}, {"K", p.K}, {"V", p.V}}, kF32, dev, di);
    HLA_CHECK(a.state.is_contiguous(), op, ": state: expected a contiguous [S, HV, K, V] tensor");
    if (a.state_indices.defined()) {
        check_tensor(op, "state_indices", a.state_indices, {{"N", p.N}}, {DType::I32, DType::I64}, dev, di);
    } else {
        HLA_CHECK(p.slots >= p.N, op, ": state: without state_indices sequence n uses slot n, so S >= N = ", p.N,
                  " slots are needed, got S = ", p.slots);
    }
    p.scale = resolve_scale(op, cfg, p.K);
    p.cfg.backend = detail::resolve_backend(op, cfg.backend, dev);
    return p;
}

}  // namespace linear

// ---- public entry points -------------------------------------------------------------------------

#ifndef HLA_WITH_CUDA
namespace linear::cuda {
[[noreturn]] static void no_cuda(const char* op) { detail::fail(op, ": this build of hla has no CUDA support"); }
void forward(const Problem& p) { no_cuda(p.op); }
void backward(const Problem& p, const TensorView&, const TensorView&, const LinearGrads&) { no_cuda(p.op); }
void decode(const DecodeProblem& p) { no_cuda(p.op); }
}  // namespace linear::cuda
#endif

static void run_forward(const char* op, const LinearConfig& cfg, const LinearForwardArgs& args) {
    const linear::Problem p = linear::make_forward_problem(op, cfg, args);
    detail::on_backend(p.cfg.backend,
                       [&] { linear::reference::forward(p); },
                       [&] { linear::cpu::forward(p); },
                       [&] { linear::cuda::forward(p); });
}

void linear_forward(const LinearConfig& config, const LinearForwardArgs& args) {
    run_forward("linear_forward", config, args);
}

void linear_backward(const LinearConfig& config, const LinearForwardArgs& args, const TensorView& d_o,
                     const TensorView& d_final_state, const LinearGrads& grads) {
    LinearForwardArgs a = args;
    a.final_state = TensorView();
    if (!a.o.defined()) a.o = d_o;  // only its shape is checked; backward never writes o
    const linear::Problem p = linear::make_forward_problem("linear_backward", config, a);
    linear::check_backward_args(p, d_o, d_final_state, grads);
    detail::on_backend(p.cfg.backend,
                       [&] { linear::reference::backward(p, d_o, d_final_state, grads); },
                       [&] { linear::cpu::backward(p, d_o, d_final_state, grads); },
                       [&] { linear::cuda::backward(p, d_o, d_final_state, grads); });
}

void linear_decode(const LinearConfig& config, const LinearDecodeArgs& args) {
    const linear::DecodeProblem p = linear::make_decode_problem("linear_decode", config, args);
    detail::on_backend(p.cfg.backend,
                       [&] { linear::reference::decode(p); },
                       [&] { linear::cpu::decode(p); },
                       [&] { linear::cuda::decode(p); });
}

static LinearForwardArgs named_args(TensorView q, TensorView k, TensorView v, TensorView o, const LinearOptions& opt) {
    LinearForwardArgs a;
    a.q = q;
    a.k = k;
    a.v = v;
    a.o = o;
    a.initial_state = opt.initial_state;
    a.final_state = opt.final_state;
    a.cu_seqlens = opt.cu_seqlens;
    return a;
}

static LinearConfig with_options(LinearConfig c, const LinearOptions& opt) {
    c.scale = opt.scale;
    c.qk_l2norm = opt.use_qk_l2norm_in_kernel;
    c.backend = opt.backend;
    return c;
}

void linear_attn(TensorView q, TensorView k, TensorView v, TensorView o, const LinearOptions& opt) {
    run_forward("linear_attn", with_options(linear_attn_config(), opt), named_args(q, k, v, o, opt));
}

void lightning_attn(TensorView q, TensorView k, TensorView v, TensorView log_decay, TensorView o,
                    const LinearOptions& opt) {
    LinearForwardArgs a = named_args(q, k, v, o, opt);
    a.g = log_decay;
    run_forward("lightning_attn", with_options(lightning_attn_config(), opt), a);
}

void simple_gla(TensorView q, TensorView k, TensorView v, TensorView g, TensorView o, const LinearOptions& opt) {
    LinearForwardArgs a = named_args(q, k, v, o, opt);
    a.g = g;
    run_forward("simple_gla", with_options(simple_gla_config(), opt), a);
}

void gla(TensorView q, TensorView k, TensorView v, TensorView g, TensorView o, const LinearOptions& opt) {
    LinearForwardArgs a = named_args(q, k, v, o, opt);
    a.g = g;
    run_forward("gla", with_options(gla_config(), opt), a);
}

void delta_rule(TensorView q, TensorView k, TensorView v, TensorView beta, TensorView o, const LinearOptions& opt) {
    LinearForwardArgs a = named_args(q, k, v, o, opt);
    a.beta = beta;
    run_forward("delta_rule", with_options(delta_rule_config(), opt), a);
}

void gated_delta_rule(TensorView q, TensorView k, TensorView v, TensorView g, TensorView beta, TensorView o,
                      const LinearOptions& opt) {
    LinearForwardArgs a = named_args(q, k, v, o, opt);
    a.g = g;
    a.beta = beta;
    run_forward("gated_delta_rule", with_options(gated_delta_rule_config(), opt), a);
}

void kda(TensorView q, TensorView k, TensorView v, TensorView g, TensorView beta, TensorView o,
         const LinearOptions& opt) {
    LinearForwardArgs a = named_args(q, k, v, o, opt);
    a.g = g;
    a.beta = beta;
    run_forward("kda", with_options(kda_config(), opt), a);
}

}  // namespace hla
