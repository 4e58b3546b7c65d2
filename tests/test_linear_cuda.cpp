// hla — the linear family on CUDA against the fp64 CPU reference (tolerance policy of DESIGN.md:
// error ≤ 2 × error of the reference run in the same precision + a small floor; the backward with the
// CPU backward's tolerances, stated at check_backward).
//
// Input ranges: q ~ N(0, 1), k unit rows (or raw N(0, 1) with in-kernel L2 norm), v ~ N(0, 1), log
// decay uniform in [gate_min, gate_max] (default [−3, −0.01]), β uniform in [beta_min, beta_max]
// (default [0, 1]); stress cases push each to its edge.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "hla/hla.hpp"
#include "ops/linear/cuda/forward_plan.hpp"
#include "ops/linear/problem.hpp"
#include "support/cuda_graph.hpp"
#include "support/linear_case.hpp"

using namespace hla;
using namespace hla::test;

namespace {

#define REQUIRE_GPU()                                                                                  \
    do {                                                                                               \
        if (!cuda_available()) GTEST_SKIP() << "no CUDA device visible to this process (or hla built " \
                                               "without CUDA): the GPU tests need one";                \
    } while (0)

LinearCase make_case(const std::string& name, LinearConfig cfg, DType dtype, int64_t B, int64_t T, int64_t H,
                     int64_t HV, int64_t K, int64_t V) {
    LinearCase c;
    c.name = name;
    c.cfg = cfg;
    c.dtype = dtype;
    c.B = B;
    c.T = T;
    c.H = H;
    c.HV = HV;
    c.K = K;
    c.V = V;
    return c;
}

// A view of tokens [t0, t0 + n) of a [B, T, ...] tensor.
TensorView token_slice(const TensorView& x, int64_t t0, int64_t n) {
    if (!x.defined()) return x;
    TensorView s = x;
    s.data = static_cast<char*>(x.data) + t0 * x.stride[1] * int64_t(dtype_size(x.dtype));
    s.shape[1] = n;
    return s;
}

// The first n entries along dimension `dim` (0 or 1) of a contiguous CPU tensor, as a tensor of its own.
Tensor leading(const Tensor& x, int dim, int64_t n) {
    const TensorView& v = x.view();
    std::vector<int64_t> shape(v.shape, v.shape + v.ndim);
    shape[dim] = n;
    Tensor out(shape, v.dtype);
    const int64_t outer = dim == 0 ? 1 : v.shape[0];
    const size_t inner = size_t(n) * size_t(v.stride[dim]) * dtype_size(v.dtype);
    const size_t from = size_t(v.stride[dim]) * size_t(v.shape[dim]) * dtype_size(v.dtype);
    for (int64_t o = 0; o < outer; ++o)
        std::memcpy(static_cast<char*>(out.view().data) + o * inner, static_cast<const char*>(v.data) + o * from, inner);
    return out;
}

// Tokens [t0, T) of a contiguous CPU [B, T, ...] tensor set to NaN.
void poison_tokens(Tensor& x, int64_t t0) {
    if (!x.defined()) return;
    TensorView& v = const_cast<TensorView&>(x.view());
    for (int64_t b = 0; b < v.shape[0]; ++b)
        for (int64_t t = t0; t < v.shape[1]; ++t) {
            char* row = static_cast<char*>(v.data) + (b * v.stride[0] + t * v.stride[1]) * int64_t(dtype_size(v.dtype));
            const int64_t n = v.stride[1];
            for (int64_t i = 0; i < n; ++i) {
                switch (v.dtype) {
                    case DType::BF16: reinterpret_cast<uint16_t*>(row)[i] = 0x7FC0; break;
                    case DType::F16: reinterpret_cast<uint16_t*>(row)[i] = 0x7E00; break;
                    case DType::F32: reinterpret_cast<float*>(row)[i] = std::nanf(""); break;
                    default: reinterpret_cast<double*>(row)[i] = std::nan(""); break;
                }
            }
        }
}

// A copy of the inputs with every token from t0 on NaN in q, k, v, the gate and β.
LinearInputs with_nan_tokens(const LinearInputs& x, int64_t t0) {
    LinearInputs bad = x;
    for (Tensor* t : {&bad.q, &bad.k, &bad.v, &bad.g, &bad.beta}) {
        if (!t->defined()) continue;
        *t = t->clone();
        poison_tokens(*t, t0);
    }
    return bad;
}

// The values of a contiguous CPU [B, T, H, D] tensor in a head-major [B, H, T, D] buffer on the GPU,
// and the [B, T, H, D] view of that buffer (strides H·T·D, D, T·D, 1).
struct HeadMajor {
    Tensor buffer;
    TensorView view;
};
HeadMajor head_major(const Tensor& x) {
    const TensorView& v = x.view();
    const int64_t B = v.shape[0], T = v.shape[1], H = v.shape[2], D = v.shape[3];
    const size_t row = size_t(D) * dtype_size(v.dtype);
    Tensor hm({B, H, T, D}, v.dtype);
    for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t)
            for (int64_t h = 0; h < H; ++h)
                std::memcpy(static_cast<char*>(hm.view().data) + ((b * H + h) * T + t) * row,
                            static_cast<const char*>(v.data) + ((b * T + t) * H + h) * row, row);
    HeadMajor r;
    r.buffer = hm.to(Device::CUDA);
    r.view = TensorView::strided(r.buffer.view().data, v.dtype, {B, T, H, D}, {H * T * D, D, T * D, 1}, Device::CUDA);
    return r;
}

// q, k and v of `cpu` as head-major views on the GPU (head_major), put into `a`; the returned buffers
// back the views.
struct HeadMajorQKV {
    HeadMajor q, k, v;
};
HeadMajorQKV head_major_inputs(const LinearInputs& cpu, LinearForwardArgs& a) {
    HeadMajorQKV r{head_major(cpu.q), head_major(cpu.k), head_major(cpu.v)};
    a.q = r.q.view;
    a.k = r.k.view;
    a.v = r.v.view;
    return r;
}

struct References {
    Tensor o64, s64, o_p, s_p;  // fp64 reference and the reference run in the case's precision
};

References run_references(const LinearCase& c, const LinearInputs& cpu) {
    References r;
    r.o64 = Tensor({c.B, c.T, c.HV, c.V}, DType::F64);
    r.s64 = poisoned_state(c, cpu.N);
    LinearConfig rc = c.cfg;
    rc.backend = Backend::Reference;
    linear_forward(rc, cpu.args(r.o64, &r.s64));
    r.o_p = poisoned_output(c);
    r.s_p = poisoned_state(c, cpu.N);
    reference_forward_in_precision(c.cfg, cpu.args(r.o_p, &r.s_p), c.dtype);
    return r;
}

// How the GPU gets the token tensors of a check: contiguous, or the same values as head-major views
// ([B, H, T, D] memory; head_major).
enum class TokenLayout { Contiguous, HeadMajor };

// The CUDA forward of a case (one call over all tokens) checked against the references; q, k, v in
// `layout`.
using linear::cuda::ForwardPlan;
using linear::cuda::last_forward_plan;

// Whether the forward's two kernels may run at once in this process (forward.cu's
// kernels_run_concurrently, less the device query: every card these tests run on has concurrent kernels).
bool kernels_may_run_concurrently() { return !linear::cuda::kernels_serialised_by_environment(); }

// The forward on the GPU against the references, on the case's random inputs as `edit_inputs` leaves
// them (host tensors); `edit_args` may then replace the GPU views the call gets (given the host inputs),
// as long as they hold the same values. Afterwards last_forward_plan() is this call's plan.
void check_forward(const LinearCase& c, uint64_t seed = 1, TokenLayout layout = TokenLayout::Contiguous,
                   const std::function<void(LinearInputs&)>& edit_inputs = {},
                   const std::function<void(const LinearInputs&, LinearForwardArgs&)>& edit_args = {}) {
    LinearInputs cpu = make_inputs(c, seed);
    if (edit_inputs) edit_inputs(cpu);
    const References ref = run_references(c, cpu);
    const LinearInputs dev = cpu.move_to(Device::CUDA);
    Tensor o = poisoned_output(c, Device::CUDA);
    Tensor s = poisoned_state(c, cpu.N, Device::CUDA);
    LinearForwardArgs a = dev.args(o, &s);
    HeadMajorQKV hm;
    if (layout == TokenLayout::HeadMajor) hm = head_major_inputs(cpu, a);
    if (edit_args) edit_args(cpu, a);
    linear::cuda::record_forward_plan({});
    linear_forward(c.cfg, a);
    cuda_synchronize();
    EXPECT_TRUE(last_forward_plan().ran) << c.name << ": the chunked CUDA forward did not run";
    expect_close(c.name + ": o", o.to(Device::CPU), ref.o64, ref.o_p);
    expect_close(c.name + ": final_state", s.to(Device::CPU), ref.s64, ref.s_p);
}

