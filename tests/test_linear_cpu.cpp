// The chunked CPU backend of the linear family (Backend::Cpu) against the fp64 reference.
//
// Every cell × {f32, bf16} × stress scenario (DESIGN.md "Numerics"): T = 1, T not a multiple of the
// 64-token chunk, varlen with empty sequences, large initial states, g = −1000 and long runs of
// strongly negative gates (also alternating with near-zero runs), β exactly 0 or 1, grouped heads, K ≠ V, in-kernel norm and activations,
// q/k/v as strided slices of one fused projection, a strided initial state.
//
// Tolerances:
//   forward   the policy: err(cpu) ≤ 2·err(reference run in P) + 1e-5 (relative RMS vs fp64).
//   backward  f32: relative RMS ≤ 2e-4 per gradient (the chunked backward reorders fp32 sums over
//             up to 64·K terms and recomputes states; far below any real bug, which lands at O(1)).
//             bf16: ≤ 4·e_P + 4e-3, e_P the forward's reference-in-bf16 error on the same inputs:
//             the adjoint runs the same recurrence transposed, so its conditioning — and therefore
//             its error in P — is that of the forward; ×4 = the policy's 2 × a second pass (recompute
//             and reverse sweep), 4e-3 = 2× the RMS of rounding dq/dk/dv to bf16 (2^-9/√3 ≈ 1.1e-3).
//   decode    f32: 1e-5 (a few fp32 steps); bf16 o: 2^-8 (its own rounding to bf16), state 1e-5.
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "support/linear_case.hpp"

