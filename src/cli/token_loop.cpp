#include "cli/token_loop.hpp"

#include <cmath>
#include <cstdint>
#include <vector>

#include "hla/threading.hpp"

namespace hla::cli {

namespace {

// The two BLAS-1 kernels the loop is made of; __restrict tells the compiler the vectors do not
// overlap, so it vectorises without run-time alias checks (ggml's ggml_vec_mad_f32 / _scale_f32).
inline void axpy(int64_t n, float alpha, const float* __restrict x, float* __restrict y) {
    for (int64_t j = 0; j < n; ++j) y[j] += alpha * x[j];
}
inline void scale(int64_t n, float alpha, float* __restrict x) {
    for (int64_t j = 0; j < n; ++j) x[j] *= alpha;
}

constexpr int64_t kLineFloats = 64 / sizeof(float);
float* line_aligned(float* p) {
    const uintptr_t u = reinterpret_cast<uintptr_t>(p);
    return reinterpret_cast<float*>((u + 63) / 64 * 64);
}

}  // namespace

void token_loop(const TokenLoopArgs& a) {
    const int64_t G = a.HV / a.H, K = a.K, V = a.V;
    parallel_for(a.B * a.HV, [&](int64_t task) {
        const int64_t b = task / a.HV, hv = task % a.HV, h = hv / G;
        // The state and u start on a cache line, as the caller's tensors do (and ggml's): the loop
        // streams the 64 KiB state through L2 three to four times per token, and a state 16 bytes off
        // a line made it ~17% slower (1 thread, delta rule), so where the heap happened to put a
        // plain vector decided the speed-up column by up to 20% from one process to the next.
        std::vector<float> own;
        float* S = nullptr;  // [K][V], row i holds key channel i
        if (a.state) {
            S = a.state + (b * a.HV + hv) * K * V;
        } else {
            own.assign(size_t(K * V + kLineFloats), 0.0f);
            S = line_aligned(own.data());
        }
        // Per-thread scratch, so a decode step (T = 1) allocates nothing after the first call.
        thread_local std::vector<float> u_buf;
        if (u_buf.size() < size_t(V + kLineFloats)) u_buf.resize(size_t(V + kLineFloats));
        float* u = line_aligned(u_buf.data());
        for (int64_t t = 0; t < a.T; ++t) {
            const int64_t row = b * a.T + t;
            const float* q = a.q + (row * a.H + h) * K;
            const float* k = a.k + (row * a.H + h) * K;
            const float* v = a.v + (row * a.HV + hv) * V;
            float* o = a.o + (row * a.HV + hv) * V;

            // S ← D_t S
            switch (a.decay) {
                case Decay::None: break;
                case Decay::Fixed:
                case Decay::Scalar: {
                    const float d = std::exp(a.decay == Decay::Fixed ? a.g[hv] : a.g[row * a.HV + hv]);
                    for (int64_t i = 0; i < K; ++i) scale(V, d, S + i * V);
                    break;
                }
                case Decay::Vector: {
                    const float* g = a.g + (row * a.HV + hv) * K;
                    for (int64_t i = 0; i < K; ++i) scale(V, std::exp(g[i]), S + i * V);
                    break;
                }
            }

            // additive: S ← S + k vᵀ;   delta: u = β (v − Sᵀ k), S ← S + k uᵀ
            const float* update = v;
            if (a.update == Update::Delta) {
                for (int64_t j = 0; j < V; ++j) u[j] = 0.0f;
                for (int64_t i = 0; i < K; ++i) axpy(V, k[i], S + i * V, u);
                const float beta = a.beta[row * a.HV + hv];
                for (int64_t j = 0; j < V; ++j) u[j] = beta * (v[j] - u[j]);
                update = u;
            }
            for (int64_t i = 0; i < K; ++i) axpy(V, k[i], update, S + i * V);

            // o = Sᵀ (s q)
            for (int64_t j = 0; j < V; ++j) o[j] = 0.0f;
            for (int64_t i = 0; i < K; ++i) axpy(V, a.scale * q[i], S + i * V, o);
        }
    });
}

}  // namespace hla::cli