struct Cell {
    const char* name;
    LinearConfig (*config)();
};
const Cell kCells[] = {{"linear_attn", linear_attn_config},   {"lightning_attn", lightning_attn_config},
                       {"simple_gla", simple_gla_config},     {"gla", gla_config},
                       {"delta_rule", delta_rule_config},     {"gated_delta_rule", gated_delta_rule_config},
                       {"kda", kda_config}};

std::string dtype_tag(DType d) { return dtype_name(d); }

// The case of the NaN-neighbour tests: two sequences (70 and 130 tokens) of bf16, an initial state.
LinearCase nan_neighbour_case(const Cell& cell, int64_t HV, int64_t kv) {
    LinearCase c = make_case(std::string(cell.name) + "/nan-neighbour/" + std::to_string(kv), cell.config(), DType::BF16,
                             1, 200, 2, HV, kv, kv);
    c.cu_seqlens = {0, 70, 200};
    c.initial_state = true;
    return c;
}

}  // namespace

// Every cell in every input dtype: ragged T (3 chunks + 8 tokens), grouped value heads, initial state.
TEST(LinearCuda, EveryCellEveryDtype) {
    REQUIRE_GPU();
    for (const Cell& cell : kCells)
        for (DType dt : {DType::BF16, DType::F16, DType::F32}) {
            LinearCase c = make_case(std::string(cell.name) + "/" + dtype_tag(dt), cell.config(), dt, 2, 200, 2, 4, 64, 64);
            c.initial_state = true;
            check_forward(c);
        }
}

TEST(LinearCuda, HeadDims) {
    REQUIRE_GPU();
    for (const Cell& cell : kCells)
        for (auto kv : {std::pair<int64_t, int64_t>{128, 128}, {64, 128}, {128, 64}}) {
            LinearCase c = make_case(std::string(cell.name) + "/K" + std::to_string(kv.first) + "V" +
                                         std::to_string(kv.second),
                                     cell.config(), DType::BF16, 1, 130, 2, 2, kv.first, kv.second);
            c.initial_state = true;
            check_forward(c);
        }
}

// The scan's V-tile width is a heuristic of the shape; force each width (fp32 has no 64-wide tile and
// falls back to 32) so every instantiation is checked.
TEST(LinearCuda, ScanTileWidths) {
    REQUIRE_GPU();
    for (const char* vt : {"16", "32", "64"}) {
        setenv("HLA_CUDA_SCAN_VT", vt, 1);
        for (const Cell& cell : kCells)
            for (DType dt : {DType::BF16, DType::F32}) {
                LinearCase c = make_case(std::string(cell.name) + "/VT" + vt + "/" + dtype_tag(dt), cell.config(), dt, 2,
                                         150, 2, 2, 128, 128);
                c.initial_state = true;
                check_forward(c);
                EXPECT_EQ(last_forward_plan().scan_tile, dt == DType::F32 ? std::min(std::atoi(vt), 32) : std::atoi(vt))
                    << c.name;
            }
    }
    unsetenv("HLA_CUDA_SCAN_VT");
}

// The raw-operand scan (q, k, v read from the inputs with per-row factors) is the default for bf16
// inputs with one decay number per token, and the single-shot delta rule's scan forms U (with raw
// operands W too) from prepare's T; each of the four ways for every scalar-decay cell: grouped value
// heads with an initial state, and varlen (an empty and a one-token sequence, chunks that end
// mid-way) with log decays down to −40. (KDA's forming of U, and of W from prepare's K⊙γ, runs in
// every bf16 test of a single-shot forward, and PiecewiseForwardEqualsSingleShotOnAUserStream holds
// it bit for bit to prepare's U and W.)
TEST(LinearCuda, RawOperandScanEveryWay) {
    REQUIRE_GPU();
    const std::pair<const char*, const char*> ways[] = {{"0", "0"}, {"0", "1"}, {"1", "0"}, {"1", "1"}};
    for (const auto& [raw, form] : ways) {
        setenv("HLA_CUDA_FWD_RAW", raw, 1);
        setenv("HLA_CUDA_FWD_FORM", form, 1);
        const std::string tag = std::string("/raw") + raw + "form" + form;
        for (const Cell& cell : kCells) {
            if (cell.config().decay == Decay::Vector) continue;
            const bool raw_on = raw[0] == '1', form_on = form[0] == '1' && cell.config().update == Update::Delta;
            LinearCase c = make_case(std::string(cell.name) + tag, cell.config(), DType::BF16, 2, 150, 2, 4, 128, 128);
            c.initial_state = true;
            check_forward(c);
            EXPECT_EQ(last_forward_plan().raw_operands, raw_on) << c.name;
            EXPECT_EQ(last_forward_plan().scan_forms_wu, form_on) << c.name;
            LinearCase v = make_case(std::string(cell.name) + tag + "/varlen", cell.config(), DType::BF16, 1, 200, 2, 2,
                                     128, 128);
            v.cu_seqlens = {0, 70, 70, 71, 200};
            v.initial_state = true;
            v.gate_min = -40;
            v.gate_max = 0;
            check_forward(v);
            EXPECT_EQ(last_forward_plan().raw_operands, raw_on) << v.name;
            EXPECT_EQ(last_forward_plan().scan_forms_wu, form_on) << v.name;
        }
    }
    unsetenv("HLA_CUDA_FWD_RAW");
    // vector decay (KDA): the scan's W (from prepare's K⊙γ) and U, or both prepare's
    for (const char* form : {"0", "1"}) {
        setenv("HLA_CUDA_FWD_FORM", form, 1);
        LinearCase c = make_case(std::string("kda/form") + form, kda_config(), DType::BF16, 1, 200, 2, 2, 128, 128);
        c.cu_seqlens = {0, 70, 70, 71, 200};
        c.initial_state = true;
        check_forward(c);
        EXPECT_FALSE(last_forward_plan().raw_operands) << c.name;
        EXPECT_EQ(last_forward_plan().scan_forms_wu, form[0] == '1') << c.name;
    }
    unsetenv("HLA_CUDA_FWD_FORM");
}

TEST(LinearCuda, SingleToken) {
    REQUIRE_GPU();
    for (const Cell& cell : kCells) {
        LinearCase c = make_case(std::string(cell.name) + "/T1", cell.config(), DType::BF16, 3, 1, 2, 2, 64, 64);
        c.initial_state = true;
        check_forward(c);
    }
}

TEST(LinearCuda, VarlenWithEmptySequences) {
    REQUIRE_GPU();
    for (const Cell& cell : kCells) {
        LinearCase c = make_case(std::string(cell.name) + "/varlen", cell.config(), DType::BF16, 1, 200, 2, 4, 64, 64);
        c.cu_seqlens = {0, 0, 70, 70, 133, 200, 200};
        c.initial_state = true;
        check_forward(c);
    }
}