namespace hla::test {
namespace {

struct Cell {
    std::string name;
    LinearConfig cfg;
};

const std::vector<Cell>& seven_cells() {
    static const std::vector<Cell> cells = {
        {"linear_attn", linear_attn_config()},   {"lightning_attn", lightning_attn_config()},
        {"simple_gla", simple_gla_config()},     {"gla", gla_config()},
        {"delta_rule", delta_rule_config()},     {"gated_delta_rule", gated_delta_rule_config()},
        {"kda", kda_config()}};
    return cells;
}

bool per_token_decay(const LinearConfig& c) { return c.decay == Decay::Scalar || c.decay == Decay::Vector; }
bool delta(const LinearConfig& c) { return c.update == Update::Delta; }

// A stress scenario: edits the base case and returns false where it does not apply to the cell.
struct Scenario {
    std::string name;
    std::function<bool(LinearCase&)> setup;
    bool binary_beta = false;     // β exactly 0 or 1, at random
    bool fused_qkv = false;       // q, k, v strided slices of one [B, T, 2·H·K + HV·V] buffer
    bool strided_state = false;   // initial_state a slice of a wider buffer (inner strides free)
    bool gate_runs = false;       // alternating 24-token runs of log decay in [−20, −10] and [−0.05, 0)
};

std::vector<Scenario> scenarios() {
    return {
        {"t1", [](LinearCase& c) {
             c.T = 1;
             c.initial_state = true;
             return true;
         }},
        {"t100_grouped", [](LinearCase& c) {
             c.T = 100;
             return true;
         }},
        {"t200_k64_v32", [](LinearCase& c) {
             c.T = 200;
             c.K = 64;
             c.HV = c.H;  // G = 1
             c.initial_state = true;
             return true;
         }},
        {"varlen_empty", [](LinearCase& c) {
             c.B = 1;
             c.T = 150;
             c.cu_seqlens = {0, 0, 37, 37, 150, 150};  // empty first, middle and last
             c.initial_state = true;
             return true;
         }},
        {"varlen_all_empty", [](LinearCase& c) {
             c.B = 1;
             c.T = 0;
             c.cu_seqlens = {0, 0, 0};  // no token at all: the final state is the initial one
             c.initial_state = true;
             return true;
         }},
        {"t0", [](LinearCase& c) {
             c.T = 0;  // batch rows without tokens
             c.initial_state = true;
             return true;
         }},
        {"state_x100", [](LinearCase& c) {
             c.T = 100;
             c.initial_state = true;
             c.initial_state_scale = 100;
             return true;
         }},
        {"g_minus_1000", [](LinearCase& c) {
             c.T = 100;
             c.initial_state = true;
             c.gate_min = c.gate_max = -1000;
             return c.cfg.decay != Decay::None;
         }},
        {"strong_gates", [](LinearCase& c) {
             c.T = 130;
             c.initial_state = true;
             c.gate_min = -20;  // every token: over a 64-token chunk the cumulative decay reaches e^-1280
             c.gate_max = -5;
             return c.cfg.decay != Decay::None;
         }},
        {"gate_runs", [](LinearCase& c) {
             // Runs that straddle the 16-token blocks and 64-token chunks: a block's decay relative to
             // a reference point before a deep run underflows while the tokens after it still matter.
             c.T = 200;
             c.initial_state = true;
             return per_token_decay(c.cfg);
         },
         false, false, false, true},
        {"block_decay_threshold", [](LinearCase& c) {
             // 16 tokens of log decay in [−3.1, −2.5] sum to −45 on average, and in the deepest of the
             // case's 16 channels to about ln(1e-20) = −46: some diagonal blocks are matrix products
             // with 1/W near 1e20, their neighbours take the per-pair products (vector decay).
             c.T = 130;
             c.initial_state = true;
             c.gate_min = -3.1;
             c.gate_max = -2.5;
             return per_token_decay(c.cfg);
         }},
        {"beta_0_1", [](LinearCase& c) {
             c.T = 100;
             c.initial_state = true;
             return delta(c.cfg);
         },
         true},
        {"qk_l2norm", [](LinearCase& c) {
             c.T = 100;
             c.cfg.qk_l2norm = true;
             return true;
         }},
        {"softplus_gate", [](LinearCase& c) {
             c.T = 100;
             c.initial_state = true;
             c.cfg.gate_activation = GateActivation::SoftplusDecay;
             if (delta(c.cfg)) {
                 c.cfg.beta_activation = BetaActivation::Sigmoid;
                 c.beta_min = -4;
                 c.beta_max = 4;
             }
             return per_token_decay(c.cfg);
         }},
        {"bounded_gate", [](LinearCase& c) {
             c.T = 100;
             c.cfg.qk_l2norm = true;
             c.cfg.gate_activation = GateActivation::BoundedSigmoid;
             c.cfg.lower_bound = -5.0f;
             if (delta(c.cfg)) {
                 c.cfg.beta_activation = BetaActivation::Sigmoid2x;
                 c.beta_min = -4;
                 c.beta_max = 4;
             }
             return per_token_decay(c.cfg);
         }},
        {"fused_qkv", [](LinearCase& c) {
             c.T = 100;
             c.initial_state = true;
             return true;
         },
         false, true},
        {"strided_state", [](LinearCase& c) {
             c.T = 70;
             c.initial_state = true;
             return true;
         },
         false, false, true},
    };
}

struct CpuCase {
    std::string name;
    Scenario scenario;
    LinearCase c;
};

void PrintTo(const CpuCase& c, std::ostream* os) { *os << c.name; }

std::vector<CpuCase> cpu_cases() {
    std::vector<CpuCase> out;
    for (const Scenario& s : scenarios())
        for (const Cell& cell : seven_cells())
            for (DType dtype : {DType::F32, DType::BF16}) {
                LinearCase c;
                c.cfg = cell.cfg;
                c.dtype = dtype;
                c.B = 2;
                c.H = 2;
                c.HV = 4;  // grouped value heads unless the scenario says otherwise
                c.K = 32;
                c.V = 32;
                if (!s.setup(c)) continue;
                c.name = s.name + "_" + cell.name + "_" + dtype_name(dtype);
                out.push_back({c.name, s, c});
            }
    return out;
}

uint64_t seed_of(const std::string& name) {
    uint64_t h = 1469598103934665603ull;  // FNV-1a: a stable seed per case name
    for (char ch : name) h = (h ^ uint8_t(ch)) * 1099511628211ull;
    return h;
}

LinearConfig on(LinearConfig c, Backend b) {
    c.backend = b;
    return c;
}

// The inputs of one case, with the scenario's layout applied; owns every buffer the views point to.
struct Prepared {
    LinearCase c;
    LinearInputs in;
    Tensor fused, wide_state;
    TensorView q, k, v, initial_state;

