// hla — the CUDA backend's backward entry point for the linear family: validates what the kernel
// needs, lays out one workspace allocation and launches the chunked backward (chunk_bwd.cuh,
// instantiated per <vector decay, delta update> in bwd_<cell>.cu).
#include <vector>

#include "ops/linear/cuda/chunk_bwd.cuh"
#include "ops/linear/cuda/chunk_fwd.cuh"

namespace hla::linear::cuda {

namespace bwd {

// Per-head parameter gradients from their fp64 sums.
__global__ void params_finish_kernel(const double* acc, int HV, int W, float* dgamma, int64_t dgamma_s, float* dalog,
                                     int64_t dalog_s, float* ddt, int64_t ddt_s) {
    for (int idx = threadIdx.x; idx < HV * (2 + W); idx += blockDim.x) {
        if (idx < HV) {
            if (dgamma) dgamma[idx * dgamma_s] = float(acc[idx]);
        } else if (idx < 2 * HV) {
            if (dalog) dalog[(idx - HV) * dalog_s] = float(acc[idx]);
        } else if (ddt) {
            const int r = idx - 2 * HV, hv = r / W, ch = r % W;
            ddt[hv * ddt_s + ch] = float(acc[idx]);
        }
    }
}

}  // namespace bwd

extern template void launch_backward<false, false>(const bwd::Params&, int, const char*);
extern template void launch_backward<false, true>(const bwd::Params&, int, const char*);
extern template void launch_backward<true, false>(const bwd::Params&, int, const char*);
extern template void launch_backward<true, true>(const bwd::Params&, int, const char*);

void backward(const Problem& p, const TensorView& d_o, const TensorView& d_final_state, const LinearGrads& grads) {
    const LinearForwardArgs& a = p.args;
    HLA_CHECK(p.T < (int64_t(1) << 31) && p.B * p.T < (int64_t(1) << 31), p.op, ": q: B·T = ", p.B * p.T,
              " tokens exceeds the CUDA backend's 2^31 limit");
    check_cuda(cudaSetDevice(a.q.device_index), p.op, "cudaSetDevice");
    const bool vec = p.cfg.decay == Decay::Vector;
    bwd::Params bp{};
    bp.q = a.q.data;
    bp.k = a.k.data;
    bp.v = a.v.data;
    bp.g = a.g.defined() ? a.g.data : nullptr;
    bp.beta = a.beta.defined() ? a.beta.data : nullptr;
    bp.A_log = a.A_log.defined() ? a.A_log.data : nullptr;
    bp.dt_bias = a.dt_bias.defined() ? a.dt_bias.data : nullptr;
    bp.h0 = a.initial_state.defined() ? a.initial_state.data : nullptr;
    bp.d_o = d_o.data;
    bp.dht = d_final_state.defined() ? d_final_state.data : nullptr;
    bp.q_dt = a.q.dtype;
    bp.k_dt = a.k.dtype;
    bp.v_dt = a.v.dtype;
    bp.g_dt = a.g.defined() ? a.g.dtype : DType::F32;
    bp.beta_dt = a.beta.defined() ? a.beta.dtype : DType::F32;
    bp.do_dt = d_o.dtype;
    fill_strides(bp.qs, a.q);
    fill_strides(bp.ks, a.k);
    fill_strides(bp.vs, a.v);
    fill_strides(bp.gs, a.g);
    fill_strides(bp.bs, a.beta);
    fill_strides(bp.dos, d_o);
    fill_strides(bp.h0s, a.initial_state);
    fill_strides(bp.dhts, d_final_state);
    bp.alog_s = a.A_log.defined() ? a.A_log.stride[0] : 0;
    bp.dtb_s = a.dt_bias.defined() ? a.dt_bias.stride[0] : 0;
    bp.dq = grads.dq.defined() ? grads.dq.data : nullptr;
    bp.dk = grads.dk.defined() ? grads.dk.data : nullptr;
    bp.dv = grads.dv.defined() ? grads.dv.data : nullptr;
    const bool per_token = p.cfg.decay == Decay::Scalar || vec;
    bp.dg = grads.dg.defined() && per_token ? grads.dg.ptr<float>() : nullptr;
    bp.dbeta = grads.dbeta.defined() ? grads.dbeta.ptr<float>() : nullptr;
    bp.dh0 = grads.dinitial_state.defined() ? grads.dinitial_state.ptr<float>() : nullptr;
    bp.dq_dt = grads.dq.defined() ? grads.dq.dtype : DType::F32;
    bp.dk_dt = grads.dk.defined() ? grads.dk.dtype : DType::F32;
    bp.dv_dt = grads.dv.defined() ? grads.dv.dtype : DType::F32;
    fill_strides(bp.dqs, grads.dq);
    fill_strides(bp.dks, grads.dk);
    fill_strides(bp.dvs, grads.dv);
    if (per_token) fill_strides(bp.dgs, grads.dg);
    fill_strides(bp.dbs, grads.dbeta);
    fill_strides(bp.dh0s, grads.dinitial_state);
    bp.B = int(p.B);
    bp.T = int(p.T);
    bp.H = int(p.H);
    bp.HV = int(p.HV);
    bp.G = int(p.G);
    bp.K = int(p.K);
    bp.V = int(p.V);
    bp.W = vec ? int(p.K) : 1;
    bp.decay = p.cfg.decay;
    bp.scale = float(p.scale);
    bp.qk_l2norm = p.cfg.qk_l2norm;
    bp.gate_act = p.cfg.gate_activation;
    bp.lower_bound = p.cfg.lower_bound;
    bp.beta_act = p.cfg.beta_activation;

    std::vector<bwd::SeqInfo> seqs;
    int64_t n_chunks = 0;
    for (const Sequence& s : p.seqs) {
        seqs.push_back({int(s.batch), int(s.start), int(s.len), int(n_chunks)});
        n_chunks += (s.len + bwd::kC - 1) / bwd::kC;
    }
    if (seqs.empty()) return;
    const int64_t N = int64_t(seqs.size());
    bp.scratch_floats = bwd::layout(nullptr, bp.K, bp.V, bp.W, nullptr);
    auto align = [](size_t x) { return (x + 255) & ~size_t(255); };
    const size_t b_seqs = align(seqs.size() * sizeof(bwd::SeqInfo));
    const size_t b_params = align(size_t(p.HV) * (2 + bp.W) * sizeof(double));
    const size_t b_scratch = align(size_t(N * p.H * bp.scratch_floats) * sizeof(float));
    const size_t b_states = align(size_t(n_chunks * p.H * p.K * p.V) * sizeof(float));
    const size_t b_acc = align(size_t(p.H * p.B * p.T * p.K) * sizeof(float));
    char* ws = static_cast<char*>(workspace_alloc(b_seqs + b_params + b_scratch + b_states + 2 * b_acc, p.op));
    char* at = ws;
    bp.seqs = reinterpret_cast<const bwd::SeqInfo*>(at);
    check_cuda(cudaMemcpyAsync(at, seqs.data(), seqs.size() * sizeof(bwd::SeqInfo), cudaMemcpyHostToDevice), p.op,
               "cudaMemcpyAsync(sequence table)");
    at += b_seqs;
    bp.params_acc = reinterpret_cast<double*>(at);
    check_cuda(cudaMemsetAsync(at, 0, b_params), p.op, "cudaMemsetAsync(parameter sums)");
    at += b_params;
    bp.scratch = reinterpret_cast<float*>(at);
    at += b_scratch;
    bp.states = reinterpret_cast<float*>(at);
    at += b_states;
    bp.dq_acc = reinterpret_cast<float*>(at);
    at += b_acc;
    bp.dk_acc = reinterpret_cast<float*>(at);

    const bool delta = p.delta();
    if (vec) delta ? launch_backward<true, true>(bp, int(N), p.op) : launch_backward<true, false>(bp, int(N), p.op);
    else delta ? launch_backward<false, true>(bp, int(N), p.op) : launch_backward<false, false>(bp, int(N), p.op);

    float* dgamma = p.cfg.decay == Decay::Fixed && grads.dg.defined() ? grads.dg.ptr<float>() : nullptr;
    float* dalog = grads.dA_log.defined() ? grads.dA_log.ptr<float>() : nullptr;
    float* ddt = grads.ddt_bias.defined() ? grads.ddt_bias.ptr<float>() : nullptr;
    if (dgamma || dalog || ddt) {
        bwd::params_finish_kernel<<<1, bwd::kThreads>>>(
            bp.params_acc, bp.HV, bp.W, dgamma, dgamma ? grads.dg.stride[0] : 0, dalog, dalog ? grads.dA_log.stride[0] : 0,
            ddt, ddt ? grads.ddt_bias.stride[0] : 0);
        check_cuda(cudaGetLastError(), p.op, "params_finish launch");
    }
    workspace_free(ws);
}

}  // namespace hla::linear::cuda