// A sequence's chunks are read in whole 64-token boxes (the scans' copy engine), so the last chunk of
// a sequence also reads the next sequence's first tokens: those rows must not reach it. With NaN in
// every q, k, v (and gate, β) of the second sequence, the first one's output and final state are
// still the reference's (bf16: raw-operand and prepared scans; K = V = 64 and 128).
TEST(LinearCuda, NonFiniteTokensStayInTheirSequence) {
    REQUIRE_GPU();
    for (const int64_t kv : {64, 128})
        for (const Cell& cell : kCells) {
            const LinearCase c = nan_neighbour_case(cell, 4, kv);
            const LinearInputs cpu = make_inputs(c, 5);
            const References ref = run_references(c, cpu);
            const LinearInputs dev = with_nan_tokens(cpu, 70).move_to(Device::CUDA);
            Tensor o = poisoned_output(c, Device::CUDA);
            Tensor st = poisoned_state(c, cpu.N, Device::CUDA);
            linear_forward(c.cfg, dev.args(o, &st));
            cuda_synchronize();
            expect_close(c.name + ": o of sequence 0", leading(o.to(Device::CPU), 1, 70), leading(ref.o64, 1, 70),
                         leading(ref.o_p, 1, 70));
            expect_close(c.name + ": final_state of sequence 0", leading(st.to(Device::CPU), 0, 1),
                         leading(ref.s64, 0, 1), leading(ref.s_p, 0, 1));
        }
}

// q, k, v as head-major views ([B, H, T, D] memory): the scans' copy engine reads only nested
// [B, T, heads, D] strides, so these take prepare's copies (rows_tma_ready), with the same result.
TEST(LinearCuda, HeadMajorInputs) {
    REQUIRE_GPU();
    for (const Cell& cell : kCells) {
        LinearCase c = make_case(std::string(cell.name) + "/head-major", cell.config(), DType::BF16, 2, 150, 2, 2, 64, 64);
        c.initial_state = true;
        check_forward(c, 11, TokenLayout::HeadMajor);
        EXPECT_FALSE(last_forward_plan().raw_operands) << c.name << ": head-major rows cannot be read raw";
    }
}

// The piecewise forward is the default only for long sequences on a scan grid that leaves SMs idle
// or needs narrow tiles to fill them. Sequential pieces (the delta rule, fp32 operands: the scan of
// piece i beside the prepare of piece i + 1, the state handed from piece to piece through the
// workspace) and parallel pieces (additive update on bf16: every piece's start state from a state
// pass over runs of chunks, as many as fill one wave, then one scan over all pieces). Forced to 2 and
// 5 pieces on small shapes: varlen with empty sequences and sequences of fewer chunks than pieces
// (empty pieces pass the state through), grouped value heads, an initial state, bf16
// (warp-specialised scan) and fp32 (chunk_scan_kernel), K = V = 64 at 2 pieces and 128 at 5. Then 2
// forced pieces of 31 and 32 chunks at K = V = 128 with two value heads on one q/k head (on a 132-SM
// card 31 runs of one chunk: the state carried from run to run), and the default: two sequences of
// 49 chunks and two value heads (sequential: 2 pieces; parallel: 3). Between them, the concurrent
// forward forced. Each case also checks that the forward took the path it names (last_forward_plan).
TEST(LinearCuda, PiecewiseForward) {
    REQUIRE_GPU();
    for (const char* pieces : {"2", "5"}) {
        setenv("HLA_CUDA_FWD_PIECES", pieces, 1);
        // K = V = 64 and 128 (the 128-column layouts take three operand stages in the scan)
        const int64_t kv = pieces[0] == '2' ? 64 : 128;
        for (const Cell& cell : kCells)
            for (DType dt : {DType::BF16, DType::F32}) {
                LinearCase c = make_case(std::string(cell.name) + "/pieces" + pieces + "/" + dtype_tag(dt),
                                         cell.config(), dt, 1, 400, 2, 4, kv, kv);
                c.cu_seqlens = {0, 0, 70, 70, 333, 400};
                c.initial_state = true;
                check_forward(c);
                const ForwardPlan plan = last_forward_plan();
                EXPECT_EQ(plan.pieces, std::atoi(pieces)) << c.name;
                EXPECT_EQ(plan.parallel_pieces, dt == DType::BF16 && cell.config().update == Update::Additive) << c.name;
                EXPECT_FALSE(plan.concurrent) << c.name << ": a forced piece count turns the concurrent forward off";
            }
    }
    setenv("HLA_CUDA_FWD_PIECES", "2", 1);
    for (const Cell& cell : kCells) {
        LinearCase c = make_case(std::string(cell.name) + "/pieces2-long", cell.config(), DType::BF16, 1, 4000, 1, 2,
                                 128, 128);
        c.initial_state = true;
        check_forward(c);
        EXPECT_EQ(last_forward_plan().pieces, 2) << c.name;
    }
    unsetenv("HLA_CUDA_FWD_PIECES");
    // the concurrent forward forced (it applies to the delta rule on bf16; the others run their default):
    // varlen with empty sequences (prepare's order interleaves the sequences' chunks), and a long one
    setenv("HLA_CUDA_FWD_CONCURRENT", "1", 1);
    for (const Cell& cell : kCells) {
        LinearCase c = make_case(std::string(cell.name) + "/concurrent-varlen", cell.config(), DType::BF16, 1, 400, 2,
                                 4, 64, 64);
        c.cu_seqlens = {0, 0, 70, 70, 333, 400};
        c.initial_state = true;
        const bool delta = cell.config().update == Update::Delta;
        check_forward(c);  // (concurrent only where its 80-block scan grid leaves half the SMs: not asserted)
        LinearCase l = make_case(std::string(cell.name) + "/concurrent-long", cell.config(), DType::BF16, 1, 4000, 1, 2,
                                 128, 128);
        l.initial_state = true;
        check_forward(l);
        EXPECT_EQ(last_forward_plan().concurrent, delta && kernels_may_run_concurrently()) << l.name;
    }
    unsetenv("HLA_CUDA_FWD_CONCURRENT");
    for (const Cell& cell : kCells) {
        LinearCase c = make_case(std::string(cell.name) + "/pieces-default", cell.config(), DType::BF16, 2, 3100, 1, 2,
                                 64, 64);
        c.initial_state = true;
        check_forward(c);
        // the delta rule: concurrent where kernels run at once, else 2 sequential pieces; the additive
        // update: parallel pieces (3 on a 132-SM card)
        const ForwardPlan plan = last_forward_plan();
        if (cell.config().update == Update::Delta) {
            EXPECT_EQ(plan.concurrent, kernels_may_run_concurrently()) << c.name;
            EXPECT_EQ(plan.pieces, plan.concurrent ? 1 : 2) << c.name;
        } else {
            EXPECT_TRUE(plan.parallel_pieces) << c.name;
            EXPECT_GE(plan.pieces, 2) << c.name;
        }
    }
}

// g = −1000 everywhere (the state forgets every token), and long runs of strongly negative gates
// (a 16-token block of the vector decay spans far more than e^80: the entry-by-entry path).
TEST(LinearCuda, ExtremeGates) {
    REQUIRE_GPU();
    for (const Cell& cell : kCells) {
        const LinearConfig cfg = cell.config();
        if (cfg.decay != Decay::Scalar && cfg.decay != Decay::Vector) continue;
        for (auto range : {std::pair<double, double>{-1000, -1000}, {-40, 0}, {-1000, 0}}) {
            LinearCase c = make_case(std::string(cell.name) + "/g[" + std::to_string(int(range.first)) + "," +
                                         std::to_string(int(range.second)) + "]",
                                     cfg, DType::F32, 2, 150, 2, 2, 64, 64);
            c.gate_min = range.first;
            c.gate_max = range.second;
            c.initial_state = true;
            check_forward(c);
            c.dtype = DType::BF16;
            c.name += "/bf16";
            check_forward(c);
        }
    }
}

// Vector decay: every 16-token block's second gate −10000 in every channel, the rest in [−1, 0]. Each
// in-block sum of the prepare then adds small gates to a large one, and the decays between the
// block's later tokens, e^{b_i − b_j} of order 1, come from differences of two large sums (the
// entry-by-entry path of chunk_prepare_mma.cuh). Its compensated fp32 sums keep those differences
// within the rounding of the stored Δ (ulp(10⁴) ≈ 10⁻³), as fp64 sums did. (Plain fp32 sums, a few
// ulps further off, passed this test too on an H100 with the same errors to three digits: the test
// bounds the path's accuracy, it does not tell the two apart.) fp32 inputs take chunk_prepare_kernel.
TEST(LinearCuda, VectorGateSpikes) {
    REQUIRE_GPU();
    for (const Cell& cell : kCells) {
        if (cell.config().decay != Decay::Vector) continue;
        for (DType dt : {DType::BF16, DType::F32}) {
            LinearCase c = make_case(std::string(cell.name) + "/gate-spikes/" + dtype_tag(dt), cell.config(), dt, 2, 150,
                                     2, 2, 128, 128);
            c.gate_min = -1;
            c.gate_max = 0;
            c.initial_state = true;
            check_forward(c, 13, TokenLayout::Contiguous, [&](LinearInputs& in) {
                Tensor g = in.g.to(DType::F32);
                float* gp = g.ptr<float>();
                for (int64_t row = 0; row < c.B * c.T; ++row)
                    if (row % c.T % 16 == 1)
                        for (int64_t e = 0; e < c.HV * c.K; ++e) gp[row * c.HV * c.K + e] = -10000.f;
                in.g = g.to(in.g.dtype());
            });
        }
    }
}