    explicit Prepared(const CpuCase& cc) : c(cc.c), in(make_inputs(cc.c, seed_of(cc.name))) {
        q = in.q;
        k = in.k;
        v = in.v;
        initial_state = in.initial_state;
        if (cc.scenario.binary_beta) {
            std::mt19937_64 rng(seed_of(cc.name) + 1);
            for (int64_t i = 0; i < in.beta.numel(); ++i) store_from_double(in.beta.data(), in.beta.dtype(), i, double(rng() & 1));
        }
        if (cc.scenario.gate_runs) make_gate_runs(seed_of(cc.name) + 4);
        if (cc.scenario.fused_qkv) make_fused();
        if (cc.scenario.strided_state) make_strided_state();
    }

    // Channel c of token t is in a deep run when (t / 24 + c) is even (vector decay: channels alternate).
    void make_gate_runs(uint64_t seed) {
        std::mt19937_64 rng(seed);
        std::uniform_real_distribution<double> deep(-20.0, -10.0), shallow(-0.05, -0.001);
        const int64_t W = c.cfg.decay == Decay::Vector ? c.K : 1;
        for (int64_t b = 0; b < c.B; ++b)
            for (int64_t t = 0; t < c.T; ++t)
                for (int64_t h = 0; h < c.HV; ++h)
                    for (int64_t w = 0; w < W; ++w) {
                        const double g = (t / 24 + w) % 2 == 0 ? deep(rng) : shallow(rng);
                        store_from_double(in.g.data(), in.g.dtype(), ((b * c.T + t) * c.HV + h) * W + w, g);
                    }
    }

    // One projection output per token, [q heads | k heads | v heads], as a fused QKV matmul writes it.
    void make_fused() {
        const int64_t HK = c.H * c.K, F = 2 * HK + c.HV * c.V;
        const size_t es = dtype_size(c.dtype);
        fused = Tensor({c.B, c.T, F}, c.dtype);
        char* base = static_cast<char*>(fused.data());
        for (int64_t bt = 0; bt < c.B * c.T; ++bt) {
            std::memcpy(base + (bt * F) * es, static_cast<char*>(in.q.data()) + bt * HK * es, size_t(HK) * es);
            std::memcpy(base + (bt * F + HK) * es, static_cast<char*>(in.k.data()) + bt * HK * es, size_t(HK) * es);
            std::memcpy(base + (bt * F + 2 * HK) * es, static_cast<char*>(in.v.data()) + bt * c.HV * c.V * es,
                        size_t(c.HV * c.V) * es);
        }
        q = TensorView::strided(base, c.dtype, {c.B, c.T, c.H, c.K}, {c.T * F, F, c.K, 1});
        k = TensorView::strided(base + HK * es, c.dtype, {c.B, c.T, c.H, c.K}, {c.T * F, F, c.K, 1});
        v = TensorView::strided(base + 2 * HK * es, c.dtype, {c.B, c.T, c.HV, c.V}, {c.T * F, F, c.V, 1});
    }

    // [N, HV, K, V] inside [N, HV, K, V + 8]: rows padded, so only the innermost stride is 1.
    void make_strided_state() {
        const int64_t N = in.N, W = c.V + 8;
        wide_state = Tensor::zeros({N, c.HV, c.K, W}, DType::F32);
        for (int64_t r = 0; r < N * c.HV * c.K; ++r)
            std::memcpy(wide_state.ptr<float>() + r * W, in.initial_state.ptr<float>() + r * c.V, size_t(c.V) * 4);
        initial_state = TensorView::strided(wide_state.data(), DType::F32, {N, c.HV, c.K, c.V},
                                            {c.HV * c.K * W, c.K * W, W, 1});
    }

