#include "cli/bench_inputs.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace hla::cli {
namespace {

// splitmix64's finaliser: a bijective 64-bit mix, good enough to make independent streams from
// (seed, tensor, index) without any sequential state, so generation parallelises and slices agree.
inline uint64_t mix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

inline double uniform01(uint64_t stream, uint64_t index) {
    return double(mix64(stream ^ mix64(index)) >> 11) * 0x1.0p-53;  // [0, 1)
}

inline float gaussian(uint64_t stream, uint64_t index) {
    // Box–Muller on two uniforms of the same element; 1 − u keeps the log finite.
    const double u1 = 1.0 - uniform01(stream, 2 * index);
    const double u2 = uniform01(stream, 2 * index + 1);
    return float(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
}

// Tensor ids, so each tensor has its own stream.
enum Stream : uint64_t { kQ = 1, kK, kV, kG, kBeta, kDo, kState };

inline uint64_t stream_of(uint64_t seed, Stream s) { return mix64(seed * 0x100000001b3ull + s); }

// Fills a [outer, heads, inner] f32 tensor with f(stream, index) where index is the element's
// position in the full [outer, heads_full, inner] tensor.
template <class F>
void fill_sliced(const Tensor& t, int64_t outer, int64_t heads, int64_t heads_full, int64_t inner, uint64_t stream,
                 F f) {
    float* p = t.ptr<float>();
    constexpr int64_t kRowsPerTask = 64;
    const int64_t tasks = (outer + kRowsPerTask - 1) / kRowsPerTask;
    parallel_for(tasks, [&](int64_t task) {
        const int64_t o_end = std::min(outer, (task + 1) * kRowsPerTask);
        for (int64_t o = task * kRowsPerTask; o < o_end; ++o)
            for (int64_t h = 0; h < heads; ++h)
                for (int64_t i = 0; i < inner; ++i)
                    p[(o * heads + h) * inner + i] = f(stream, uint64_t((o * heads_full + h) * inner + i));
    });
}

Tensor gaussian_tensor(std::vector<int64_t> sizes, int64_t outer, int64_t heads, int64_t heads_full, int64_t inner,
                       uint64_t stream) {
    Tensor t(std::move(sizes), DType::F32);
    fill_sliced(t, outer, heads, heads_full, inner, stream, gaussian);
    return t;
}

Tensor uniform_tensor(std::vector<int64_t> sizes, int64_t outer, int64_t heads, int64_t heads_full, int64_t inner,
                      uint64_t stream, double lo, double hi) {
    Tensor t(std::move(sizes), DType::F32);
    fill_sliced(t, outer, heads, heads_full, inner, stream,
                [lo, hi](uint64_t s, uint64_t i) { return float(lo + (hi - lo) * uniform01(s, i)); });
    return t;
}

Tensor copy_to(const Tensor& t, Device d) { return t.defined() ? t.to(d) : Tensor(); }

}  // namespace

LinearForwardArgs OpInputs::args() const {
    LinearForwardArgs a;
    a.q = q;
    a.k = k;
    a.v = v;
    if (g.defined()) a.g = g;
    if (beta.defined()) a.beta = beta;
    return a;
}

LinearDecodeArgs OpInputs::decode_args() const {
    LinearDecodeArgs a;
    a.q = q;
    a.k = k;
    a.v = v;
    if (g.defined()) a.g = g;
    if (beta.defined()) a.beta = beta;
    return a;
}

OpInputs OpInputs::to(Device d) const {
    return {copy_to(q, d), copy_to(k, d), copy_to(v, d), copy_to(g, d), copy_to(beta, d)};
}

OpInputs OpInputs::to(DType dt) const {
    OpInputs r;
    r.q = q.to(dt);
    r.k = k.to(dt);
    r.v = v.to(dt);
    // A fixed decay [HV] is f32 by contract; per-token gates and β come in the input dtype.
    if (g.defined()) r.g = g.view().ndim == 1 ? g : g.to(dt);
    if (beta.defined()) r.beta = beta.to(dt);
    return r;
}

OpInputs make_attention_inputs(const BenchShape& s, uint64_t seed) {
    const int64_t rows = s.B * s.T, HV_full = s.H_full * (s.HV / s.H);
    OpInputs in;
    in.q = gaussian_tensor({s.B, s.T, s.H, s.K}, rows, s.H, s.H_full, s.K, stream_of(seed, kQ));
    in.k = gaussian_tensor({s.B, s.T, s.HV, s.K}, rows, s.HV, HV_full, s.K, stream_of(seed, kK));
    in.v = gaussian_tensor({s.B, s.T, s.HV, s.K}, rows, s.HV, HV_full, s.K, stream_of(seed, kV));
    return in;
}

OpInputs make_inputs(const LinearConfig& cfg, const BenchShape& s, uint64_t seed) {
    const int64_t G = s.HV / s.H;
    const int64_t HV_full = s.H_full * G;
    const int64_t rows = s.B * s.T;
    OpInputs in;
    in.q = gaussian_tensor({s.B, s.T, s.H, s.K}, rows, s.H, s.H_full, s.K, stream_of(seed, kQ));
    in.k = gaussian_tensor({s.B, s.T, s.H, s.K}, rows, s.H, s.H_full, s.K, stream_of(seed, kK));
    in.v = gaussian_tensor({s.B, s.T, s.HV, s.V}, rows, s.HV, HV_full, s.V, stream_of(seed, kV));

    // Unit-norm key rows: with β ∈ [0, 1] every delta step (I − β k kᵀ) is then a contraction, as
    // in the models (which L2-normalise k), so T = 4096 stays well conditioned.
    float* k = in.k.ptr<float>();
    parallel_for(rows * s.H, [&](int64_t row) {
        float* x = k + row * s.K;
        double ss = 0;
        for (int64_t i = 0; i < s.K; ++i) ss += double(x[i]) * x[i];
        const float inv = float(1.0 / std::sqrt(ss + 1e-12));
        for (int64_t i = 0; i < s.K; ++i) x[i] *= inv;
    });

    switch (cfg.decay) {
        case Decay::None: break;
        case Decay::Fixed: {
            std::vector<float> full(static_cast<size_t>(HV_full));
            lightning_attn_log_decay(HV_full, 0, 2, full.data());
            in.g = Tensor({s.HV}, DType::F32);
            std::copy(full.begin(), full.begin() + s.HV, in.g.ptr<float>());
            break;
        }
        case Decay::Scalar:
            in.g = uniform_tensor({s.B, s.T, s.HV}, rows, s.HV, HV_full, 1, stream_of(seed, kG), -1.0, -0.001);
            break;
        case Decay::Vector:
            in.g = uniform_tensor({s.B, s.T, s.HV, s.K}, rows, s.HV, HV_full, s.K, stream_of(seed, kG), -1.0, -0.001);
            break;
    }
    if (cfg.update == Update::Delta)
        in.beta = uniform_tensor({s.B, s.T, s.HV}, rows, s.HV, HV_full, 1, stream_of(seed, kBeta), 0.0, 1.0);
    return in;
}

Tensor make_output_grad(const BenchShape& s, uint64_t seed) {
    const int64_t HV_full = s.H_full * (s.HV / s.H);
    return gaussian_tensor({s.B, s.T, s.HV, s.V}, s.B * s.T, s.HV, HV_full, s.V, stream_of(seed, kDo));
}

Tensor make_state(const BenchShape& s, double scale, uint64_t seed) {
    const int64_t HV_full = s.H_full * (s.HV / s.H);
    Tensor t = gaussian_tensor({s.B, s.HV, s.K, s.V}, s.B, s.HV, HV_full, s.K * s.V, stream_of(seed, kState));
    float* p = t.ptr<float>();
    for (int64_t i = 0; i < t.numel(); ++i) p[i] = float(p[i] * scale);
    return t;
}

TensorView token_slice(const TensorView& x, int64_t t) {
    TensorView s = x;
    s.shape[1] = 1;
    s.data = static_cast<char*>(x.data) + t * x.stride[1] * int64_t(dtype_size(x.dtype));
    return s;
}

void ErrorStats::merge(const ErrorStats& o) {
    rel = std::max(rel, o.rel);
    max_abs = std::max(max_abs, o.max_abs);
    finite = finite && o.finite;
}

ErrorStats compare(const Tensor& out_any, const Tensor& ref_any) {
    const Tensor out = out_any.device() == Device::CPU ? out_any : out_any.to(Device::CPU);
    const Tensor ref = ref_any.device() == Device::CPU ? ref_any : ref_any.to(Device::CPU);
    HLA_CHECK(out.sizes() == ref.sizes(), "hla bench: compare: output ", out.view().shape_string(),
              " and reference ", ref.view().shape_string(), " differ in shape");
    double diff2 = 0, ref2 = 0, max_abs = 0;
    bool finite = true;
    for (int64_t i = 0; i < ref.numel(); ++i) {
        const double o = load_as_double(out.data(), out.dtype(), i);
        const double r = load_as_double(ref.data(), ref.dtype(), i);
        if (!std::isfinite(o)) finite = false;
        diff2 += (o - r) * (o - r);
        ref2 += r * r;
        max_abs = std::max(max_abs, std::fabs(o - r));
    }
    ErrorStats e;
    e.finite = finite;
    e.rel = finite ? std::sqrt(diff2 / std::max(ref2, 1e-300)) : std::numeric_limits<double>::quiet_NaN();
    e.max_abs = finite ? max_abs : std::numeric_limits<double>::quiet_NaN();
    return e;
}

void poison(const Tensor& t) {
    Tensor shared = t;  // a handle on the same storage (fill is not const)
    shared.fill(std::numeric_limits<double>::quiet_NaN());
}

}  // namespace hla::cli