TEST(LinearCuda, BetaEdges) {
    REQUIRE_GPU();
    for (const Cell& cell : kCells) {
        const LinearConfig cfg = cell.config();
        if (cfg.update != Update::Delta) continue;
        for (double b : {0.0, 1.0}) {
            LinearCase c = make_case(std::string(cell.name) + "/beta=" + std::to_string(int(b)), cfg, DType::BF16, 2,
                                     100, 2, 2, 64, 64);
            c.beta_min = c.beta_max = b;
            c.initial_state = true;
            check_forward(c);
        }
    }
}

TEST(LinearCuda, InKernelOptions) {
    REQUIRE_GPU();
    {
        // the additive update on raw operands (the scan reads q, k, v and applies the row factors) with
        // in-kernel norms and a Mamba2-style gate
        LinearConfig cfg = simple_gla_config();
        cfg.qk_l2norm = true;
        cfg.gate_activation = GateActivation::SoftplusDecay;
        cfg.scale = 0.3;
        LinearCase c = make_case("sgla/l2norm+softplus", cfg, DType::BF16, 2, 150, 2, 4, 128, 128);
        c.initial_state = true;
        check_forward(c);
    }
    {
        LinearConfig cfg = gated_delta_rule_config();
        cfg.qk_l2norm = true;
        cfg.gate_activation = GateActivation::SoftplusDecay;
        cfg.beta_activation = BetaActivation::Sigmoid;
        cfg.scale = 0.3;
        check_forward(make_case("gdn/l2norm+softplus+sigmoid", cfg, DType::BF16, 2, 150, 2, 4, 128, 128));
    }
    {
        LinearConfig cfg = kda_config();
        cfg.qk_l2norm = true;
        cfg.gate_activation = GateActivation::SoftplusDecay;
        cfg.beta_activation = BetaActivation::Sigmoid2x;
        check_forward(make_case("kda/l2norm+softplus+sigmoid2x", cfg, DType::BF16, 2, 150, 2, 2, 128, 128));
    }
    // KDA's bounded sigmoid on fp16 inputs (the fp32 prepare) and on bf16 (the tensor-core prepare, the
    // activation inside its compensated per-channel sums), there with a bound shallow enough for the
    // single-reference path
    struct BoundedCase {
        DType dtype;
        float lower_bound;
        bool qk_l2norm;
        int64_t B, KV;
    };
    for (const BoundedCase& b :
         {BoundedCase{DType::F16, -5.f, true, 1, 64}, BoundedCase{DType::BF16, -1.f, false, 2, 128}}) {
        LinearConfig cfg = kda_config();
        cfg.qk_l2norm = b.qk_l2norm;
        cfg.gate_activation = GateActivation::BoundedSigmoid;
        cfg.lower_bound = b.lower_bound;
        cfg.beta_activation = BetaActivation::Sigmoid;
        LinearCase c =
            make_case(std::string("kda/bounded-sigmoid/") + dtype_tag(b.dtype), cfg, b.dtype, b.B, 150, 2, 2, b.KV, b.KV);
        c.initial_state = true;
        check_forward(c);
    }
    {
        // GLA (vector decay, additive update) with softplus on the tensor-core prepare
        LinearConfig gla = gla_config();
        gla.gate_activation = GateActivation::SoftplusDecay;
        check_forward(make_case("gla/softplus/bf16", gla, DType::BF16, 1, 200, 2, 2, 64, 64));
    }
    {
        LinearConfig cfg = gated_delta_rule_config();
        LinearCase c = make_case("gdn/large-initial-state", cfg, DType::BF16, 2, 100, 2, 2, 64, 64);
        c.initial_state = true;
        c.initial_state_scale = 100;
        check_forward(c);
    }
}

// Two calls over [0, T1) and [T1, T) with the final state handed over equal one call over [0, T).
TEST(LinearCuda, StateHandOff) {
    REQUIRE_GPU();
    for (const Cell& cell : kCells) {
        LinearCase c = make_case(std::string(cell.name) + "/hand-off", cell.config(), DType::BF16, 2, 150, 2, 2, 64, 64);
        c.initial_state = true;
        const LinearInputs cpu = make_inputs(c, 7);
        const References ref = run_references(c, cpu);
        const LinearInputs dev = cpu.move_to(Device::CUDA);
        Tensor o = poisoned_output(c, Device::CUDA);
        Tensor mid = poisoned_state(c, cpu.N, Device::CUDA);
        Tensor fin = poisoned_state(c, cpu.N, Device::CUDA);
        const int64_t T1 = 77;
        for (int part = 0; part < 2; ++part) {
            const int64_t t0 = part == 0 ? 0 : T1, n = part == 0 ? T1 : c.T - T1;
            LinearForwardArgs a = dev.args(o, part == 0 ? &mid : &fin);
            a.q = token_slice(a.q, t0, n);
            a.k = token_slice(a.k, t0, n);
            a.v = token_slice(a.v, t0, n);
            if (c.cfg.decay == Decay::Scalar || c.cfg.decay == Decay::Vector) a.g = token_slice(a.g, t0, n);
            a.beta = token_slice(a.beta, t0, n);
            a.o = token_slice(a.o, t0, n);
            if (part == 1) a.initial_state = mid;
            linear_forward(c.cfg, a);
        }
        cuda_synchronize();
        expect_close(c.name + ": o", o.to(Device::CPU), ref.o64, ref.o_p);
        expect_close(c.name + ": final_state", fin.to(Device::CPU), ref.s64, ref.s_p);
    }
}