    LinearForwardArgs args(const Tensor& o, const Tensor* final_state = nullptr) const {
        LinearForwardArgs a = in.args(o, final_state);
        a.q = q;
        a.k = k;
        a.v = v;
        a.initial_state = initial_state;
        return a;
    }
};

struct ForwardResults {
    Tensor o64, s64, o_p, s_p;  // fp64 reference; reference run in the case's precision
};

ForwardResults reference_forward(const Prepared& pr) {
    const LinearCase& c = pr.c;
    ForwardResults r;
    r.o64 = poisoned_output(c).to(DType::F64);
    r.s64 = poisoned_state(c, pr.in.N);
    linear_forward(on(c.cfg, Backend::Reference), pr.args(r.o64, &r.s64));
    r.o_p = poisoned_output(c);
    r.s_p = poisoned_state(c, pr.in.N);
    reference_forward_in_precision(c.cfg, pr.args(r.o_p, &r.s_p), c.dtype);
    return r;
}

class LinearCpu : public ::testing::TestWithParam<CpuCase> {};

TEST_P(LinearCpu, ForwardMatchesReference) {
    const Prepared pr(GetParam());
    const LinearCase& c = pr.c;
    const ForwardResults ref = reference_forward(pr);
    Tensor o = poisoned_output(c), s = poisoned_state(c, pr.in.N);
    linear_forward(on(c.cfg, Backend::Cpu), pr.args(o, &s));
    expect_close(c.name + " o", o, ref.o64, ref.o_p);
    expect_close(c.name + " final_state", s, ref.s64, ref.s_p);
}

TEST_P(LinearCpu, BackwardMatchesReference) {
    const Prepared pr(GetParam());
    const LinearCase& c = pr.c;
    const uint64_t seed = seed_of(c.name);
    const Tensor d_o = random_normal({c.B, c.T, c.HV, c.V}, c.dtype, seed + 2);
    // With an initial state the final state is an output too: its gradient flows back.
    const Tensor d_fs = c.initial_state ? random_normal({pr.in.N, c.HV, c.K, c.V}, DType::F32, seed + 3) : Tensor();

    LinearCase c64 = c;
    c64.dtype = DType::F64;  // the reference's dq, dk, dv in fp64
    const LinearGradTensors ref = poisoned_grads(c64, pr.in.N);
    linear_backward(on(c.cfg, Backend::Reference), pr.args(Tensor()), d_o, d_fs, ref.views());
    const LinearGradTensors got = poisoned_grads(c, pr.in.N);
    linear_backward(on(c.cfg, Backend::Cpu), pr.args(Tensor()), d_o, d_fs, got.views());

    double tol = 2e-4;
    if (c.dtype != DType::F32) {
        const ForwardResults fwd = reference_forward(pr);
        tol = 4 * compare(fwd.o_p, fwd.o64).rel_rms + 4e-3;
    }
    expect_grads_close(c.name, got, ref, tol);
}

INSTANTIATE_TEST_SUITE_P(CellsDtypesScenarios, LinearCpu, ::testing::ValuesIn(cpu_cases()),
                         [](const ::testing::TestParamInfo<CpuCase>& info) { return info.param.name; });

// ---- decode ------------------------------------------------------------------------------------------

struct DecodeCase {
    std::string name;
    LinearConfig cfg;
    DType dtype;
    int64_t T;
};

void PrintTo(const DecodeCase& c, std::ostream* os) { *os << c.name; }

std::vector<DecodeCase> decode_cases() {
    std::vector<DecodeCase> out;
    for (const Cell& cell : seven_cells()) {
        std::vector<std::pair<std::string, LinearConfig>> variants = {{cell.name, cell.cfg}};
        if (per_token_decay(cell.cfg)) {
            // The model configurations: Qwen3-Next (GDN) and Kimi Linear (KDA) compute gate and β in kernel.
            LinearConfig m = cell.cfg;
            m.qk_l2norm = true;
            m.gate_activation = GateActivation::SoftplusDecay;
            if (delta(m)) m.beta_activation = BetaActivation::Sigmoid;
            variants.push_back({cell.name + "_model_gates", m});
        }
        for (const auto& [name, cfg] : variants)
            for (DType dtype : {DType::F32, DType::BF16})
                for (int64_t T : {1, 3})
                    out.push_back({name + "_" + dtype_name(dtype) + "_t" + std::to_string(T), cfg, dtype, T});
    }
    return out;
}

class LinearCpuDecode : public ::testing::TestWithParam<DecodeCase> {};

// Four sequences over six state slots: permuted slots and one skipped sequence (index −1). The
// skipped sequence's o rows keep their sentinel and the slots nobody owns stay as they were.
TEST_P(LinearCpuDecode, MatchesReference) {
    const DecodeCase& dc = GetParam();
    LinearCase c;
    c.cfg = dc.cfg;
    c.dtype = dc.dtype;
    c.B = 4;
    c.T = dc.T;
    c.H = 2;
    c.HV = 4;
    c.K = 32;
    c.V = 32;
    c.gate_min = -2;
    if (delta(c.cfg) && c.cfg.beta_activation != BetaActivation::None) {
        c.beta_min = -4;
        c.beta_max = 4;
    }
    const uint64_t seed = seed_of(dc.name);
    const LinearInputs in = make_inputs(c, seed);
    const int64_t slots = 6;
    const Tensor state0 = random_normal({slots, c.HV, c.K, c.V}, DType::F32, seed + 1);
    // i32 indices for single-token steps, i64 for multi-token ones: both dtypes are exercised.
    const DType index_dtype = dc.T == 1 ? DType::I32 : DType::I64;
    const int64_t idx[4] = {3, -1, 0, 5};
    Tensor indices({4}, index_dtype);
    for (int i = 0; i < 4; ++i) store_from_double(indices.data(), index_dtype, i, double(idx[i]));

    const double sentinel = 3.0;  // exact in every dtype
    Tensor state_ref = state0.clone(), o_ref({c.B, c.T, c.HV, c.V}, DType::F64);
    o_ref.fill(sentinel);
    linear_decode(on(c.cfg, Backend::Reference),
                  {in.q, in.k, in.v, in.g, in.beta, in.A_log, in.dt_bias, state_ref, indices, o_ref});
    Tensor state = state0.clone(), o({c.B, c.T, c.HV, c.V}, c.dtype);
    o.fill(sentinel);
    linear_decode(on(c.cfg, Backend::Cpu), {in.q, in.k, in.v, in.g, in.beta, in.A_log, in.dt_bias, state, indices, o});

    // The reference keeps the skipped rows at the sentinel, so any row the CPU path writes there
    // (or fails to write elsewhere) shows up as an error.
    expect_close_abs(dc.name + " o", o, o_ref, dc.dtype == DType::F32 ? 1e-5 : std::ldexp(1.0, -8));
    expect_close_abs(dc.name + " state", state, state_ref, 1e-5);
    const int64_t slot_numel = c.HV * c.K * c.V;
    for (int64_t slot : {1, 2, 4})
        ASSERT_EQ(std::memcmp(state.ptr<float>() + slot * slot_numel, state0.ptr<float>() + slot * slot_numel,
                              size_t(slot_numel) * 4),
                  0)
            << "slot " << slot << " belongs to no sequence and must stay untouched";
}

INSTANTIATE_TEST_SUITE_P(Cells, LinearCpuDecode, ::testing::ValuesIn(decode_cases()),
                         [](const ::testing::TestParamInfo<DecodeCase>& info) { return info.param.name; });

}  // namespace
}  // namespace hla::test
