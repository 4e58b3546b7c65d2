// hla tests — inputs of a linear-family case and the tolerance policy (DESIGN.md, "Numerics").
#include "support/linear_case.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <sstream>

#include "ops/linear/problem.hpp"

namespace hla::test {

namespace {

// Writes a double buffer into a new CPU tensor of `dtype` (rounding as the dtype stores).
Tensor from_doubles(const std::vector<int64_t>& shape, DType dtype, const std::vector<double>& values) {
    Tensor t(shape, dtype);
    for (size_t i = 0; i < values.size(); ++i) store_from_double(t.data(), dtype, int64_t(i), values[i]);
    return t;
}

int64_t numel_of(const std::vector<int64_t>& shape) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
}

std::vector<double> uniform(std::mt19937_64& rng, int64_t n, double lo, double hi) {
    std::uniform_real_distribution<double> dist(lo, hi);
    std::vector<double> x(static_cast<size_t>(n));
    for (double& e : x) e = lo == hi ? lo : dist(rng);
    return x;
}

std::vector<double> normal(std::mt19937_64& rng, int64_t n, double scale = 1.0) {
    std::normal_distribution<double> dist(0.0, scale);
    std::vector<double> x(static_cast<size_t>(n));
    for (double& e : x) e = dist(rng);
    return x;
}

Tensor nan_tensor(const std::vector<int64_t>& shape, DType dtype, Device device) {
    Tensor t(shape, dtype, device);
    t.fill(std::numeric_limits<double>::quiet_NaN());
    return t;
}

Tensor moved(const Tensor& t, Device device) { return t.defined() ? t.to(device) : Tensor(); }

Tensor on_cpu(const Tensor& t) { return t.device() == Device::CPU ? t : t.to(Device::CPU); }

// HLA_TEST_VERBOSE=1 prints every comparison, passing or not: margins show before they are lost.
bool verbose() {
    static const bool on = [] {
        const char* v = std::getenv("HLA_TEST_VERBOSE");
        return v != nullptr && *v != '\0' && *v != '0';
    }();
    return on;
}

}  // namespace

LinearForwardArgs LinearInputs::args(const Tensor& o, const Tensor* final_state) const {
    LinearForwardArgs a;
    a.q = q;
    a.k = k;
    a.v = v;
    a.g = g;
    a.beta = beta;
    a.A_log = A_log;
    a.dt_bias = dt_bias;
    a.initial_state = initial_state;
    a.cu_seqlens = cu_seqlens;
    a.o = o;
    if (final_state) a.final_state = *final_state;
    return a;
}

LinearInputs LinearInputs::move_to(Device device) const {
    LinearInputs r;
    r.q = moved(q, device);
    r.k = moved(k, device);
    r.v = moved(v, device);
    r.g = moved(g, device);
    r.beta = moved(beta, device);
    r.A_log = moved(A_log, device);
    r.dt_bias = moved(dt_bias, device);
    r.initial_state = moved(initial_state, device);
    r.cu_seqlens = moved(cu_seqlens, device);
    r.N = N;
    return r;
}

