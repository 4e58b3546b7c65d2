// hla — the CUDA backend's backward entry point for the linear family: validates what the kernels
// need, lays out the workspace and runs the three stages of chunk_bwd.cuh: the forward's prepare and
// scan recompute the chunk-start states (forward_recompute, fwd_<dtype>.cu), the state-gradient scan
// (chunk_bwd_scan.cuh, bwd_scan_<dtype>.cu), and the per-chunk gradients (bwd_<cell>.cu).
#include <algorithm>

#include "ops/linear/cuda/chunk_bwd.cuh"
#include "ops/linear/cuda/chunk_bwd_mma.cuh"
#include "ops/linear/cuda/chunk_bwd_scan.cuh"
#include "ops/linear/cuda/chunk_bwd_vec_mma.cuh"

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

// Stages 1 and 2 are compiled in their own files (fwd_<dtype>.cu, bwd_scan_<dtype>.cu).
extern template void* forward_recompute<__nv_bfloat16>(const Problem&, void*, FwdParams*);
extern template void* forward_recompute<__half>(const Problem&, void*, FwdParams*);
extern template void* forward_recompute<float>(const Problem&, void*, FwdParams*);
extern template void dstate_scan<__nv_bfloat16>(const Problem&, const FwdParams&, const DScanParams&);
extern template void dstate_scan<float>(const Problem&, const FwdParams&, const DScanParams&);

extern template int backward_blocks<false, false>();
extern template int backward_blocks<false, true>();
extern template int backward_blocks<true, false>();
extern template int backward_blocks<true, true>();
extern template void launch_backward<false, false>(const bwd::Params&, int, const char*);
extern template void launch_backward<false, true>(const bwd::Params&, int, const char*);
extern template void launch_backward<true, false>(const bwd::Params&, int, const char*);
extern template void launch_backward<true, true>(const bwd::Params&, int, const char*);
extern template void launch_backward_mma<Update::Additive>(const bwd::Params&, const Stage3Views&, const char*);
extern template void launch_backward_mma<Update::Delta>(const bwd::Params&, const Stage3Views&, const char*);
extern template void launch_backward_mma_vector<Update::Additive>(const bwd::Params&, const Stage3Views&, const char*);
extern template void launch_backward_mma_vector<Update::Delta>(const bwd::Params&, const Stage3Views&, const char*);

namespace {

// Stages 1 and 2 for input dtype In, whose operand dtype is E (Intermediate<In>, chunk_fwd.cuh).
// Returns the forward's workspace, which holds the chunk table and prepare's operands (pointed to by
// *fp) and which the caller frees after stage 3.
template <class In>
void* states_and_gradients(const Problem& p, void* states, const DScanParams& d, FwdParams* fp) {
    ScopedWorkspace fwd_ws(forward_recompute<In>(p, states, fp));
    dstate_scan<Intermediate<In>>(p, *fp, d);
    return fwd_ws.release();
}

}  // namespace