// Decode, token by token (and 3 tokens per call) from permuted state slots, equals the forward.
TEST(LinearCuda, DecodeMatchesForward) {
    REQUIRE_GPU();
    for (const Cell& cell : kCells)
        for (int64_t K : {64, 128})
            for (int64_t step : {1, 3}) {
                LinearConfig cfg = cell.config();
                if (cfg.update == Update::Delta && K == 128) {
                    cfg.qk_l2norm = true;
                    cfg.beta_activation = BetaActivation::Sigmoid;
                }
                if (cfg.decay == Decay::Vector && K == 128) cfg.gate_activation = GateActivation::SoftplusDecay;
                LinearCase c = make_case(std::string(cell.name) + "/decode/K" + std::to_string(K) + "/step" +
                                             std::to_string(step),
                                         cfg, DType::BF16, 3, 12, 2, 4, K, 64);
                c.initial_state = true;
                const LinearInputs cpu = make_inputs(c, 11);
                const References ref = run_references(c, cpu);
                const LinearInputs dev = cpu.move_to(Device::CUDA);
                // slots: sequence n lives in slot perm[n] of 5; the others must stay untouched
                const std::vector<int32_t> perm = {3, 0, 4};
                Tensor slots_cpu = Tensor::zeros({5, c.HV, K, c.V}, DType::F32);
                const int64_t per = c.HV * K * c.V;
                for (int64_t n = 0; n < 3; ++n)
                    std::copy(cpu.initial_state.ptr<float>() + n * per, cpu.initial_state.ptr<float>() + (n + 1) * per,
                              slots_cpu.ptr<float>() + perm[size_t(n)] * per);
                for (int64_t i = 0; i < per; ++i) {
                    slots_cpu.ptr<float>()[1 * per + i] = 42.f;
                    slots_cpu.ptr<float>()[2 * per + i] = -7.f;
                }
                Tensor slots = slots_cpu.to(Device::CUDA);
                Tensor idx_cpu({3}, DType::I32);
                for (int n = 0; n < 3; ++n) idx_cpu.ptr<int32_t>()[n] = perm[size_t(n)];
                Tensor idx = idx_cpu.to(Device::CUDA);
                Tensor o = poisoned_output(c, Device::CUDA);
                for (int64_t t0 = 0; t0 < c.T; t0 += step) {
                    LinearDecodeArgs d;
                    d.q = token_slice(dev.q, t0, step);
                    d.k = token_slice(dev.k, t0, step);
                    d.v = token_slice(dev.v, t0, step);
                    d.g = (c.cfg.decay == Decay::Scalar || c.cfg.decay == Decay::Vector) ? token_slice(dev.g, t0, step)
                                                                                           : dev.g.view();
                    d.beta = token_slice(dev.beta, t0, step);
                    d.A_log = dev.A_log;
                    d.dt_bias = dev.dt_bias;
                    d.state = slots;
                    d.state_indices = idx;
                    d.o = token_slice(o, t0, step);
                    linear_decode(c.cfg, d);
                }
                cuda_synchronize();
                expect_close(c.name + ": o", o.to(Device::CPU), ref.o64, ref.o_p);
                const Tensor out_slots = slots.to(Device::CPU);
                Tensor fin = Tensor({3, c.HV, K, c.V}, DType::F32);
                for (int64_t n = 0; n < 3; ++n)
                    std::copy(out_slots.ptr<float>() + perm[size_t(n)] * per,
                              out_slots.ptr<float>() + (perm[size_t(n)] + 1) * per, fin.ptr<float>() + n * per);
                expect_close(c.name + ": final_state", fin, ref.s64, ref.s_p);
                for (int64_t i = 0; i < per; ++i) {
                    ASSERT_EQ(out_slots.ptr<float>()[1 * per + i], 42.f) << c.name << ": unused slot 1 was written";
                    ASSERT_EQ(out_slots.ptr<float>()[2 * per + i], -7.f) << c.name << ": unused slot 2 was written";
                }
            }
}

// A negative slot index skips its sequence: o untouched (still NaN), no state written.
TEST(LinearCuda, DecodeSkipsNegativeSlots) {
    REQUIRE_GPU();
    LinearCase c = make_case("gdn/decode-skip", gated_delta_rule_config(), DType::BF16, 2, 1, 2, 2, 64, 64);
    const LinearInputs dev = make_inputs(c, 3).move_to(Device::CUDA);
    Tensor slots_cpu = Tensor::zeros({2, c.HV, c.K, c.V}, DType::F32);
    Tensor slots = slots_cpu.to(Device::CUDA);
    Tensor idx_cpu({2}, DType::I64);
    idx_cpu.ptr<int64_t>()[0] = -1;
    idx_cpu.ptr<int64_t>()[1] = 1;
    Tensor idx = idx_cpu.to(Device::CUDA);
    Tensor o = poisoned_output(c, Device::CUDA);
    LinearDecodeArgs d;
    d.q = dev.q;
    d.k = dev.k;
    d.v = dev.v;
    d.g = dev.g;
    d.beta = dev.beta;
    d.state = slots;
    d.state_indices = idx;
    d.o = o;
    linear_decode(c.cfg, d);
    cuda_synchronize();
    const Tensor oc = o.to(Device::CPU), sc = slots.to(Device::CPU);
    const int64_t row = c.HV * c.V, per = c.HV * c.K * c.V;
    for (int64_t i = 0; i < row; ++i) {
        ASSERT_TRUE(std::isnan(load_as_double(oc.data(), oc.dtype(), i))) << "o of the skipped sequence was written";
        ASSERT_TRUE(std::isfinite(load_as_double(oc.data(), oc.dtype(), row + i))) << "o of sequence 1 is not finite";
    }
    double slot0 = 0, slot1 = 0;
    for (int64_t i = 0; i < per; ++i) {
        slot0 += std::fabs(sc.ptr<float>()[i]);
        slot1 += std::fabs(sc.ptr<float>()[per + i]);
    }
    EXPECT_EQ(slot0, 0.0) << "slot 0 belongs to no live sequence and must stay zero";
    EXPECT_GT(slot1, 0.0) << "slot 1 must hold sequence 1's updated state";
}

#if HLA_WITH_CUDA
// The sequential piecewise forward and the concurrent one (bf16 delta rule: prepare and scan at once,
// per-chunk flags) against the single-shot one (HLA_CUDA_FWD_PIECES=1), bit for bit: each chunk's
// prepare is the same and the state crosses pieces in fp32 (concurrent: never leaves the scan). Both run on a user stream
// (non-blocking) and only that stream is waited for (the copies back go to it): a scan still running
// on the second stream after the call returned, or a workspace released before it, would show as a
// difference. (Parallel pieces, the additive update on bf16, sum the state in another order and run
// on the caller's stream alone; PiecewiseForward checks them against the reference.)
TEST(LinearCuda, PiecewiseForwardEqualsSingleShotOnAUserStream) {
    REQUIRE_GPU();
    for (const Cell& cell : kCells)
        for (DType dt : {DType::BF16, DType::F32}) {
            if (dt == DType::BF16 && cell.config().update == Update::Additive) continue;
            LinearCase c = make_case(std::string(cell.name) + "/pieces-bitwise/" + dtype_tag(dt), cell.config(), dt, 1,
                                     700, 2, 4, 64, 64);
            c.cu_seqlens = {0, 0, 390, 390, 700};
            c.initial_state = true;
            const LinearInputs dev = make_inputs(c, 3).move_to(Device::CUDA);
            auto run = [&](const char* var, const char* value) {
                setenv(var, value, 1);
                Tensor o = poisoned_output(c, Device::CUDA);
                Tensor s = poisoned_state(c, dev.N, Device::CUDA);
                cudaStream_t stream = nullptr;
                cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
                std::pair<Tensor, Tensor> host;
                {
                    CudaStreamScope on(stream);
                    linear_forward(c.cfg, dev.args(o, &s));
                    host = {o.to(Device::CPU), s.to(Device::CPU)};
                }
                cudaStreamDestroy(stream);
                unsetenv(var);
                return host;
            };
            const auto [o1, s1] = run("HLA_CUDA_FWD_PIECES", "1");
            const std::pair<const char*, const char*> ways[] = {
                {"HLA_CUDA_FWD_PIECES", "2"}, {"HLA_CUDA_FWD_PIECES", "4"}, {"HLA_CUDA_FWD_CONCURRENT", "1"}};
            for (const auto& [var, value] : ways) {
                // (the concurrent forward is bf16 only: on fp32 it would compare single-shot with itself)
                if (dt == DType::F32 && std::strcmp(var, "HLA_CUDA_FWD_CONCURRENT") == 0) continue;
                const auto [op, sp] = run(var, value);
                EXPECT_EQ(std::memcmp(o1.data(), op.data(), o1.nbytes()), 0)
                    << c.name << ": o with " << var << "=" << value << " differs from the single-shot forward";
                EXPECT_EQ(std::memcmp(s1.data(), sp.data(), s1.nbytes()), 0)
                    << c.name << ": final state with " << var << "=" << value << " differs from the single-shot forward";
            }
        }
}