LinearInputs make_inputs(const LinearCase& c, uint64_t seed) {
    std::mt19937_64 rng(seed);
    LinearInputs in;
    in.N = c.cu_seqlens.empty() ? c.B : int64_t(c.cu_seqlens.size()) - 1;
    const LinearConfig& cfg = c.cfg;

    const std::vector<int64_t> qk_shape = {c.B, c.T, c.H, c.K};
    in.q = from_doubles(qk_shape, c.dtype, normal(rng, numel_of(qk_shape)));
    std::vector<double> k = normal(rng, numel_of(qk_shape));
    if (c.normalize_k && !cfg.qk_l2norm) {
        // Unit keys keep I − β k kᵀ a contraction for β ∈ [0, 2], as the models' own L2 norm does.
        for (int64_t row = 0; row < c.B * c.T * c.H; ++row) {
            double ss = 0;
            for (int64_t i = 0; i < c.K; ++i) ss += k[size_t(row * c.K + i)] * k[size_t(row * c.K + i)];
            const double inv = ss > 0 ? 1.0 / std::sqrt(ss) : 0.0;
            for (int64_t i = 0; i < c.K; ++i) k[size_t(row * c.K + i)] *= inv;
        }
    }
    in.k = from_doubles(qk_shape, c.dtype, k);
    const std::vector<int64_t> v_shape = {c.B, c.T, c.HV, c.V};
    in.v = from_doubles(v_shape, c.dtype, normal(rng, numel_of(v_shape)));

    const bool gated = cfg.gate_activation != GateActivation::None;
    std::vector<int64_t> g_shape;
    switch (cfg.decay) {
        case Decay::None: break;
        case Decay::Fixed: g_shape = {c.HV}; break;
        case Decay::Scalar: g_shape = {c.B, c.T, c.HV}; break;
        case Decay::Vector: g_shape = {c.B, c.T, c.HV, c.K}; break;
    }
    if (!g_shape.empty()) {
        const int64_t n = numel_of(g_shape);
        const DType g_dtype = cfg.decay == Decay::Fixed ? DType::F32 : c.gate_dtype != DType::F64 ? c.gate_dtype : c.dtype;
        in.g = from_doubles(g_shape, g_dtype, gated ? normal(rng, n) : uniform(rng, n, c.gate_min, c.gate_max));
    }
    if (gated) {
        in.A_log = from_doubles({c.HV}, DType::F32, uniform(rng, c.HV, -1.0, 1.0));
        const std::vector<int64_t> bias_shape =
            cfg.decay == Decay::Vector ? std::vector<int64_t>{c.HV, c.K} : std::vector<int64_t>{c.HV};
        in.dt_bias = from_doubles(bias_shape, DType::F32, uniform(rng, numel_of(bias_shape), -1.0, 1.0));
    }
    if (cfg.update == Update::Delta) {
        const std::vector<int64_t> b_shape = {c.B, c.T, c.HV};
        in.beta = from_doubles(b_shape, c.dtype, uniform(rng, numel_of(b_shape), c.beta_min, c.beta_max));
    }
    if (c.initial_state) {
        const std::vector<int64_t> s_shape = {in.N, c.HV, c.K, c.V};
        in.initial_state = from_doubles(s_shape, DType::F32, normal(rng, numel_of(s_shape), c.initial_state_scale));
    }
    if (!c.cu_seqlens.empty()) {
        in.cu_seqlens = Tensor({int64_t(c.cu_seqlens.size())}, DType::I64);
        for (size_t i = 0; i < c.cu_seqlens.size(); ++i) in.cu_seqlens.ptr<int64_t>()[i] = c.cu_seqlens[i];
    }
    return in;
}

Tensor poisoned_output(const LinearCase& c, Device device) { return nan_tensor({c.B, c.T, c.HV, c.V}, c.dtype, device); }

Tensor poisoned_state(const LinearCase& c, int64_t N, Device device) {
    return nan_tensor({N, c.HV, c.K, c.V}, DType::F32, device);
}

std::string ErrorStats::str() const {
    std::ostringstream os;
    os << "rel_rms " << rel_rms << ", max_abs " << max_abs;
    if (!finite) os << " (NaN or Inf present)";
    return os.str();
}

ErrorStats compare(const Tensor& out_any, const Tensor& ref_any) {
    HLA_CHECK(out_any.sizes() == ref_any.sizes(), "compare: shapes differ: ", out_any.view().shape_string(), " vs ",
              ref_any.view().shape_string());
    const Tensor out = on_cpu(out_any), ref = on_cpu(ref_any);
    ErrorStats e;
    double diff2 = 0, ref2 = 0;
    for (int64_t i = 0; i < out.numel(); ++i) {
        const double x = load_as_double(out.data(), out.dtype(), i);
        const double r = load_as_double(ref.data(), ref.dtype(), i);
        if (!std::isfinite(x) || !std::isfinite(r)) {
            e.finite = false;
            continue;
        }
        diff2 += (x - r) * (x - r);
        ref2 += r * r;
        e.max_abs = std::max(e.max_abs, std::fabs(x - r));
    }
    // An all-zero reference (e.g. the gradient of an unused input) makes the error absolute.
    e.rel_rms = ref2 > 0 ? std::sqrt(diff2 / ref2) : std::sqrt(diff2);
    if (!e.finite) e.rel_rms = e.max_abs = std::numeric_limits<double>::infinity();
    return e;
}

void expect_close(const std::string& what, const Tensor& out, const Tensor& ref64, const Tensor& ref_in_p,
                  double rel_floor) {
    const ErrorStats e = compare(out, ref64);
    const ErrorStats e_p = compare(ref_in_p, ref64);
    const double bound = 2 * e_p.rel_rms + rel_floor;
    if (verbose())
        std::printf("  %-60s %s (bound %.3g, reference in %s %s)\n", what.c_str(), e.str().c_str(), bound,
                    dtype_name(ref_in_p.dtype()), e_p.str().c_str());
    EXPECT_TRUE(e.finite && e_p.finite && e.rel_rms <= bound)
        << what << ": error vs fp64 reference " << e.str() << "; reference run in "
        << dtype_name(ref_in_p.dtype()) << " storage: " << e_p.str() << "; bound 2 * " << e_p.rel_rms << " + "
        << rel_floor << " = " << bound;
}