void backward(const Problem& p, const TensorView& d_o, const TensorView& d_final_state, const LinearGrads& grads) {
    const LinearForwardArgs& a = p.args;
    HLA_CHECK(a.k.dtype == a.q.dtype && a.v.dtype == a.q.dtype, p.op,
              ": q/k/v: the CUDA backend needs one dtype for q, k and v, got q ", dtype_name(a.q.dtype), ", k ",
              dtype_name(a.k.dtype), ", v ", dtype_name(a.v.dtype));
    HLA_CHECK(p.K == 64 || p.K == 128, p.op, ": q: the CUDA chunked backward supports K in {64, 128}, got K = ", p.K);
    HLA_CHECK(p.V == 64 || p.V == 128, p.op, ": v: the CUDA chunked backward supports V in {64, 128}, got V = ", p.V);
    HLA_CHECK(p.T < (int64_t(1) << 31) && p.B * p.T < (int64_t(1) << 31), p.op, ": q: B·T = ", p.B * p.T,
              " tokens exceeds the CUDA backend's 2^31 limit");
    check_cuda(cudaSetDevice(a.q.device_index), p.op, "cudaSetDevice");
    refuse_graph_capture(p.op);
    const bool vec = p.cfg.decay == Decay::Vector;
    bwd::Params bp{};
    bp.q = a.q.data;
    bp.k = a.k.data;
    bp.v = a.v.data;
    bp.g = a.g.defined() ? a.g.data : nullptr;
    bp.beta = a.beta.defined() ? a.beta.data : nullptr;
    bp.A_log = a.A_log.defined() ? a.A_log.data : nullptr;
    bp.dt_bias = a.dt_bias.defined() ? a.dt_bias.data : nullptr;
    bp.d_o = d_o.data;
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
    bp.alog_s = a.A_log.defined() ? a.A_log.stride[0] : 0;
    bp.dtb_s = a.dt_bias.defined() ? a.dt_bias.stride[0] : 0;
    bp.dq = grads.dq.defined() ? grads.dq.data : nullptr;
    bp.dk = grads.dk.defined() ? grads.dk.data : nullptr;
    bp.dv = grads.dv.defined() ? grads.dv.data : nullptr;
    const bool per_token = p.cfg.decay == Decay::Scalar || vec;
    bp.dg = grads.dg.defined() && per_token ? grads.dg.ptr<float>() : nullptr;
    bp.dbeta = grads.dbeta.defined() ? grads.dbeta.ptr<float>() : nullptr;
    bp.dq_dt = grads.dq.defined() ? grads.dq.dtype : DType::F32;
    bp.dk_dt = grads.dk.defined() ? grads.dk.dtype : DType::F32;
    bp.dv_dt = grads.dv.defined() ? grads.dv.dtype : DType::F32;
    fill_strides(bp.dqs, grads.dq);
    fill_strides(bp.dks, grads.dk);
    fill_strides(bp.dvs, grads.dv);
    if (per_token) fill_strides(bp.dgs, grads.dg);
    fill_strides(bp.dbs, grads.dbeta);
    bp.B = int(p.B);
    bp.T = int(p.T);
    bp.H = int(p.H);
    bp.HV = int(p.HV);
    bp.G = int(p.G);
    bp.K = int(p.K);
    bp.V = int(p.V);
    bp.W = vec ? int(p.K) : 1;
    bp.decay = p.cfg.decay;
    static_cast<CellOptions&>(bp) = cell_options(p.cfg, p.scale);

    if (p.seqs.empty()) return;
    int64_t n_chunks = 0;
    for (const Sequence& sq : p.seqs) n_chunks += (sq.len + kChunk - 1) / kChunk;
    const DType in = a.q.dtype;
    const DType st = in == DType::BF16 ? DType::BF16 : DType::F32;  // the scan's operand dtype
    // stage 3: tensor cores for bf16 inputs (one block per item; vector decay in two kernels with a
    // hand-over buffer per chunk and value head); else the fp32 kernel, a grid of resident blocks with a
    // global-memory scratch each
    const bool mma = in == DType::BF16;
    const int blocks = mma ? 0 : int(std::min<int64_t>(
        std::max<int64_t>(1, n_chunks * p.H),
        int64_t(sm_count()) * (vec ? (p.delta() ? backward_blocks<true, true>() : backward_blocks<true, false>())
                                   : (p.delta() ? backward_blocks<false, true>() : backward_blocks<false, false>()))));
    bp.scratch_floats = mma ? 0 : bwd::layout(nullptr, bp.K, bp.V, bp.W, nullptr);
    auto align = [](size_t x) { return (x + 255) & ~size_t(255); };
    const size_t b_params = align(size_t(p.HV) * (2 + bp.W) * sizeof(double));
    const size_t b_scratch = align(size_t(blocks) * size_t(bp.scratch_floats) * sizeof(float));
    const size_t b_states = align(size_t(n_chunks * p.HV * p.K * p.V) * dtype_size(st));
    // vector decay on tensor cores: fp32 dβ [64], dP's diagonal [64], Σ S0 ⊙ dS_C [K]; bf16 dO S0ᵀ,
    // Z S0ᵀ, X dS_Cᵀ [64, K] and dP, dD [64, 64] (every block a multiple of 16 bytes: the second kernel
    // reads dP and dD 16 bytes at a time)
    const size_t slots = size_t(n_chunks) * size_t(p.HV);
    const size_t vf_k = size_t(kChunk) * p.K, vf_c = size_t(kChunk) * kChunk;
    const size_t b_vec =
        mma && vec ? align(slots * ((2 * kChunk + p.K) * sizeof(float) + (3 * vf_k + 2 * vf_c) * sizeof(__nv_bfloat16))) : 0;
    ScopedWorkspace workspace(workspace_alloc(b_params + b_scratch + 2 * b_states + b_vec, p.op));
    char* ws = workspace.get();
    char* at = ws;
    bp.params_acc = reinterpret_cast<double*>(at);
    check_cuda(cudaMemsetAsync(at, 0, b_params, launch_stream()), p.op, "cudaMemsetAsync(parameter sums)");
    at += b_params;
    bp.scratch = reinterpret_cast<float*>(at);
    at += b_scratch;
    void* states = at;
    at += b_states;
    void* dstates = at;
    bp.states = states;
    bp.dstates = dstates;
    bp.st_dt = st;
    if (b_vec) {
        float* v = reinterpret_cast<float*>(at + b_states);
        bp.v_db = v;
        bp.v_dpd = v += slots * kChunk;
        bp.v_sd = v += slots * kChunk;
        __nv_bfloat16* h = reinterpret_cast<__nv_bfloat16*>(v + slots * p.K);
        bp.v_dqg = h;
        bp.v_m = h += slots * vf_k;
        bp.v_dkb = h += slots * vf_k;
        bp.v_dp = h += slots * vf_k;
        bp.v_dd = h += slots * vf_c;
    }

    DScanParams dp{};
    dp.d_o = d_o.data;
    dp.do_dt = d_o.dtype;
    fill_strides(dp.dos, d_o);
    dp.dht = d_final_state.defined() ? d_final_state.ptr<float>() : nullptr;
    fill_strides(dp.dhts, d_final_state);
    dp.dh0 = grads.dinitial_state.defined() ? grads.dinitial_state.ptr<float>() : nullptr;
    fill_strides(dp.dh0s, grads.dinitial_state);
    dp.dstates = dstates;

    // stages 1 and 2 (the input dtypes this build compiled the chunked forward for)
    ScopedWorkspace fwd_ws;  // the forward recompute's, which stage 3 reads
    FwdParams fp{};
    switch (in) {
#if HLA_CUDA_LINEAR_BF16
        case DType::BF16: fwd_ws.reset(states_and_gradients<__nv_bfloat16>(p, states, dp, &fp)); break;
#endif
#if HLA_CUDA_LINEAR_F16
        case DType::F16: fwd_ws.reset(states_and_gradients<__half>(p, states, dp, &fp)); break;
#endif
#if HLA_CUDA_LINEAR_F32
        case DType::F32: fwd_ws.reset(states_and_gradients<float>(p, states, dp, &fp)); break;
#endif
        default:
            detail::fail(p.op, ": q: the CUDA chunked backward for ", dtype_name(in), " inputs is not compiled into ",
                         "this build (CMake HLA_CUDA_LINEAR_DTYPES leaves it out)");
    }

    // stage 3: every gradient of every chunk
    bp.chunks = fp.chunks;
    bp.U = fp.U;
    bp.Wm = fp.W;
    bp.Tinv = fp.Tinv;
    bp.Dm = fp.Dm;
    bp.Kd = fp.Kd;
    bp.P = fp.P;
    bp.n_chunks = int(n_chunks);
    if (n_chunks > 0 && mma) {
#if HLA_CUDA_LINEAR_BF16  // (mma means bf16 inputs, which the switch above rejects in a build without them)
        const Stage3Views views{a.q, a.k, a.v, d_o};
        if (vec)
            p.delta() ? launch_backward_mma_vector<Update::Delta>(bp, views, p.op)
                      : launch_backward_mma_vector<Update::Additive>(bp, views, p.op);
        else
            p.delta() ? launch_backward_mma<Update::Delta>(bp, views, p.op)
                      : launch_backward_mma<Update::Additive>(bp, views, p.op);
#endif
    } else if (n_chunks > 0) {
        if (vec) p.delta() ? launch_backward<true, true>(bp, blocks, p.op) : launch_backward<true, false>(bp, blocks, p.op);
        else p.delta() ? launch_backward<false, true>(bp, blocks, p.op) : launch_backward<false, false>(bp, blocks, p.op);
    }

    float* dgamma = p.cfg.decay == Decay::Fixed && grads.dg.defined() ? grads.dg.ptr<float>() : nullptr;
    float* dalog = grads.dA_log.defined() ? grads.dA_log.ptr<float>() : nullptr;
    float* ddt = grads.ddt_bias.defined() ? grads.ddt_bias.ptr<float>() : nullptr;
    if (dgamma || dalog || ddt) {
        bwd::params_finish_kernel<<<1, bwd::kThreads, 0, launch_stream()>>>(
            bp.params_acc, bp.HV, bp.W, dgamma, dgamma ? grads.dg.stride[0] : 0, dalog, dalog ? grads.dA_log.stride[0] : 0,
            ddt, ddt ? grads.ddt_bias.stride[0] : 0);
        check_cuda(cudaGetLastError(), p.op, "params_finish launch");
    }
}

}  // namespace hla::linear::cuda