// The decode step as an inference engine runs it: on its own (non-blocking) stream, captured once into
// a CUDA graph and replayed. The capture (thread-local mode) fails if the step allocates, copies from
// the host or synchronises; the graph must hold kernel launches only, and its replay must give
// bit-for-bit the outputs and states of the same steps called eagerly on the default stream.
TEST(LinearCuda, DecodeCapturedInACudaGraphOnAUserStream) {
    REQUIRE_GPU();
    LinearConfig cfg = gated_delta_rule_config();
    cfg.qk_l2norm = true;
    cfg.beta_activation = BetaActivation::Sigmoid;
    cfg.gate_activation = GateActivation::SoftplusDecay;
    LinearCase c = make_case("gdn/decode-graph", cfg, DType::BF16, 3, 6, 2, 4, 128, 128);
    c.initial_state = true;
    const LinearInputs dev = make_inputs(c, 21).move_to(Device::CUDA);
    auto run_steps = [&](Tensor& state, Tensor& o) {
        for (int64_t t = 0; t < c.T; ++t) {
            LinearDecodeArgs d;
            d.q = token_slice(dev.q, t, 1);
            d.k = token_slice(dev.k, t, 1);
            d.v = token_slice(dev.v, t, 1);
            d.g = token_slice(dev.g, t, 1);
            d.beta = token_slice(dev.beta, t, 1);
            d.A_log = dev.A_log;
            d.dt_bias = dev.dt_bias;
            d.state = state;
            d.o = token_slice(o, t, 1);
            linear_decode(c.cfg, d);
        }
    };
    Tensor eager_state = dev.initial_state.clone(), eager_o = poisoned_output(c, Device::CUDA);
    run_steps(eager_state, eager_o);
    cuda_synchronize();

    Tensor graph_state = dev.initial_state.clone(), graph_o = poisoned_output(c, Device::CUDA);
    const GraphReplay g = capture_and_replay([&] { run_steps(graph_state, graph_o); });
    EXPECT_EQ(cuda_stream(), nullptr) << "CudaStreamScope must restore the previous stream";
    ASSERT_EQ(g.capture, cudaSuccess) << "the decode step broke the stream capture: " << cudaGetErrorString(g.capture);
    EXPECT_EQ(g.nodes, size_t(c.T)) << "one kernel per decode step, nothing else";
    EXPECT_EQ(g.kernel_nodes, g.nodes) << "the decode step put a non-kernel node into the graph";
    ASSERT_EQ(g.replay, cudaSuccess) << cudaGetErrorString(g.replay);

    const Tensor eo = eager_o.to(Device::CPU), go = graph_o.to(Device::CPU);
    const Tensor es = eager_state.to(Device::CPU), gs = graph_state.to(Device::CPU);
    ASSERT_EQ(eo.nbytes(), go.nbytes());
    EXPECT_EQ(std::memcmp(eo.data(), go.data(), eo.nbytes()), 0) << "graph replay: o differs from the eager steps";
    EXPECT_EQ(std::memcmp(es.data(), gs.data(), es.nbytes()), 0) << "graph replay: state differs from the eager steps";
    for (int64_t i = 0; i < go.numel(); ++i)
        ASSERT_TRUE(std::isfinite(load_as_double(go.data(), go.dtype(), i))) << "graph replay left o unwritten at " << i;
}
#endif

// The tuning switches reject a value they cannot mean, naming the variable: a typo in an A/B run must
// not silently measure the default.
TEST(LinearCuda, TuningSwitchesRejectBadValues) {
    REQUIRE_GPU();
    LinearCase c = make_case("sgla/switches", simple_gla_config(), DType::BF16, 1, 70, 1, 1, 64, 64);
    const LinearInputs dev = make_inputs(c, 5).move_to(Device::CUDA);
    const std::pair<const char*, const char*> bad[] = {{"HLA_CUDA_SCAN_VT", "48"},   {"HLA_CUDA_SCAN_VT", "wide"},
                                                       {"HLA_CUDA_FWD_RAW", "2"},    {"HLA_CUDA_FWD_FORM", "on"},  {"HLA_CUDA_FWD_PIECES", "two"},
                                                       {"HLA_CUDA_FWD_PIECES", "0"}, {"HLA_CUDA_FWD_PIECES", "3x"},
                                                       {"HLA_CUDA_FWD_CONCURRENT", "2"}};
    for (const auto& [name, value] : bad) {
        setenv(name, value, 1);
        Tensor o = poisoned_output(c, Device::CUDA);
        try {
            linear_forward(c.cfg, dev.args(o));
            ADD_FAILURE() << name << "=" << value << " should be rejected";
        } catch (const Error& e) {
            EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
            EXPECT_NE(std::string(e.what()).find(value), std::string::npos) << e.what();
        }
        unsetenv(name);
    }
}

TEST(LinearCuda, UnsupportedShapesAreClearErrors) {
    REQUIRE_GPU();
    LinearCase c = make_case("gdn/K32", gated_delta_rule_config(), DType::BF16, 1, 16, 1, 1, 32, 64);
    const LinearInputs dev = make_inputs(c, 1).move_to(Device::CUDA);
    Tensor o = poisoned_output(c, Device::CUDA);
    try {
        linear_forward(c.cfg, dev.args(o));
        FAIL() << "K = 32 should be rejected on CUDA";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("K in {64, 128}"), std::string::npos) << e.what();
    }
}

#if HLA_WITH_CUDA
// The chunked forward and backward copy their chunk tables from the host on every call, which a CUDA
// graph cannot replay: under capture they refuse with an error saying so, before touching the stream
// (the capture ends cleanly), and run as usual afterwards.
TEST(LinearCuda, ChunkedCallsRefuseGraphCapture) {
    REQUIRE_GPU();
    LinearCase c = make_case("gdn/capture", gated_delta_rule_config(), DType::BF16, 1, 100, 2, 2, 64, 64);
    const LinearInputs dev = make_inputs(c, 3).move_to(Device::CUDA);
    Tensor o = poisoned_output(c, Device::CUDA);
    const Tensor d_o = random_normal({c.B, c.T, c.HV, c.V}, c.dtype, 4).to(Device::CUDA);
    const LinearGradTensors grads = poisoned_grads(c, dev.N, Device::CUDA);
    auto refused = [](const std::function<void()>& fn, const char* what) {
        try {
            const GraphReplay g = capture_and_replay(fn);
            ADD_FAILURE() << what << " ran under graph capture (capture: " << cudaGetErrorString(g.capture) << ")";
        } catch (const Error& e) {
            EXPECT_NE(std::string(e.what()).find("cannot be captured in a CUDA graph"), std::string::npos) << e.what();
        }
    };
    refused([&] { linear_forward(c.cfg, dev.args(o)); }, "the chunked forward");
    refused([&] { linear_backward(c.cfg, dev.args(Tensor()), d_o, Tensor(), grads.views()); }, "the chunked backward");
    EXPECT_EQ(cuda_stream(), nullptr) << "CudaStreamScope must restore the previous stream";
    linear_forward(c.cfg, dev.args(o));
    linear_backward(c.cfg, dev.args(Tensor()), d_o, Tensor(), grads.views());
    cuda_synchronize();
    const Tensor oc = o.to(Device::CPU);
    for (int64_t i = 0; i < oc.numel(); ++i)
        ASSERT_TRUE(std::isfinite(load_as_double(oc.data(), oc.dtype(), i))) << "o unwritten after the refusals at " << i;
}
#endif

// ---- backward ----------------------------------------------------------------------------------
//
// The CUDA gradients against the fp64 reference backward (Backend::Reference) on CPU copies of the same
// inputs, with the CPU backward's tolerances (test_linear_cpu.cpp): f32 relative RMS ≤ 2e-4 per
// gradient; bf16 ≤ 4·e_P + 4e-3, e_P the forward's reference-in-bf16 error on the same inputs. With an
// initial state the final state is an output too, so d_final_state is given and dinitial_state checked.

