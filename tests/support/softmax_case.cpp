// hla tests — inputs of a softmax-attention case and the tolerance policy (DESIGN.md, "Numerics").
#include "support/softmax_case.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <sstream>

namespace hla::test::sm {

Tensor randn(const std::vector<int64_t>& shape, DType dtype, uint64_t seed, double scale) {
    Tensor t(shape, dtype);
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> nd(0.0, 1.0);
    for (int64_t i = 0; i < t.numel(); ++i) store_from_double(t.data(), dtype, i, scale * nd(rng));
    return t;
}

static Tensor uniform(const std::vector<int64_t>& shape, DType dtype, uint64_t seed, double lo, double hi) {
    Tensor t(shape, dtype);
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<double> ud(lo, hi);
    for (int64_t i = 0; i < t.numel(); ++i) store_from_double(t.data(), dtype, i, ud(rng));
    return t;
}

Tensor poisoned(const std::vector<int64_t>& shape, DType dtype, Device device) {
    Tensor t(shape, dtype, device);
    t.fill(std::numeric_limits<double>::quiet_NaN());
    return t;
}

SoftmaxInputs make_inputs(const SoftmaxCase& c, uint64_t seed) {
    SoftmaxInputs in;
    in.q = randn({c.B, c.T, c.HQ, c.D}, c.dtype, seed * 7 + 1, c.q_scale);
    in.k = randn({c.B, c.T, c.HKV, c.D}, c.dtype, seed * 7 + 2);
    in.v = randn({c.B, c.T, c.HKV, c.D}, c.dtype, seed * 7 + 3);
    in.d_o = randn({c.B, c.T, c.HQ, c.D}, c.dtype, seed * 7 + 4);
    if (c.forget_gate) in.g = uniform({c.B, c.T, c.HQ}, c.dtype, seed * 7 + 5, c.g_min, c.g_max);
    if (c.output_gate) in.gate = randn({c.B, c.T, c.HQ, c.D}, c.dtype, seed * 7 + 6, 2.0);
    if (!c.cu_seqlens.empty()) {
        in.cu_seqlens = Tensor({int64_t(c.cu_seqlens.size())}, DType::I32);
        for (size_t i = 0; i < c.cu_seqlens.size(); ++i) in.cu_seqlens.ptr<int32_t>()[i] = int32_t(c.cu_seqlens[i]);
    }
    return in;
}

SoftmaxForwardArgs SoftmaxInputs::args(const Tensor& o, const Tensor* lse) const {
    SoftmaxForwardArgs a;
    a.q = q;
    a.k = k;
    a.v = v;
    if (g.defined()) a.g = g;
    if (gate.defined()) a.gate = gate;
    if (cu_seqlens.defined()) a.cu_seqlens = cu_seqlens;
    a.o = o;
    if (lse) a.lse = *lse;
    return a;
}

static Tensor moved(const Tensor& t, Device d) { return t.defined() ? t.to(d) : Tensor(); }

SoftmaxInputs SoftmaxInputs::to(Device device) const {
    SoftmaxInputs r;
    r.q = moved(q, device);
    r.k = moved(k, device);
    r.v = moved(v, device);
    r.g = moved(g, device);
    r.gate = moved(gate, device);
    r.cu_seqlens = moved(cu_seqlens, device);
    r.d_o = moved(d_o, device);
    return r;
}

SoftmaxGrads GradTensors::views() const {
    SoftmaxGrads g;
    g.dq = dq;
    g.dk = dk;
    g.dv = dv;
    if (dg.defined()) g.dg = dg;
    if (dgate.defined()) g.dgate = dgate;
    return g;
}

GradTensors poisoned_grads(const SoftmaxCase& c, DType dtype, Device device) {
    GradTensors g;
    g.dq = poisoned({c.B, c.T, c.HQ, c.D}, dtype, device);
    g.dk = poisoned({c.B, c.T, c.HKV, c.D}, dtype, device);
    g.dv = poisoned({c.B, c.T, c.HKV, c.D}, dtype, device);
    if (c.forget_gate) g.dg = poisoned({c.B, c.T, c.HQ}, DType::F32, device);
    if (c.output_gate) g.dgate = poisoned({c.B, c.T, c.HQ, c.D}, dtype, device);
    return g;
}

std::string ErrorStats::str() const {
    std::ostringstream os;
    os << "rel_rms " << rel_rms << ", rms_abs " << rms_abs << ", max_abs " << max_abs << (finite ? "" : ", NOT FINITE");
    return os.str();
}

ErrorStats compare(const Tensor& out_any, const Tensor& ref_any) {
    const Tensor out = out_any.device() == Device::CPU ? out_any : out_any.to(Device::CPU);
    const Tensor ref = ref_any.device() == Device::CPU ? ref_any : ref_any.to(Device::CPU);
    EXPECT_EQ(out.numel(), ref.numel());
    ErrorStats e;
    double num = 0, den = 0;
    for (int64_t i = 0; i < std::min(out.numel(), ref.numel()); ++i) {
        const double x = load_as_double(out.data(), out.dtype(), i);
        const double r = load_as_double(ref.data(), ref.dtype(), i);
        if (std::isinf(r) && r < 0 && std::isinf(x) && x < 0) continue;  // lse of a row with no key
        if (!std::isfinite(x)) {
            e.finite = false;
            continue;
        }
        num += (x - r) * (x - r);
        den += r * r;
        e.max_abs = std::max(e.max_abs, std::abs(x - r));
    }
    const double count = double(std::max<int64_t>(1, out.numel()));
    e.rms_abs = std::sqrt(num / count);
    e.rel_rms = den > 0 ? std::sqrt(num / den) : e.rms_abs;
    return e;
}

void expect_close(const std::string& what, const Tensor& out, const Tensor& ref64, const Tensor& ref_in_p,
                  double rel_floor, double abs_floor) {
    const ErrorStats e = compare(out, ref64);
    const ErrorStats base = compare(ref_in_p, ref64);
    const double bound = 2 * base.rel_rms + rel_floor;
    EXPECT_TRUE(e.finite && (e.rel_rms <= bound || e.rms_abs <= abs_floor))
        << what << ": " << e.str() << " vs bound " << bound << " (reference in precision: " << base.str() << ")";
}

void expect_close_abs(const std::string& what, const Tensor& out, const Tensor& ref, double rel_tol) {
    const ErrorStats e = compare(out, ref);
    EXPECT_TRUE(e.finite && e.rel_rms <= rel_tol) << what << ": " << e.str() << " vs bound " << rel_tol;
}

}  // namespace hla::test::sm
