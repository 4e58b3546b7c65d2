// The linear family's oracle (src/ops/linear/reference.cpp), tested on its own terms:
//   (a) its hand-derived backward against central finite differences in fp64, on tiny sizes;
//   (b) state hand-off: one long call equals the same tokens in pieces, and token-by-token decode;
//   (c) closed-form numbers for hand-sized cases;
//   (d) every argument check of dispatch.cpp reachable through the public API.
// Everything runs through the public API with LinearConfig::backend = Reference, except the finite
// difference loss, which needs an fp64 final state (the public API stores states in f32).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "ops/linear/problem.hpp"
#include "support/linear_case.hpp"

namespace hla::test {
namespace {

LinearConfig reference(LinearConfig c) {
    c.backend = Backend::Reference;
    return c;
}

double element(const Tensor& t, int64_t i) { return load_as_double(t.data(), t.dtype(), i); }

// ---- (a) finite differences ------------------------------------------------------------------------

struct FdCell {
    std::string name;
    LinearConfig cfg;
    bool varlen = true;  // cu_seqlens with an empty sequence; false: a padded batch of B = 2
};

LinearConfig with(LinearConfig c, const std::function<void(LinearConfig&)>& edit) {
    edit(c);
    return c;
}

std::vector<FdCell> fd_cells() {
    return {
        {"linear_attn", linear_attn_config()},
        {"lightning_attn", lightning_attn_config()},
        {"simple_gla", simple_gla_config()},
        {"gla", gla_config()},
        {"delta_rule", delta_rule_config()},
        {"gated_delta_rule", gated_delta_rule_config()},
        {"kda", kda_config()},
        {"gla_padded_batch", gla_config(), false},
        {"kda_padded_batch", kda_config(), false},
        {"delta_rule_qk_l2norm_scale", with(delta_rule_config(), [](LinearConfig& c) {
             c.qk_l2norm = true;
             c.scale = 0.7;
         })},
        {"simple_gla_softplus_gate", with(simple_gla_config(), [](LinearConfig& c) {
             c.gate_activation = GateActivation::SoftplusDecay;
         })},
        {"gla_bounded_sigmoid_gate", with(gla_config(), [](LinearConfig& c) {
             c.gate_activation = GateActivation::BoundedSigmoid;
             c.lower_bound = -3.0f;
         })},
        {"gated_delta_rule_qwen3_next", with(gated_delta_rule_config(), [](LinearConfig& c) {
             c.qk_l2norm = true;
             c.gate_activation = GateActivation::SoftplusDecay;
             c.beta_activation = BetaActivation::Sigmoid;
         })},
        {"kda_softplus_gate_sigmoid2x", with(kda_config(), [](LinearConfig& c) {
             c.qk_l2norm = true;
             c.gate_activation = GateActivation::SoftplusDecay;
             c.beta_activation = BetaActivation::Sigmoid2x;
         })},
        {"kda_bounded_sigmoid_gate", with(kda_config(), [](LinearConfig& c) {
             c.gate_activation = GateActivation::BoundedSigmoid;
             c.beta_activation = BetaActivation::Sigmoid;
         })},
    };
}

void PrintTo(const FdCell& cell, std::ostream* os) { *os << cell.name; }

LinearCase fd_case(const FdCell& cell) {
    LinearCase c;
    c.name = cell.name;
    c.cfg = reference(cell.cfg);
    c.H = 2;
    c.HV = 4;  // grouped value heads, G = 2
    c.K = 3;
    c.V = 4;
    if (cell.varlen) {
        c.B = 1;
        c.T = 9;
        c.cu_seqlens = {0, 4, 4, 9};  // the middle sequence is empty
    } else {
        c.B = 2;
        c.T = 5;
    }
    c.initial_state = true;
    c.gate_min = -1.5;
    c.gate_max = -0.05;
    if (cell.cfg.beta_activation != BetaActivation::None) {
        c.beta_min = -2.0;  // logits
        c.beta_max = 2.0;
    }
    return c;
}

// L = Σ o ⊙ d_o + Σ final_state ⊙ d_final_state, by the fp64 reference with fp64 outputs.
double fd_loss(const LinearCase& c, const LinearInputs& in, const Tensor& d_o, const Tensor& d_final_state) {
    Tensor o({c.B, c.T, c.HV, c.V}, DType::F64);
    Tensor final_state({in.N, c.HV, c.K, c.V}, DType::F64);
    linear::Problem p = linear::make_forward_problem("finite_differences", c.cfg, in.args(o));
    // The public API stores states in f32; the loss needs every digit of the state for h = 2^-12.
    p.args.final_state = final_state;
    linear::reference::forward(p);
    double loss = 0;
    for (int64_t i = 0; i < o.numel(); ++i) loss += element(o, i) * element(d_o, i);
    for (int64_t i = 0; i < final_state.numel(); ++i) loss += element(final_state, i) * element(d_final_state, i);
    return loss;
}

class ReferenceFiniteDifferences : public ::testing::TestWithParam<FdCell> {};

TEST_P(ReferenceFiniteDifferences, EveryGradientMatches) {
    const LinearCase c = fd_case(GetParam());
    LinearInputs in = make_inputs(c, 1234);
    const Tensor d_o = random_normal({c.B, c.T, c.HV, c.V}, DType::F32, 11);
    const Tensor d_final_state = random_normal({in.N, c.HV, c.K, c.V}, DType::F32, 12);

    const LinearGradTensors grads = poisoned_grads(c, in.N);
    linear_backward(c.cfg, in.args(Tensor()), d_o, d_final_state, grads.views());

    struct Pair {
        const char* name;
        Tensor input, grad;
    };
    const std::vector<Pair> pairs = {{"q", in.q, grads.dq},
                                     {"k", in.k, grads.dk},
                                     {"v", in.v, grads.dv},
                                     {"g", in.g, grads.dg},
                                     {"beta", in.beta, grads.dbeta},
                                     {"A_log", in.A_log, grads.dA_log},
                                     {"dt_bias", in.dt_bias, grads.ddt_bias},
                                     {"initial_state", in.initial_state, grads.dinitial_state}};
    // Central differences with h = 2^-12: truncation error ~h²·f'''/6 ≈ 1e-8 on these O(1) functions,
    // round-off ~1e-16·|L|/h ≈ 1e-12. The inputs are f32, so the step actually taken is read back.
    const double h = std::ldexp(1.0, -12);
    int checked_tensors = 0;
    for (const Pair& pr : pairs) {
        ASSERT_EQ(pr.input.defined(), pr.grad.defined()) << pr.name;
        if (!pr.input.defined()) continue;
        ++checked_tensors;
        Tensor numeric(pr.input.sizes(), DType::F64);
        for (int64_t i = 0; i < pr.input.numel(); ++i) {
            const double x0 = element(pr.input, i);
            store_from_double(pr.input.data(), pr.input.dtype(), i, x0 + h);
            const double xp = element(pr.input, i);
            const double lp = fd_loss(c, in, d_o, d_final_state);
            store_from_double(pr.input.data(), pr.input.dtype(), i, x0 - h);
            const double xm = element(pr.input, i);
            const double lm = fd_loss(c, in, d_o, d_final_state);
            store_from_double(pr.input.data(), pr.input.dtype(), i, x0);
            store_from_double(numeric.data(), DType::F64, i, (lp - lm) / (xp - xm));
        }
        const ErrorStats e = compare(pr.grad, numeric);
        // The analytic gradients of dg/dbeta/dA_log/... are stored in f32 (relative 6e-8).
        EXPECT_TRUE(e.finite && e.rel_rms < 2e-6) << GetParam().name << " d" << pr.name << ": " << e.str();
    }
    EXPECT_GE(checked_tensors, 4);
}

INSTANTIATE_TEST_SUITE_P(AllCellsAndOptions, ReferenceFiniteDifferences, ::testing::ValuesIn(fd_cells()),
                         [](const ::testing::TestParamInfo<FdCell>& info) { return info.param.name; });

// Long sequences cross the backward's 64-token checkpoint segments, which the tiny cases above never
// do. One central difference along a random direction per input tensor checks ⟨∇L, δ⟩ there:
// sequences of 70, 0 and 130 tokens (a boundary inside each non-empty one) and a padded batch of 129.
class ReferenceDirectionalDerivative : public ::testing::TestWithParam<FdCell> {};

TEST_P(ReferenceDirectionalDerivative, AcrossCheckpointSegments) {
    LinearCase c = fd_case(GetParam());
    c.K = 5;
    c.V = 4;
    if (c.cu_seqlens.empty()) {
        c.T = 129;
    } else {
        c.T = 200;
        c.cu_seqlens = {0, 70, 70, 200};
    }
    c.gate_min = -0.1;  // memory long enough that early tokens matter at the end
    c.gate_max = -0.001;
    LinearInputs in = make_inputs(c, 4321);
    const Tensor d_o = random_normal({c.B, c.T, c.HV, c.V}, DType::F32, 21);
    const Tensor d_final_state = random_normal({in.N, c.HV, c.K, c.V}, DType::F32, 22);
    const LinearGradTensors grads = poisoned_grads(c, in.N);
    linear_backward(c.cfg, in.args(Tensor()), d_o, d_final_state, grads.views());

    const std::vector<std::pair<Tensor, Tensor>> pairs = {
        {in.q, grads.dq},     {in.k, grads.dk},         {in.v, grads.dv},
        {in.g, grads.dg},     {in.beta, grads.dbeta},   {in.A_log, grads.dA_log},
        {in.dt_bias, grads.ddt_bias}, {in.initial_state, grads.dinitial_state}};
    const char* names[] = {"q", "k", "v", "g", "beta", "A_log", "dt_bias", "initial_state"};
    // h = 2^-16: a fixed decay γ_h acts on every token, so L is strongly curved along it (the
    // truncation error at 2^-12 is 2% for T = 200, at 2^-16 below 1e-5); the step actually taken by
    // the f32 inputs is read back, so its coarse rounding costs nothing.
    const double h = std::ldexp(1.0, -16);
    for (size_t pi = 0; pi < pairs.size(); ++pi) {
        Tensor x = pairs[pi].first;  // shares storage with `in`
        const Tensor& grad = pairs[pi].second;
        if (!x.defined()) continue;
        const Tensor x0 = x.clone();
        const Tensor dir = random_normal(x.sizes(), DType::F64, 100 + pi);
        auto shifted_loss = [&](double sign, Tensor& taken) {
            for (int64_t i = 0; i < x.numel(); ++i)
                store_from_double(x.data(), x.dtype(), i, element(x0, i) + sign * h * element(dir, i));
            taken = x.clone();
            return fd_loss(c, in, d_o, d_final_state);
        };
        Tensor xp, xm;
        const double lp = shifted_loss(+1, xp), lm = shifted_loss(-1, xm);
        x.copy_from(x0);
        double predicted = 0, magnitude = 0;
        for (int64_t i = 0; i < x.numel(); ++i) {
            const double term = element(grad, i) * (element(xp, i) - element(xm, i));
            predicted += term;
            magnitude += std::fabs(term);
        }
        EXPECT_NEAR(lp - lm, predicted, 1e-5 * magnitude) << GetParam().name << " d" << names[pi];
    }
}

INSTANTIATE_TEST_SUITE_P(SevenCellsAndOptions, ReferenceDirectionalDerivative,
                         ::testing::Values(fd_cells()[0], fd_cells()[1], fd_cells()[2], fd_cells()[3], fd_cells()[4],
                                           fd_cells()[5], fd_cells()[6], fd_cells()[8], fd_cells()[12],
                                           fd_cells()[13]),
                         [](const ::testing::TestParamInfo<FdCell>& info) { return info.param.name; });

// A gradient asked for alone equals the same gradient computed with all the others.
TEST(ReferenceBackward, GradientsAreIndependentlyOptional) {
    const LinearCase c = fd_case(fd_cells()[12]);  // gated_delta_rule_qwen3_next: every gradient exists
    const LinearInputs in = make_inputs(c, 5);
    const Tensor d_o = random_normal({c.B, c.T, c.HV, c.V}, DType::F32, 6);
    const LinearGradTensors all = poisoned_grads(c, in.N);
    linear_backward(c.cfg, in.args(Tensor()), d_o, Tensor(), all.views());
    const std::vector<Tensor LinearGradTensors::*> members = {
        &LinearGradTensors::dq,    &LinearGradTensors::dk,     &LinearGradTensors::dv,       &LinearGradTensors::dg,
        &LinearGradTensors::dbeta, &LinearGradTensors::dA_log, &LinearGradTensors::ddt_bias, &LinearGradTensors::dinitial_state};
    for (auto m : members) {
        LinearGradTensors one;
        one.*m = (all.*m).clone();
        (one.*m).fill(std::nan(""));
        linear_backward(c.cfg, in.args(Tensor()), d_o, Tensor(), one.views());
        const ErrorStats e = compare(one.*m, all.*m);
        EXPECT_TRUE(e.finite && e.max_abs == 0) << e.str();
    }
}

// Without d_final_state, dinitial_state is the gradient through the outputs only: zero when no
// token reads the state (empty sequence), and D-decayed otherwise.
TEST(ReferenceBackward, EmptySequencePassesFinalStateGradientThrough) {
    LinearCase c = fd_case(fd_cells()[6]);  // kda
    c.cu_seqlens = {0, 0, 9};
    const LinearInputs in = make_inputs(c, 8);
    const Tensor d_o = random_normal({c.B, c.T, c.HV, c.V}, DType::F32, 9);
    const Tensor d_final_state = random_normal({in.N, c.HV, c.K, c.V}, DType::F32, 10);
    LinearGradTensors g = poisoned_grads(c, in.N);
    linear_backward(c.cfg, in.args(Tensor()), d_o, d_final_state, g.views());
    const int64_t per_seq = c.HV * c.K * c.V;
    for (int64_t i = 0; i < per_seq; ++i)
        ASSERT_EQ(element(g.dinitial_state, i), element(d_final_state, i)) << "element " << i;
}

// ---- (b) state hand-off ----------------------------------------------------------------------------

// The tokens [t0, t0 + len) of a [B, T, ...] view: same strides, shifted data.
TensorView token_slice(const TensorView& x, int64_t t0, int64_t len) {
    TensorView s = x;
    if (!x.defined() || x.ndim < 2) return s;
    s.data = static_cast<char*>(x.data) + t0 * x.stride[1] * int64_t(dtype_size(x.dtype));
    s.shape[1] = len;
    return s;
}

struct Cell {
    std::string name;
    LinearConfig cfg;
};

void PrintTo(const Cell& cell, std::ostream* os) { *os << cell.name; }

std::vector<Cell> seven_cells() {
    return {{"linear_attn", linear_attn_config()},   {"lightning_attn", lightning_attn_config()},
            {"simple_gla", simple_gla_config()},     {"gla", gla_config()},
            {"delta_rule", delta_rule_config()},     {"gated_delta_rule", gated_delta_rule_config()},
            {"kda", kda_config()}};
}

LinearCase handoff_case(const Cell& cell) {
    LinearCase c;
    c.name = cell.name;
    c.cfg = reference(cell.cfg);
    c.B = 2;
    c.T = 1000;
    c.H = 1;
    c.HV = 2;
    c.K = 8;
    c.V = 8;
    c.initial_state = true;
    c.gate_min = -0.2;  // keep memory over hundreds of tokens so the hand-off matters
    c.gate_max = -0.001;
    return c;
}

class ReferenceHandOff : public ::testing::TestWithParam<Cell> {};

TEST_P(ReferenceHandOff, PiecesEqualOneCall) {
    const LinearCase c = handoff_case(GetParam());
    const LinearInputs in = make_inputs(c, 77);
    Tensor o_full({c.B, c.T, c.HV, c.V}, DType::F64);
    Tensor s_full = poisoned_state(c, in.N);
    linear_forward(c.cfg, in.args(o_full, &s_full));

    for (int64_t piece : {1, 7, 64, 500}) {
        Tensor o = poisoned_output(c).to(DType::F64);
        Tensor state = in.initial_state.clone();
        for (int64_t t0 = 0; t0 < c.T; t0 += piece) {
            const int64_t len = std::min(piece, c.T - t0);
            Tensor next = poisoned_state(c, in.N);
            LinearForwardArgs a = in.args(o, &next);
            for (TensorView* x : {&a.q, &a.k, &a.v, &a.beta, &a.o}) *x = token_slice(*x, t0, len);
            if (c.cfg.decay == Decay::Scalar || c.cfg.decay == Decay::Vector) a.g = token_slice(a.g, t0, len);
            a.initial_state = state;
            linear_forward(c.cfg, a);
            state = next;
        }
        // The state crosses each boundary in f32: up to 1000 roundings of 6e-8.
        expect_close_abs(GetParam().name + " o, pieces of " + std::to_string(piece), o, o_full, 1e-5);
        expect_close_abs(GetParam().name + " final state, pieces of " + std::to_string(piece), state, s_full, 1e-5);
    }
}

TEST_P(ReferenceHandOff, DecodeTokenByTokenEqualsOneCall) {
    const LinearCase c = handoff_case(GetParam());
    const LinearInputs in = make_inputs(c, 78);
    Tensor o_full({c.B, c.T, c.HV, c.V}, DType::F64);
    Tensor s_full = poisoned_state(c, in.N);
    linear_forward(c.cfg, in.args(o_full, &s_full));

    Tensor o = poisoned_output(c).to(DType::F64);
    Tensor state = in.initial_state.clone();  // slot n holds sequence n
    for (int64_t t = 0; t < c.T; ++t) {
        LinearDecodeArgs d;
        d.q = token_slice(in.q, t, 1);
        d.k = token_slice(in.k, t, 1);
        d.v = token_slice(in.v, t, 1);
        d.g = c.cfg.decay == Decay::Fixed ? in.g.view() : token_slice(in.g, t, 1);
        d.beta = token_slice(in.beta, t, 1);
        d.state = state;
        d.o = token_slice(o, t, 1);
        linear_decode(c.cfg, d);
    }
    expect_close_abs(GetParam().name + " decode o", o, o_full, 1e-5);
    expect_close_abs(GetParam().name + " decode state", state, s_full, 1e-5);
}

INSTANTIATE_TEST_SUITE_P(SevenCells, ReferenceHandOff, ::testing::ValuesIn(seven_cells()),
                         [](const ::testing::TestParamInfo<Cell>& info) { return info.param.name; });

// Decode with slots: sequence n uses slot state_indices[n]; a negative index leaves its o and every
// slot it does not own untouched. Each sequence must match a forward call from its slot's state.
TEST(ReferenceDecode, StateIndicesPermuteAndSkip) {
    LinearCase c;
    c.cfg = reference(kda_config());
    c.cfg.qk_l2norm = true;
    c.cfg.gate_activation = GateActivation::SoftplusDecay;
    c.B = 3;
    c.T = 5;
    c.H = 1;
    c.HV = 2;
    c.K = 4;
    c.V = 3;
    const LinearInputs in = make_inputs(c, 31);
    const int64_t slots = 5;
    const Tensor state0 = random_normal({slots, c.HV, c.K, c.V}, DType::F32, 32);
    for (DType index_dtype : {DType::I32, DType::I64}) {
        Tensor indices({3}, index_dtype);
        const int64_t idx[3] = {4, -1, 1};
        for (int i = 0; i < 3; ++i) store_from_double(indices.data(), index_dtype, i, double(idx[i]));
        Tensor state = state0.clone();
        Tensor o({c.B, c.T, c.HV, c.V}, DType::F32);
        o.fill(-7.0);  // a sentinel: the skipped sequence's rows must keep it
        LinearDecodeArgs d{in.q, in.k, in.v, in.g, in.beta, in.A_log, in.dt_bias, state, indices, o};
        linear_decode(c.cfg, d);

        const int64_t slot_numel = c.HV * c.K * c.V;
        const int64_t row_numel = c.T * c.HV * c.V;
        for (int64_t n = 0; n < c.B; ++n) {
            if (idx[n] < 0) {
                for (int64_t i = 0; i < row_numel; ++i) ASSERT_EQ(element(o, n * row_numel + i), -7.0);
                continue;
            }
            // The same sequence alone through linear_forward, from a copy of its slot.
            LinearCase one = c;
            one.B = 1;
            Tensor init({1, c.HV, c.K, c.V}, DType::F32);
            std::memcpy(init.data(), state0.ptr<float>() + idx[n] * slot_numel, size_t(slot_numel) * 4);
            Tensor o1({1, c.T, c.HV, c.V}, DType::F32), s1({1, c.HV, c.K, c.V}, DType::F32);
            LinearForwardArgs a = in.args(o1, &s1);
            for (TensorView* x : {&a.q, &a.k, &a.v, &a.g, &a.beta}) {
                x->data = static_cast<char*>(x->data) + n * x->stride[0] * int64_t(dtype_size(x->dtype));
                x->shape[0] = 1;
            }
            a.initial_state = init;
            linear_forward(c.cfg, a);
            for (int64_t i = 0; i < row_numel; ++i)
                EXPECT_NEAR(element(o, n * row_numel + i), element(o1, i), 1e-6) << "sequence " << n;
            for (int64_t i = 0; i < slot_numel; ++i)
                EXPECT_NEAR(element(state, idx[n] * slot_numel + i), element(s1, i), 1e-6) << "slot " << idx[n];
        }
        for (int64_t slot : {0, 2, 3})
            for (int64_t i = 0; i < slot_numel; ++i)
                ASSERT_EQ(element(state, slot * slot_numel + i), element(state0, slot * slot_numel + i))
                    << "untouched slot " << slot;
    }
}

// ---- (c) closed-form numbers -----------------------------------------------------------------------

// T = 2, K = V = 1, scale 1, one sequence, initial state s0 = 2:
//   gated delta:  t1: S' = ½·2 = 1, u = ½(3 − 1·1) = 1, S = 1 + 1·1 = 2,  o = 2·2 = 4
//                 t2: S' = ¼·2 = ½, u = 1·(1 − ½·½) = ¾, S = ½ + ½·¾ = 7/8, o = −1·7/8
//   simple GLA:   t1: S = ½·2 + 1·3 = 4, o = 8;   t2: S = ¼·4 + ½·1 = 3/2, o = −3/2
struct HandCase {
    LinearConfig cfg;
    double o1, o2, final_state;
};

TEST(ReferenceClosedForm, TwoTokensScalarStates) {
    const std::vector<HandCase> cases = {{gated_delta_rule_config(), 4.0, -0.875, 0.875},
                                         {simple_gla_config(), 8.0, -1.5, 1.5}};
    for (const HandCase& hc : cases) {
        LinearConfig cfg = reference(hc.cfg);
        cfg.scale = 1.0;
        float q[2] = {2, -1}, k[2] = {1, 0.5f}, v[2] = {3, 1}, beta[2] = {0.5f, 1};
        float g[2] = {float(std::log(0.5)), float(std::log(0.25))};
        float s0 = 2, s_out = 0;
        double o[2] = {0, 0};
        LinearForwardArgs a;
        a.q = TensorView(q, DType::F32, {1, 2, 1, 1});
        a.k = TensorView(k, DType::F32, {1, 2, 1, 1});
        a.v = TensorView(v, DType::F32, {1, 2, 1, 1});
        a.g = TensorView(g, DType::F32, {1, 2, 1});
        if (cfg.update == Update::Delta) a.beta = TensorView(beta, DType::F32, {1, 2, 1});
        a.initial_state = TensorView(&s0, DType::F32, {1, 1, 1, 1});
        a.o = TensorView(o, DType::F64, {1, 2, 1, 1});
        a.final_state = TensorView(&s_out, DType::F32, {1, 1, 1, 1});
        linear_forward(cfg, a);
        // g is log(½) rounded to f32: relative 3e-8 in the decay.
        EXPECT_NEAR(o[0], hc.o1, 1e-6);
        EXPECT_NEAR(o[1], hc.o2, 1e-6);
        EXPECT_NEAR(s_out, hc.final_state, 1e-6);
    }
}

// Default scale K^-½ and the grouped-head mapping: K = 4, q = (1,1,1,1), k = e_0 for head 0 and e_1
// for head 1, four value heads (G = 2). o_hv = ½ · ⟨q, k_{hv/2}⟩ · v_hv = ½ v_hv.
TEST(ReferenceClosedForm, DefaultScaleAndGroupedHeads) {
    float q[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    float k[8] = {1, 0, 0, 0, 0, 1, 0, 0};
    float v[4] = {2, -4, 6, 8};
    float o[4] = {};
    linear_attn(TensorView(q, DType::F32, {1, 1, 2, 4}), TensorView(k, DType::F32, {1, 1, 2, 4}),
                TensorView(v, DType::F32, {1, 1, 4, 1}), TensorView(o, DType::F32, {1, 1, 4, 1}),
                LinearOptions{.backend = Backend::Reference});
    for (int i = 0; i < 4; ++i) EXPECT_FLOAT_EQ(o[i], 0.5f * v[i]);
}

// GLA with K = 2, V = 1, T = 1: the vector decay multiplies the initial state per key channel. With
// s0 = (1, 1)ᵀ and g = (log ½, log ¼): S = (½ + k0 v, ¼ + k1 v) = (6.5, −1.75) and
// o = s (q0 S0 + q1 S1) = ½ (6.5 − 3.5).
TEST(ReferenceClosedForm, VectorDecayPerChannel) {
    float q[2] = {1, 2}, k[2] = {3, -1}, v[1] = {2};
    float g[2] = {float(std::log(0.5)), float(std::log(0.25))};
    float s0[2] = {1, 1}, s_out[2] = {};
    double o = 0;
    LinearConfig cfg = reference(gla_config());
    cfg.scale = 0.5;
    LinearForwardArgs a;
    a.q = TensorView(q, DType::F32, {1, 1, 1, 2});
    a.k = TensorView(k, DType::F32, {1, 1, 1, 2});
    a.v = TensorView(v, DType::F32, {1, 1, 1, 1});
    a.g = TensorView(g, DType::F32, {1, 1, 1, 2});
    a.initial_state = TensorView(s0, DType::F32, {1, 1, 2, 1});
    a.final_state = TensorView(s_out, DType::F32, {1, 1, 2, 1});
    a.o = TensorView(&o, DType::F64, {1, 1, 1, 1});
    linear_forward(cfg, a);
    EXPECT_NEAR(s_out[0], 0.5 + 6.0, 1e-6);
    EXPECT_NEAR(s_out[1], 0.25 - 2.0, 1e-6);
    EXPECT_NEAR(o, 0.5 * (1 * 6.5 + 2 * -1.75), 1e-6);
}

// The reference run in precision P, the yardstick of the tolerance policy: in f32 it is close to the
// fp64 oracle, in bf16 measurably further away.
TEST(ReferenceInPrecision, F32IsCloseAndBf16IsFurther) {
    LinearCase c;
    c.cfg = reference(gated_delta_rule_config());
    c.T = 200;
    c.K = c.V = 16;
    c.initial_state = true;
    const LinearInputs in = make_inputs(c, 3);
    Tensor o64({c.B, c.T, c.HV, c.V}, DType::F64);
    linear_forward(c.cfg, in.args(o64));
    Tensor o32 = poisoned_output(c), o16 = poisoned_output(c).to(DType::BF16);
    reference_forward_in_precision(c.cfg, in.args(o32), DType::F32);
    reference_forward_in_precision(c.cfg, in.args(o16), DType::BF16);
    const ErrorStats e32 = compare(o32, o64), e16 = compare(o16, o64);
    EXPECT_TRUE(e32.finite && e32.rel_rms < 1e-6) << e32.str();
    EXPECT_TRUE(e16.finite && e16.rel_rms > 10 * e32.rel_rms && e16.rel_rms < 0.05) << e16.str();
}

// ---- (d) bad input -----------------------------------------------------------------------------------

// Runs fn, expecting an hla::Error whose message contains every one of `parts`.
void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
    try {
        fn();
        ADD_FAILURE() << "no hla::Error thrown; expected one mentioning \"" << parts.front() << "\"";
    } catch (const Error& e) {
        const std::string msg = e.what();
        for (const std::string& part : parts)
            EXPECT_NE(msg.find(part), std::string::npos) << "message \"" << msg << "\" lacks \"" << part << "\"";
    }
}

// A valid call of one cell; each test breaks one thing.
struct ValidCall {
    LinearCase c;
    LinearInputs in;
    Tensor o, final_state;
    explicit ValidCall(LinearConfig cfg, bool varlen = false) {
        c.cfg = reference(cfg);
        c.B = varlen ? 1 : 2;
        c.T = 6;
        c.H = 2;
        c.HV = 4;
        c.K = 4;
        c.V = 3;
        if (varlen) c.cu_seqlens = {0, 2, 6};
        c.initial_state = true;
        in = make_inputs(c, 99);
        o = poisoned_output(c);
        final_state = poisoned_state(c, in.N);
    }
    LinearForwardArgs args() const { return in.args(o, &final_state); }
};

void forward_fails(const LinearConfig& cfg, const LinearForwardArgs& a, const std::vector<std::string>& parts) {
    expect_error([&] { linear_forward(cfg, a); }, parts);
}

TEST(ReferenceBadInput, ValidCallsPass) {
    for (const Cell& cell : seven_cells())
        for (bool varlen : {false, true}) {
            ValidCall v(cell.cfg, varlen);
            EXPECT_NO_THROW(linear_forward(v.c.cfg, v.args())) << cell.name;
        }
}

TEST(ReferenceBadInput, ShapesRanksAndHeads) {
    ValidCall v(gated_delta_rule_config());
    LinearForwardArgs a = v.args();
    a.q = TensorView();
    forward_fails(v.c.cfg, a, {"linear_forward", "q", "required"});
    a = v.args();
    a.q.ndim = 3;
    forward_fails(v.c.cfg, a, {"q", "rank 4"});
    a = v.args();
    a.v.ndim = 5;
    forward_fails(v.c.cfg, a, {"v", "rank 4"});
    a = v.args();
    a.v = TensorView();
    forward_fails(v.c.cfg, a, {"v", "rank 4"});
    a = v.args();
    a.q.shape[2] = 0;
    forward_fails(v.c.cfg, a, {"q", "H >= 1"});
    a = v.args();
    a.v.shape[3] = 0;
    forward_fails(v.c.cfg, a, {"v", "V >= 1"});
    // HV % H != 0: three value heads over two q/k heads (g, beta, o sized to match).
    ValidCall w(gated_delta_rule_config());
    a = w.args();
    a.v.shape[2] = 3;
    forward_fails(w.c.cfg, a, {"v", "multiple", "H = 2"});
    a = v.args();
    a.k.shape[2] = 1;  // mismatched heads between q and k
    forward_fails(v.c.cfg, a, {"k", "expected shape", "H=2"});
    a = v.args();
    a.k.shape[3] = 5;
    forward_fails(v.c.cfg, a, {"k", "K=4"});
    a = v.args();
    a.v.shape[1] = 5;
    forward_fails(v.c.cfg, a, {"v", "T=6"});
    a = v.args();
    a.o.shape[3] = 2;
    forward_fails(v.c.cfg, a, {"o", "V=3"});
    a = v.args();
    a.o = TensorView();
    forward_fails(v.c.cfg, a, {"o", "required"});
    a = v.args();
    a.beta.shape[2] = 2;
    forward_fails(v.c.cfg, a, {"beta", "HV=4"});
    a = v.args();
    a.g.ndim = 4;
    a.g.shape[3] = 4;
    forward_fails(v.c.cfg, a, {"g", "rank 3"});
}

TEST(ReferenceBadInput, DtypesDevicesStridesPointers) {
    ValidCall v(kda_config());
    LinearForwardArgs a = v.args();
    a.k.dtype = DType::I32;
    forward_fails(v.c.cfg, a, {"k", "dtype", "i32"});
    a = v.args();
    a.v.dtype = DType::F64;
    forward_fails(v.c.cfg, a, {"v", "dtype", "f64"});
    a = v.args();
    a.o.dtype = DType::I64;
    forward_fails(v.c.cfg, a, {"o", "dtype"});
    a = v.args();
    a.beta.dtype = DType::I32;
    forward_fails(v.c.cfg, a, {"beta", "dtype"});
    a = v.args();
    a.k.stride[3] = 2;
    forward_fails(v.c.cfg, a, {"k", "stride 1"});
    a = v.args();
    a.g.stride[3] = 3;
    forward_fails(v.c.cfg, a, {"g", "stride 1"});
    a = v.args();
    a.v.stride[1] = -1;
    forward_fails(v.c.cfg, a, {"v", "negative stride"});
    a = v.args();
    a.q.data = nullptr;
    forward_fails(v.c.cfg, a, {"q", "null data"});
    a = v.args();
    a.k.device = Device::CUDA;  // never dereferenced: the device check comes first
    forward_fails(v.c.cfg, a, {"k", "expected a tensor on cpu"});
    a = v.args();
    a.k.device_index = 1;
    forward_fails(v.c.cfg, a, {"k", "cpu:0"});
    LinearConfig cuda = v.c.cfg;
    cuda.backend = Backend::Cuda;
    forward_fails(cuda, v.args(), {"backend", "cuda"});
    LinearConfig bad_scale = v.c.cfg;
    bad_scale.scale = std::nan("");
    forward_fails(bad_scale, v.args(), {"scale", "finite"});
}

TEST(ReferenceBadInput, GatesBetaAndActivations) {
    {
        ValidCall v(linear_attn_config());
        ValidCall gated(gla_config());
        LinearForwardArgs a = v.args();
        a.g = gated.in.g;
        forward_fails(v.c.cfg, a, {"g", "not expected"});
        ValidCall delta(delta_rule_config());
        a = v.args();
        a.beta = delta.in.beta;
        forward_fails(v.c.cfg, a, {"beta", "not expected"});
    }
    {
        ValidCall v(gla_config());
        LinearForwardArgs a = v.args();
        a.g = TensorView();
        forward_fails(v.c.cfg, a, {"g", "required"});
    }
    {
        ValidCall v(lightning_attn_config());
        LinearForwardArgs a = v.args();
        a.g.dtype = DType::BF16;
        forward_fails(v.c.cfg, a, {"g", "f32"});
        a = v.args();
        a.g.shape[0] = 2;
        forward_fails(v.c.cfg, a, {"g", "HV=4"});
        LinearConfig cfg = v.c.cfg;
        cfg.gate_activation = GateActivation::SoftplusDecay;
        forward_fails(cfg, v.args(), {"gate_activation", "fixed"});
    }
    {
        ValidCall v(delta_rule_config());
        LinearForwardArgs a = v.args();
        a.beta = TensorView();
        forward_fails(v.c.cfg, a, {"beta", "required"});
        LinearConfig cfg = v.c.cfg;
        cfg.gate_activation = GateActivation::BoundedSigmoid;
        forward_fails(cfg, v.args(), {"gate_activation", "none"});
    }
    {
        ValidCall v(simple_gla_config());
        LinearConfig cfg = v.c.cfg;
        cfg.beta_activation = BetaActivation::Sigmoid;
        forward_fails(cfg, v.args(), {"beta_activation"});
    }
    LinearConfig gdn = gated_delta_rule_config();
    gdn.gate_activation = GateActivation::SoftplusDecay;
    {
        ValidCall v(gdn);
        LinearForwardArgs a = v.args();
        a.A_log = TensorView();
        forward_fails(v.c.cfg, a, {"A_log", "required"});
        a = v.args();
        a.dt_bias = TensorView();
        forward_fails(v.c.cfg, a, {"dt_bias", "required"});
        a = v.args();
        a.dt_bias.ndim = 2;
        a.dt_bias.shape[1] = 4;
        forward_fails(v.c.cfg, a, {"dt_bias", "rank 1"});
        a = v.args();
        a.A_log.dtype = DType::BF16;
        forward_fails(v.c.cfg, a, {"A_log", "f32"});
        // A_log / dt_bias given without an activation
        ValidCall plain(gated_delta_rule_config());
        a = plain.args();
        a.A_log = v.in.A_log;
        forward_fails(plain.c.cfg, a, {"A_log", "not expected"});
        a = plain.args();
        a.dt_bias = v.in.dt_bias;
        forward_fails(plain.c.cfg, a, {"dt_bias", "not expected"});
    }
    LinearConfig kda = kda_config();
    kda.gate_activation = GateActivation::BoundedSigmoid;
    {
        ValidCall v(kda);
        LinearForwardArgs a = v.args();
        a.dt_bias.ndim = 1;  // [HV] where the vector gate needs [HV, K]
        forward_fails(v.c.cfg, a, {"dt_bias", "rank 2"});
        for (float lb : {0.0f, -5.5f, 1.0f}) {
            LinearConfig cfg = v.c.cfg;
            cfg.lower_bound = lb;
            forward_fails(cfg, v.args(), {"lower_bound"});
        }
    }
}

TEST(ReferenceBadInput, CuSeqlens) {
    ValidCall v(gla_config(), true);
    auto with_offsets = [&](std::vector<int64_t> off, DType dtype) {
        Tensor t({int64_t(off.size())}, dtype);
        for (size_t i = 0; i < off.size(); ++i) store_from_double(t.data(), dtype, int64_t(i), double(off[i]));
        return t;
    };
    LinearForwardArgs a = v.args();
    const Tensor not_zero = with_offsets({1, 2, 6}, DType::I32);
    a.cu_seqlens = not_zero;
    forward_fails(v.c.cfg, a, {"cu_seqlens", "cu_seqlens[0] == 0"});
    const Tensor decreasing = with_offsets({0, 4, 2, 6}, DType::I64);
    a.cu_seqlens = decreasing;
    a.initial_state = TensorView();
    a.final_state = TensorView();
    forward_fails(v.c.cfg, a, {"cu_seqlens", "non-decreasing"});
    const Tensor short_end = with_offsets({0, 2, 5}, DType::I32);
    a = v.args();
    a.cu_seqlens = short_end;
    forward_fails(v.c.cfg, a, {"cu_seqlens", "T = 6"});
    const Tensor one_entry = with_offsets({0}, DType::I64);
    a.cu_seqlens = one_entry;
    forward_fails(v.c.cfg, a, {"cu_seqlens", "at least 2"});
    const Tensor floats = Tensor({3}, DType::F32);
    a.cu_seqlens = floats;
    forward_fails(v.c.cfg, a, {"cu_seqlens", "i32 | i64"});
    Tensor rank2({1, 3}, DType::I32);
    a.cu_seqlens = rank2;
    forward_fails(v.c.cfg, a, {"cu_seqlens", "rank 1"});
    // B != 1 with cu_seqlens
    ValidCall padded(gla_config());
    const Tensor ok = with_offsets({0, 2, 6}, DType::I32);
    a = padded.args();
    a.cu_seqlens = ok;
    forward_fails(padded.c.cfg, a, {"cu_seqlens", "B == 1", "B = 2"});
    // N from cu_seqlens sizes the states: 3 sequences, states sized for 2
    const Tensor three = with_offsets({0, 2, 2, 6}, DType::I64);
    a = v.args();
    a.cu_seqlens = three;
    forward_fails(v.c.cfg, a, {"initial_state", "N=3"});
}

TEST(ReferenceBadInput, States) {
    ValidCall v(gated_delta_rule_config());
    LinearForwardArgs a = v.args();
    a.initial_state.shape[1] = 2;
    forward_fails(v.c.cfg, a, {"initial_state", "HV=4"});
    a = v.args();
    a.initial_state.dtype = DType::BF16;
    forward_fails(v.c.cfg, a, {"initial_state", "f32"});
    a = v.args();
    a.initial_state.ndim = 3;
    forward_fails(v.c.cfg, a, {"initial_state", "rank 4"});
    a = v.args();
    a.final_state.shape[2] = 3;  // K and V swapped
    a.final_state.shape[3] = 4;
    forward_fails(v.c.cfg, a, {"final_state", "K=4"});
    a = v.args();
    a.final_state.dtype = DType::F64;
    forward_fails(v.c.cfg, a, {"final_state", "f32"});
}

TEST(ReferenceBadInput, NamedEntryPointsNameThemselves) {
    ValidCall v(gated_delta_rule_config());
    LinearOptions opt;
    opt.backend = Backend::Reference;
    TensorView bad_k = v.in.k;
    bad_k.shape[3] = 2;
    expect_error([&] { gated_delta_rule(v.in.q, bad_k, v.in.v, v.in.g, v.in.beta, v.o, opt); },
                 {"gated_delta_rule: k:"});
    expect_error([&] { delta_rule(v.in.q, v.in.k, v.in.v, TensorView(), v.o, opt); }, {"delta_rule: beta:"});
    expect_error([&] { linear_attn(v.in.q, bad_k, v.in.v, v.o, opt); }, {"linear_attn: k:"});
    ValidCall gated(gla_config());
    expect_error([&] { simple_gla(v.in.q, v.in.k, v.in.v, gated.in.g, v.o, opt); }, {"simple_gla: g:"});
    expect_error([&] { gla(v.in.q, v.in.k, v.in.v, v.in.g, v.o, opt); }, {"gla: g:"});
    expect_error([&] { kda(v.in.q, v.in.k, v.in.v, v.in.g, v.in.beta, v.o, opt); }, {"kda: g:"});
    expect_error([&] { lightning_attn(v.in.q, v.in.k, v.in.v, v.in.g, v.o, opt); }, {"lightning_attn: g:"});
    LinearOptions states = opt;
    states.initial_state = v.in.v;  // a [B, T, HV, V] tensor where [N, HV, K, V] f32 belongs
    expect_error([&] { linear_attn(v.in.q, v.in.k, v.in.v, v.o, states); }, {"linear_attn: initial_state:"});
}

TEST(ReferenceBadInput, BackwardArguments) {
    LinearConfig cfg = gated_delta_rule_config();
    cfg.gate_activation = GateActivation::SoftplusDecay;
    ValidCall v(cfg);
    const Tensor d_o = random_normal({v.c.B, v.c.T, v.c.HV, v.c.V}, DType::F32, 1);
    const Tensor d_fs = random_normal({v.in.N, v.c.HV, v.c.K, v.c.V}, DType::F32, 2);
    const LinearGradTensors g = poisoned_grads(v.c, v.in.N);
    // args.o is given: without it linear_backward checks d_o in o's place and names it "o".
    auto fails = [&](const LinearConfig& c, const TensorView& dO, const TensorView& dFs, const LinearGrads& gr,
                     const std::vector<std::string>& parts) {
        expect_error([&] { linear_backward(c, v.in.args(v.o), dO, dFs, gr); }, parts);
    };
    EXPECT_NO_THROW(linear_backward(v.c.cfg, v.in.args(v.o), d_o, d_fs, g.views()));
    TensorView bad = d_o;
    bad.shape[3] = 2;
    fails(v.c.cfg, bad, d_fs, g.views(), {"linear_backward", "d_o", "V=3"});
    fails(v.c.cfg, TensorView(), d_fs, g.views(), {"d_o", "required"});
    bad = d_fs;
    bad.dtype = DType::BF16;
    fails(v.c.cfg, d_o, bad, g.views(), {"d_final_state", "f32"});
    LinearGrads gr = g.views();
    gr.dq.shape[2] = 4;
    fails(v.c.cfg, d_o, d_fs, gr, {"dq", "H=2"});
    gr = g.views();
    gr.dk.dtype = DType::I32;
    fails(v.c.cfg, d_o, d_fs, gr, {"dk", "dtype"});
    gr = g.views();
    gr.dv.stride[3] = 2;
    fails(v.c.cfg, d_o, d_fs, gr, {"dv", "stride 1"});
    gr = g.views();
    gr.dg.ndim = 4;
    gr.dg.shape[3] = 4;
    fails(v.c.cfg, d_o, d_fs, gr, {"dg", "rank 3"});
    gr = g.views();
    gr.dbeta.dtype = DType::BF16;
    fails(v.c.cfg, d_o, d_fs, gr, {"dbeta", "f32"});
    gr = g.views();
    gr.dA_log.shape[0] = 1;
    fails(v.c.cfg, d_o, d_fs, gr, {"dA_log", "HV=4"});
    gr = g.views();
    gr.ddt_bias.ndim = 2;
    gr.ddt_bias.shape[1] = 4;
    fails(v.c.cfg, d_o, d_fs, gr, {"ddt_bias", "rank 1"});
    gr = g.views();
    gr.dinitial_state.shape[0] = 3;
    fails(v.c.cfg, d_o, d_fs, gr, {"dinitial_state", "N=2"});

    // Gradients a configuration does not have.
    ValidCall additive(linear_attn_config());
    LinearGrads extra;
    extra.dg = g.dg;
    expect_error([&] { linear_backward(additive.c.cfg, additive.in.args(Tensor()), d_o, Tensor(), extra); },
                 {"dg", "not expected"});
    extra = LinearGrads();
    extra.dbeta = g.dbeta;
    expect_error([&] { linear_backward(additive.c.cfg, additive.in.args(Tensor()), d_o, Tensor(), extra); },
                 {"dbeta", "additive"});
    ValidCall no_act(gated_delta_rule_config());
    extra = LinearGrads();
    extra.dA_log = g.dA_log;
    expect_error([&] { linear_backward(no_act.c.cfg, no_act.in.args(Tensor()), d_o, Tensor(), extra); },
                 {"dA_log", "no in-kernel gate"});
    // The forward's own checks apply to the backward's inputs too.
    LinearForwardArgs a = v.in.args(Tensor());
    a.q.shape[3] = 5;
    expect_error([&] { linear_backward(v.c.cfg, a, d_o, d_fs, g.views()); }, {"linear_backward", "k"});
}

TEST(ReferenceBadInput, Decode) {
    LinearCase c;
    c.cfg = reference(gated_delta_rule_config());
    c.B = 3;
    c.T = 1;
    c.H = 2;
    c.HV = 4;
    c.K = 4;
    c.V = 4;
    const LinearInputs in = make_inputs(c, 4);
    Tensor state = Tensor::zeros({3, c.HV, c.K, c.V}, DType::F32);
    Tensor o = poisoned_output(c);
    const LinearDecodeArgs ok{in.q, in.k, in.v, in.g, in.beta, TensorView(), TensorView(), state, TensorView(), o};
    EXPECT_NO_THROW(linear_decode(c.cfg, ok));
    auto fails = [&](const LinearDecodeArgs& d, const std::vector<std::string>& parts) {
        expect_error([&] { linear_decode(c.cfg, d); }, parts);
    };
    LinearDecodeArgs d = ok;
    d.q.ndim = 3;
    fails(d, {"linear_decode", "q", "rank 4"});
    d = ok;
    d.v = TensorView();
    fails(d, {"v", "rank 4"});
    d = ok;
    d.v.shape[2] = 3;
    fails(d, {"v", "multiple"});
    d = ok;
    d.k.shape[0] = 2;
    fails(d, {"k", "N=3"});
    d = ok;
    d.state = TensorView();
    fails(d, {"state", "rank 4"});
    d = ok;
    d.state.dtype = DType::BF16;
    fails(d, {"state", "f32"});
    d = ok;
    d.state.shape[1] = 2;
    fails(d, {"state", "HV=4"});
    Tensor wide = Tensor::zeros({3, c.HV, c.K, 2 * c.V}, DType::F32);
    d = ok;
    d.state = TensorView::strided(wide.data(), DType::F32, {3, c.HV, c.K, c.V},
                                  {c.HV * c.K * 2 * c.V, c.K * 2 * c.V, 2 * c.V, 1});
    fails(d, {"state", "contiguous"});
    Tensor two_slots = Tensor::zeros({2, c.HV, c.K, c.V}, DType::F32);
    d = ok;
    d.state = two_slots;
    fails(d, {"state", "S >= N = 3"});
    Tensor idx_f({3}, DType::F32);
    d = ok;
    d.state_indices = idx_f;
    fails(d, {"state_indices", "dtype"});
    Tensor idx_short({2}, DType::I32);
    d = ok;
    d.state_indices = idx_short;
    fails(d, {"state_indices", "N=3"});
    Tensor idx_far({3}, DType::I64);
    for (int i = 0; i < 3; ++i) idx_far.ptr<int64_t>()[i] = i == 2 ? 3 : i;
    d = ok;
    d.state_indices = idx_far;
    fails(d, {"state_indices", "3 slots"});
    d = ok;
    d.beta = TensorView();
    fails(d, {"beta", "required"});
    d = ok;
    d.g.shape[1] = 2;
    fails(d, {"g", "T=1"});
}

}  // namespace
}  // namespace hla::test