namespace {

// d_o_dtype: the dtype of dO when it is not the inputs' (F64: the inputs'); d_o_layout: dO's layout,
// inputs_layout: q's, k's and v's.
void check_backward(const LinearCase& c, uint64_t seed = 1, DType d_o_dtype = DType::F64,
                    TokenLayout d_o_layout = TokenLayout::Contiguous,
                    TokenLayout inputs_layout = TokenLayout::Contiguous) {
    SCOPED_TRACE(c.name);
    const LinearInputs cpu = make_inputs(c, seed);
    const Tensor d_o = random_normal({c.B, c.T, c.HV, c.V}, d_o_dtype == DType::F64 ? c.dtype : d_o_dtype, seed + 2);
    const Tensor d_fs = c.initial_state ? random_normal({cpu.N, c.HV, c.K, c.V}, DType::F32, seed + 3) : Tensor();

    LinearCase c64 = c;
    c64.dtype = DType::F64;  // the reference's dq, dk, dv in fp64
    const LinearGradTensors ref = poisoned_grads(c64, cpu.N);
    LinearConfig rc = c.cfg;
    rc.backend = Backend::Reference;
    linear_backward(rc, cpu.args(Tensor()), d_o, d_fs, ref.views());

    const LinearInputs dev = cpu.move_to(Device::CUDA);
    const LinearGradTensors got = poisoned_grads(c, cpu.N, Device::CUDA);
    const Tensor d_o_dev = d_o.to(Device::CUDA);
    const HeadMajor d_o_hm = d_o_layout == TokenLayout::HeadMajor ? head_major(d_o) : HeadMajor{};
    const Tensor d_fs_dev = d_fs.defined() ? d_fs.to(Device::CUDA) : Tensor();
    LinearForwardArgs a = dev.args(Tensor());
    HeadMajorQKV hm;
    if (inputs_layout == TokenLayout::HeadMajor) hm = head_major_inputs(cpu, a);
    linear_backward(c.cfg, a, d_o_layout == TokenLayout::HeadMajor ? d_o_hm.view : d_o_dev.view(), d_fs_dev, got.views());
    cuda_synchronize();

    double tol = 2e-4;
    if (c.dtype != DType::F32) {
        const References fwd = run_references(c, cpu);
        tol = 4 * compare(fwd.o_p, fwd.o64).rel_rms + 4e-3;
    }
    expect_grads_close(c.name, got, ref, tol);
}

bool per_token_decay(const LinearConfig& c) { return c.decay == Decay::Scalar || c.decay == Decay::Vector; }

// Every cell in f32 and bf16, K = V = 64, two q/k heads, through `setup` (which returns false where the
// scenario does not apply to the cell).
template <class Setup>
void backward_every_cell(const std::string& scenario, Setup&& setup) {
    for (const Cell& cell : kCells)
        for (DType dt : {DType::F32, DType::BF16}) {
            LinearCase c = make_case(std::string(cell.name) + "/" + scenario + "/" + dtype_tag(dt), cell.config(), dt, 2,
                                     100, 2, 2, 64, 64);
            if (!setup(c)) continue;
            check_backward(c);
        }
}

}  // namespace

// The backward's version of NonFiniteTokensStayInTheirSequence: NaN in the second sequence's inputs
// and dO leave the first sequence's gradients (per token, and of its initial state) the reference's
// (a per-head gate's gradient sums over every sequence: not compared).
TEST(LinearCuda, BackwardNonFiniteTokensStayInTheirSequence) {
    REQUIRE_GPU();
    for (const int64_t kv : {64, 128})
        for (const Cell& cell : kCells) {
            const LinearCase c = nan_neighbour_case(cell, 2, kv);
            SCOPED_TRACE(c.name);
            const LinearInputs cpu = make_inputs(c, 7);
            const Tensor d_o = random_normal({c.B, c.T, c.HV, c.V}, c.dtype, 9);
            const Tensor d_fs = random_normal({cpu.N, c.HV, c.K, c.V}, DType::F32, 10);
            LinearCase c64 = c;
            c64.dtype = DType::F64;
            const LinearGradTensors ref = poisoned_grads(c64, cpu.N);
            LinearConfig rc = c.cfg;
            rc.backend = Backend::Reference;
            linear_backward(rc, cpu.args(Tensor()), d_o, d_fs, ref.views());

            Tensor bad_d_o = d_o.clone();
            poison_tokens(bad_d_o, 70);
            const LinearInputs dev = with_nan_tokens(cpu, 70).move_to(Device::CUDA);
            const LinearGradTensors got = poisoned_grads(c, cpu.N, Device::CUDA);
            linear_backward(c.cfg, dev.args(Tensor()), bad_d_o.to(Device::CUDA), d_fs.to(Device::CUDA), got.views());
            cuda_synchronize();

            const References fwd = run_references(c, cpu);
            const double tol = 4 * compare(fwd.o_p, fwd.o64).rel_rms + 4e-3;
            for (auto [name, g, r] : {std::tuple{"dq", &got.dq, &ref.dq}, std::tuple{"dk", &got.dk, &ref.dk},
                                      std::tuple{"dv", &got.dv, &ref.dv}, std::tuple{"dg", &got.dg, &ref.dg},
                                      std::tuple{"dbeta", &got.dbeta, &ref.dbeta}}) {
                // per token only: a per-head gate's gradient sums every token
                if (!r->defined() || r->view().ndim < 3) continue;
                expect_close_abs(c.name + ": " + name + " of sequence 0", leading(g->to(Device::CPU), 1, 70),
                                 leading(*r, 1, 70), tol);
            }
            expect_close_abs(c.name + ": dinitial_state of sequence 0", leading(got.dinitial_state.to(Device::CPU), 0, 1),
                             leading(ref.dinitial_state, 0, 1), tol);
        }
}

// dO as a head-major view: the state-gradient scan's copy engine reads only nested strides, so it
// takes chunk_dstate (the delta rule) with the same gradients.
TEST(LinearCuda, BackwardHeadMajorDo) {
    REQUIRE_GPU();
    for (const Cell& cell : kCells) {
        if (cell.config().update != Update::Delta) continue;  // only the delta rule's dS scan reads dO by TMA
        const LinearCase c =
            make_case(std::string(cell.name) + "/head-major-dO", cell.config(), DType::BF16, 2, 150, 2, 2, 64, 64);
        check_backward(c, 13, DType::F64, TokenLayout::HeadMajor);
    }
}

// q, k, v (and dO) as head-major views: stage 3 reads them by the copy engine only with nested
// strides, so here its block copies them itself (every cell: raw q, k for the norms, v for the additive
// update), with the same gradients.
TEST(LinearCuda, BackwardHeadMajorInputs) {
    REQUIRE_GPU();
    for (const Cell& cell : kCells) {
        LinearCase c = make_case(std::string(cell.name) + "/head-major", cell.config(), DType::BF16, 2, 150, 2, 2, 64, 64);
        c.cfg.qk_l2norm = true;
        c.initial_state = true;
        check_backward(c, 17, DType::F64, TokenLayout::HeadMajor, TokenLayout::HeadMajor);
    }
}

// Many value heads a q/k head (G = 3 and 5): stage 3's copy barriers complete once a value head, their
// parity alternating, and dq, dk sum over the group.
TEST(LinearCuda, BackwardManyValueHeads) {
    REQUIRE_GPU();
    for (const Cell& cell : kCells)
        for (const int64_t HV : {3, 5}) {
            LinearCase c = make_case(std::string(cell.name) + "/G" + std::to_string(HV), cell.config(), DType::BF16, 1, 150,
                                     1, HV, 64, 64);
            c.cu_seqlens = {0, 70, 150};
            c.initial_state = true;
            check_backward(c, 19);
        }
}

// Per-token gates in fp32 with bf16 q, k, v (as flash-linear-attention's callers pass them), through
// the bf16 kernels' gate loads.
TEST(LinearCuda, Fp32GatesWithBf16Inputs) {
    REQUIRE_GPU();
    for (const Cell& cell : kCells) {
        if (!per_token_decay(cell.config())) continue;
        LinearCase c = make_case(std::string(cell.name) + "/f32-gates", cell.config(), DType::BF16, 1, 150, 2, 4, 64, 64);
        c.gate_dtype = DType::F32;
        c.cu_seqlens = {0, 70, 150};
        c.initial_state = true;
        check_forward(c);
        check_backward(c, 23);
    }
}

// Gate rows that are not 16-byte aligned (a token stride of HV·K + 1 elements): the vector decay's
// bf16 gate rows are then copied element by element instead of by cp.async (stage_rows' other path;
// on the tensor-core prepare each warp copies its own row block).
TEST(LinearCuda, UnalignedGateRows) {
    REQUIRE_GPU();
    for (const Cell& cell : kCells) {
        if (cell.config().decay != Decay::Vector) continue;
        LinearCase c = make_case(std::string(cell.name) + "/unaligned-gates", cell.config(), DType::BF16, 2, 150, 2, 2, 64, 64);
        c.initial_state = true;
        Tensor padded;  // the gates in a [B, T, HV·K + 1] buffer on the GPU, behind the call's view
        check_forward(c, 5, TokenLayout::Contiguous, {}, [&](const LinearInputs& cpu, LinearForwardArgs& a) {
            const TensorView& g = cpu.g.view();
            ASSERT_EQ(g.dtype, DType::BF16);
            const int64_t B = g.shape[0], T = g.shape[1], HV = g.shape[2], K = g.shape[3], ts = HV * K + 1;
            Tensor host({B, T, ts}, g.dtype);
            for (int64_t bt = 0; bt < B * T; ++bt)
                std::memcpy(static_cast<char*>(host.view().data) + bt * ts * 2,
                            static_cast<const char*>(g.data) + bt * HV * K * 2, size_t(HV * K) * 2);
            padded = host.to(Device::CUDA);
            a.g = TensorView::strided(padded.view().data, g.dtype, {B, T, HV, K}, {T * ts, ts, K, 1}, Device::CUDA);
        });
    }
}