void expect_close_abs(const std::string& what, const Tensor& out, const Tensor& ref64, double rel_tol) {
    const ErrorStats e = compare(out, ref64);
    if (verbose()) std::printf("  %-60s %s (bound %.3g)\n", what.c_str(), e.str().c_str(), rel_tol);
    EXPECT_TRUE(e.finite && e.rel_rms <= rel_tol) << what << ": error vs fp64 reference " << e.str() << "; bound "
                                                  << rel_tol;
}

Tensor random_normal(const std::vector<int64_t>& shape, DType dtype, uint64_t seed, double scale) {
    std::mt19937_64 rng(seed);
    return from_doubles(shape, dtype, normal(rng, numel_of(shape), scale));
}

LinearGrads LinearGradTensors::views() const {
    return LinearGrads{dq, dk, dv, dg, dbeta, dA_log, ddt_bias, dinitial_state};
}

LinearGradTensors LinearGradTensors::move_to(Device device) const {
    return LinearGradTensors{moved(dq, device),    moved(dk, device),      moved(dv, device),
                             moved(dg, device),    moved(dbeta, device),   moved(dA_log, device),
                             moved(ddt_bias, device), moved(dinitial_state, device)};
}

void expect_grads_close(const std::string& what, const LinearGradTensors& got, const LinearGradTensors& ref64,
                        double rel_tol) {
    const std::vector<std::pair<const char*, Tensor LinearGradTensors::*>> grads = {
        {"dq", &LinearGradTensors::dq},         {"dk", &LinearGradTensors::dk},
        {"dv", &LinearGradTensors::dv},         {"dg", &LinearGradTensors::dg},
        {"dbeta", &LinearGradTensors::dbeta},   {"dA_log", &LinearGradTensors::dA_log},
        {"ddt_bias", &LinearGradTensors::ddt_bias}, {"dinitial_state", &LinearGradTensors::dinitial_state}};
    for (const auto& [name, member] : grads) {
        ASSERT_EQ((ref64.*member).defined(), (got.*member).defined()) << what << ": " << name;
        if ((ref64.*member).defined())
            expect_close_abs(what + ": " + name, (got.*member).to(Device::CPU), ref64.*member, rel_tol);
    }
}

LinearGradTensors poisoned_grads(const LinearCase& c, int64_t N, Device device) {
    LinearGradTensors g;
    g.dq = nan_tensor({c.B, c.T, c.H, c.K}, c.dtype, device);
    g.dk = nan_tensor({c.B, c.T, c.H, c.K}, c.dtype, device);
    g.dv = nan_tensor({c.B, c.T, c.HV, c.V}, c.dtype, device);
    switch (c.cfg.decay) {
        case Decay::None: break;
        case Decay::Fixed: g.dg = nan_tensor({c.HV}, DType::F32, device); break;
        case Decay::Scalar: g.dg = nan_tensor({c.B, c.T, c.HV}, DType::F32, device); break;
        case Decay::Vector: g.dg = nan_tensor({c.B, c.T, c.HV, c.K}, DType::F32, device); break;
    }
    if (c.cfg.update == Update::Delta) g.dbeta = nan_tensor({c.B, c.T, c.HV}, DType::F32, device);
    if (c.cfg.gate_activation != GateActivation::None) {
        g.dA_log = nan_tensor({c.HV}, DType::F32, device);
        g.ddt_bias = c.cfg.decay == Decay::Vector ? nan_tensor({c.HV, c.K}, DType::F32, device)
                                                  : nan_tensor({c.HV}, DType::F32, device);
    }
    if (c.initial_state) g.dinitial_state = nan_tensor({N, c.HV, c.K, c.V}, DType::F32, device);
    return g;
}

void reference_forward_in_precision(const LinearConfig& cfg, const LinearForwardArgs& args, DType dtype) {
    LinearConfig c = cfg;
    c.backend = Backend::Reference;
    linear::reference::forward_in_precision(linear::make_forward_problem("reference_forward_in_precision", c, args),
                                            dtype);
}

}  // namespace hla::test
