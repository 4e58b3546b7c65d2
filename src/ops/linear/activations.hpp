// hla — the per-token transforms applied before the recurrence (SPECS.md §1, "in-kernel gate and
// normalisation options") and their derivatives. Scalar, templated on the arithmetic type so the
// fp64 reference and the fp32 backends share one definition of the math.
#pragma once

#include <cmath>

#include "hla/linear.hpp"

// The scalar transforms are also compiled for the GPU (src/ops/linear/cuda), so one definition of the
// math serves every backend.
#if defined(__CUDACC__)
#define HLA_HOST_DEVICE __host__ __device__
#else
#define HLA_HOST_DEVICE
#endif

namespace hla::linear {

constexpr double kL2NormEps = 1e-6;

template <class R>
HLA_HOST_DEVICE R softplus(R x) {
    // log(1 + e^x) without overflow for large x and without losing digits for very negative x
    return x > R(20) ? x : std::log1p(std::exp(x));
}

template <class R>
HLA_HOST_DEVICE R sigmoid(R x) {
    return x >= R(0) ? R(1) / (R(1) + std::exp(-x)) : std::exp(x) / (R(1) + std::exp(x));
}

// ‖x‖ as the kernel normalises it: sqrt(Σx² + 1e-6).
template <class R>
R l2norm_denominator(const R* x, int64_t n) {
    R s = 0;
    for (int64_t i = 0; i < n; ++i) s += x[i] * x[i];
    return std::sqrt(s + R(kL2NormEps));
}

// y = x / ‖x‖  ⇒  dx = (dy − y ⟨y, dy⟩) / ‖x‖   (in place on dy → dx)
template <class R>
void l2norm_backward(const R* y, R norm, R* dy_to_dx, int64_t n) {
    R dot = 0;
    for (int64_t i = 0; i < n; ++i) dot += y[i] * dy_to_dx[i];
    for (int64_t i = 0; i < n; ++i) dy_to_dx[i] = (dy_to_dx[i] - y[i] * dot) / norm;
}

// Log decay from the gate input x = g (+ dt_bias), with A = A_log. The (activation, lower_bound) form
// is what kernels call, with plain values instead of the config.
template <class R>
HLA_HOST_DEVICE R gate_log_decay(GateActivation activation, R lower_bound, R x, R a_log) {
    switch (activation) {
        case GateActivation::None: return x;
        case GateActivation::SoftplusDecay: return -std::exp(a_log) * softplus(x);
        case GateActivation::BoundedSigmoid: return lower_bound * sigmoid(std::exp(a_log) * x);
    }
    return x;
}

template <class R>
R gate_forward(const LinearConfig& c, R x, R a_log) {
    return gate_log_decay(c.gate_activation, R(c.lower_bound), x, a_log);
}

// d(log decay)/dx and d(log decay)/dA_log for the gate input x = g + dt_bias. The (activation,
// lower_bound) form is what kernels call.
template <class R>
HLA_HOST_DEVICE void gate_derivatives(GateActivation activation, R lower_bound, R x, R a_log, R* d_dx, R* d_dalog) {
    switch (activation) {
        case GateActivation::None:
            *d_dx = 1;
            *d_dalog = 0;
            return;
        case GateActivation::SoftplusDecay: {
            const R ea = std::exp(a_log);
            *d_dx = -ea * sigmoid(x);
            *d_dalog = -ea * softplus(x);
            return;
        }
        case GateActivation::BoundedSigmoid: {
            const R ea = std::exp(a_log);
            const R s = sigmoid(ea * x);
            const R ds = lower_bound * s * (R(1) - s);
            *d_dx = ds * ea;
            *d_dalog = ds * ea * x;
            return;
        }
    }
}

template <class R>
void gate_derivatives(const LinearConfig& c, R x, R a_log, R* d_dx, R* d_dalog) {
    gate_derivatives(c.gate_activation, R(c.lower_bound), x, a_log, d_dx, d_dalog);
}

template <class R>
HLA_HOST_DEVICE R beta_value(BetaActivation activation, R b) {
    switch (activation) {
        case BetaActivation::None: return b;
        case BetaActivation::Sigmoid: return sigmoid(b);
        case BetaActivation::Sigmoid2x: return R(2) * sigmoid(b);
    }
    return b;
}

template <class R>
R beta_forward(const LinearConfig& c, R b) {
    return beta_value(c.beta_activation, b);
}

template <class R>
HLA_HOST_DEVICE R beta_derivative(BetaActivation activation, R b) {
    switch (activation) {
        case BetaActivation::None: return 1;
        case BetaActivation::Sigmoid: { const R s = sigmoid(b); return s * (R(1) - s); }
        case BetaActivation::Sigmoid2x: { const R s = sigmoid(b); return R(2) * s * (R(1) - s); }
    }
    return 1;
}

template <class R>
R beta_derivative(const LinearConfig& c, R b) {
    return beta_derivative(c.beta_activation, b);
}

}  // namespace hla::linear