TEST(LinearCuda, BackwardSingleToken) {
    REQUIRE_GPU();
    backward_every_cell("T1", [](LinearCase& c) {
        c.B = 3;
        c.T = 1;
        c.initial_state = true;
        return true;
    });
}

// T = 100: one full chunk and a ragged one; grouped value heads (HV = 2H); initial state and d_final_state.
TEST(LinearCuda, BackwardRaggedGrouped) {
    REQUIRE_GPU();
    backward_every_cell("T100-grouped", [](LinearCase& c) {
        c.HV = 4;
        c.initial_state = true;
        return true;
    });
}

TEST(LinearCuda, BackwardVarlenWithEmptySequences) {
    REQUIRE_GPU();
    backward_every_cell("varlen", [](LinearCase& c) {
        c.B = 1;
        c.T = 200;
        c.HV = 4;
        c.cu_seqlens = {0, 0, 70, 70, 133, 200, 200};
        c.initial_state = true;
        return true;
    });
}

// No token at all (a varlen batch of empty sequences, and B = 2 with T = 0): no chunk, so no kernel
// that reads a token is launched (and no tensor map is made); the final state is the initial one and
// the backward hands d_final_state through to the initial state's gradient.
TEST(LinearCuda, NoTokens) {
    REQUIRE_GPU();
    for (const Cell& cell : kCells)
        for (DType dt : {DType::F32, DType::BF16})
            for (const bool varlen : {true, false}) {
                LinearCase c = make_case(std::string(cell.name) + (varlen ? "/all-empty/" : "/T0/") + dtype_tag(dt),
                                         cell.config(), dt, varlen ? 1 : 2, 0, 2, 4, 64, 64);
                if (varlen) c.cu_seqlens = {0, 0, 0};
                c.initial_state = true;
                check_forward(c);
                check_backward(c);
            }
}

TEST(LinearCuda, BackwardQkL2Norm) {
    REQUIRE_GPU();
    backward_every_cell("l2norm", [](LinearCase& c) {
        c.cfg.qk_l2norm = true;
        c.cfg.scale = 0.3;
        return true;
    });
}

// In-kernel gates: softplus(g + dt_bias)·(−exp(A_log)) for scalar and vector decay (dA_log, ddt_bias),
// β = sigmoid(logit); and the bounded sigmoid gate with β = 2·sigmoid.
TEST(LinearCuda, BackwardInKernelGates) {
    REQUIRE_GPU();
    backward_every_cell("softplus-gate", [](LinearCase& c) {
        c.initial_state = true;
        c.cfg.gate_activation = GateActivation::SoftplusDecay;
        if (c.cfg.update == Update::Delta) {
            c.cfg.beta_activation = BetaActivation::Sigmoid;
            c.beta_min = -4;
            c.beta_max = 4;
        }
        return per_token_decay(c.cfg);
    });
    backward_every_cell("bounded-gate", [](LinearCase& c) {
        c.cfg.qk_l2norm = true;
        c.cfg.gate_activation = GateActivation::BoundedSigmoid;
        c.cfg.lower_bound = -5.0f;
        if (c.cfg.update == Update::Delta) {
            c.cfg.beta_activation = BetaActivation::Sigmoid2x;
            c.beta_min = -4;
            c.beta_max = 4;
        }
        return per_token_decay(c.cfg);
    });
}

// g = −1000 on every token (every decay underflows), and strongly negative gates whose cumulative decay
// over a chunk reaches e^-1280.
TEST(LinearCuda, BackwardExtremeGates) {
    REQUIRE_GPU();
    backward_every_cell("g-1000", [](LinearCase& c) {
        c.initial_state = true;
        c.gate_min = c.gate_max = -1000;
        return c.cfg.decay != Decay::None;
    });
    backward_every_cell("g[-20,-5]", [](LinearCase& c) {
        c.T = 130;
        c.initial_state = true;
        c.gate_min = -20;
        c.gate_max = -5;
        return c.cfg.decay != Decay::None;
    });
    // Per-channel decays whose 16-token block sums straddle e^-80: with vector decay a few row blocks take
    // the entry-by-entry diagonal products of the tensor-core backward, their neighbours the factored ones.
    backward_every_cell("g[-7,0]", [](LinearCase& c) {
        c.T = 200;
        c.HV = 4;
        c.initial_state = true;
        c.gate_min = -7;
        c.gate_max = 0;
        return c.cfg.decay == Decay::Vector;
    });
}

TEST(LinearCuda, BackwardBetaEdges) {
    REQUIRE_GPU();
    for (double b : {0.0, 1.0})
        backward_every_cell("beta=" + std::to_string(int(b)), [b](LinearCase& c) {
            c.beta_min = c.beta_max = b;
            c.initial_state = true;
            return c.cfg.update == Update::Delta;
        });
}

TEST(LinearCuda, BackwardHeadDims) {
    REQUIRE_GPU();
    for (auto kv : {std::pair<int64_t, int64_t>{128, 128}, {64, 128}, {128, 64}})
        backward_every_cell("K" + std::to_string(kv.first) + "V" + std::to_string(kv.second), [kv](LinearCase& c) {
            c.B = 1;
            c.T = 130;
            c.K = kv.first;
            c.V = kv.second;
            c.initial_state = true;
            return true;
        });
}

// Many chunks per sequence: the recomputed chunk-start states, the reverse state-gradient scan and the
// per-chunk kernel's work items (chunk × head) across a long sequence, grouped value heads.
TEST(LinearCuda, BackwardManyChunks) {
    REQUIRE_GPU();
    backward_every_cell("T1000", [](LinearCase& c) {
        c.B = 1;
        c.T = 1000;
        c.HV = 4;
        c.initial_state = true;
        return true;
    });
}

// Varlen sequences of many chunks each (ragged ends, an empty one); and B = 3 rows of several chunks
// in fp16 (the fp32-operand scan, fed a dO that is not in the operand dtype).
TEST(LinearCuda, BackwardVarlenManyChunks) {
    REQUIRE_GPU();
    backward_every_cell("varlen-long", [](LinearCase& c) {
        c.B = 1;
        c.T = 900;
        c.cu_seqlens = {0, 300, 300, 651, 900};
        c.initial_state = true;
        return true;
    });
    for (const Cell& cell : kCells) {
        LinearCase c = make_case(std::string(cell.name) + "/B3-T260/f16", cell.config(), DType::F16, 3, 260, 2, 4, 64, 64);
        c.initial_state = true;
        check_backward(c);
    }
}

// dO in fp32 with bf16 inputs: the kernels convert it on load instead of copying it.
TEST(LinearCuda, BackwardMixedDtypeDo) {
    REQUIRE_GPU();
    for (const Cell& cell : kCells) {
        LinearCase c = make_case(std::string(cell.name) + "/dO-f32", cell.config(), DType::BF16, 2, 150, 2, 2, 64, 64);
        c.initial_state = true;
        check_backward(c, 1, DType::F32);
    }
}

// The state-gradient scan's V-tile follows the forward scan's (HLA_CUDA_SCAN_VT forces it): every
// width, K = V = 128, both 16-bit and fp32 operands.
TEST(LinearCuda, BackwardScanTileWidths) {
    REQUIRE_GPU();
    for (const char* vt : {"16", "32", "64"}) {
        setenv("HLA_CUDA_SCAN_VT", vt, 1);
        backward_every_cell(std::string("VT") + vt, [](LinearCase& c) {
            c.B = 1;
            c.T = 200;
            c.K = c.V = 128;
            c.initial_state = true;
            return true;
        });
    }
    unsetenv("HLA_CUDA_SCAN_VT");
}
