// hla — the softmax family's CUDA entry points: turn a validated Problem into the POD parameter
// structs and pick the kernel instantiation (head dim × dtype) in one place per pass.
#include <cuda_runtime.h>

#include <atomic>
#include <mutex>
#include <type_traits>

#include "core/checks.hpp"
#include "ops/softmax/cuda/launchers.cuh"
#include "ops/softmax/problem.hpp"

namespace hla::softmax::cuda {

namespace {

// The kernels read and write bf16, f16 and f32; f64 (accepted on the CPU for finite differences) is not.
void no_f64(const char* op, const TensorView& t) {
    HLA_CHECK(!t.defined() || t.dtype != DType::F64, op, ": f64 tensors are not supported by the CUDA backend (use f32)");
}

// The kernels move K/V/Q rows with 16-byte copies: each row must start on a 16-byte boundary.
void check_aligned(const char* op, const char* name, const TensorView& t) {
    if (!t.defined()) return;
    bool ok = reinterpret_cast<uintptr_t>(t.data) % 16 == 0;
    for (int i = 0; i + 1 < t.ndim; ++i) ok = ok && (t.stride[i] * int64_t(dtype_size(t.dtype))) % 16 == 0;
    HLA_CHECK(ok, op, ": ", name, ": the CUDA backend needs 16-byte aligned rows (data pointer and every stride but ",
              "the innermost a multiple of 16 bytes), got strides of shape ", t.shape_string());
}

// The head dims this build compiled kernels for (CMake HLA_CUDA_SOFTMAX_HEAD_DIMS, all three by
// default): a build for one model can leave the other softmax_d<D>.cu instantiations out.
#ifndef HLA_CUDA_SOFTMAX_D64
#define HLA_CUDA_SOFTMAX_D64 1
#endif
#ifndef HLA_CUDA_SOFTMAX_D128
#define HLA_CUDA_SOFTMAX_D128 1
#endif
#ifndef HLA_CUDA_SOFTMAX_D256
#define HLA_CUDA_SOFTMAX_D256 1
#endif

void require_built_head_dim(int64_t D, const char* op) {
    const bool built = (D == 64 && HLA_CUDA_SOFTMAX_D64) || (D == 128 && HLA_CUDA_SOFTMAX_D128) ||
                       (D == 256 && HLA_CUDA_SOFTMAX_D256);
    HLA_CHECK(built, op, ": q: head dim D = ", D, " is not compiled into this build's CUDA kernels (CMake ",
              "HLA_CUDA_SOFTMAX_HEAD_DIMS leaves it out; the CUDA backend takes 64, 128 and 256)");
}

// f(std::integral_constant<int, D>{}) for the head dim D: the one switch from a run-time head dim to
// the kernel instantiations, for every pass.
template <class F>
void with_head_dim(int64_t D, const char* op, F&& f) {
    require_built_head_dim(D, op);
    switch (D) {
#if HLA_CUDA_SOFTMAX_D64
        case 64: f(std::integral_constant<int, 64>{}); break;
#endif
#if HLA_CUDA_SOFTMAX_D128
        case 128: f(std::integral_constant<int, 128>{}); break;
#endif
#if HLA_CUDA_SOFTMAX_D256
        case 256: f(std::integral_constant<int, 256>{}); break;
#endif
        default: break;  // not reached: require_built_head_dim threw
    }
}

int dtype_code(DType d) {
    switch (d) {
        case DType::BF16: return 0;
        case DType::F16: return 1;
        default: return 2;
    }
}

void strides3(int64_t (&dst)[3], const TensorView& x) {
    for (int i = 0; i < 3; ++i) dst[i] = x.defined() && x.ndim > i ? x.stride[i] : 0;
}

// Scratch that grows and is never returned: the first call of a size allocates, later calls reuse it,
// so the steady state does no allocation. One per device, guarded for callers on several threads.
struct Workspace {
    std::mutex mu;
    void* ptr = nullptr;
    size_t bytes = 0;
};
void* workspace(const char* op, size_t bytes, int device) {
    static Workspace ws[16];
    Workspace& w = ws[device & 15];
    std::lock_guard<std::mutex> lock(w.mu);
    if (bytes > w.bytes) {
        if (w.ptr) check(cudaFree(w.ptr), op, "cudaFree (workspace)");
        check(cudaMalloc(&w.ptr, bytes), op, "cudaMalloc (workspace)");
        w.bytes = bytes;
    }
    return w.ptr;
}

FwdParams forward_params(const Problem& p) {
    const SoftmaxForwardArgs& a = p.args;
    FwdParams f{};
    f.q = a.q.data;
    f.k = a.k.data;
    f.v = a.v.data;
    f.g = a.g.defined() ? a.g.data : nullptr;
    f.gate = a.gate.defined() ? a.gate.data : nullptr;
    f.o = a.o.data;
    f.lse = a.lse.defined() ? a.lse.ptr<float>() : nullptr;
    f.cu_seqlens = a.cu_seqlens.defined() ? a.cu_seqlens.data : nullptr;
    f.cu64 = a.cu_seqlens.defined() && a.cu_seqlens.dtype == DType::I64;
    f.B = int(p.B);
    f.T = int(p.T);
    f.HQ = int(p.HQ);
    f.HKV = int(p.HKV);
    f.G = int(p.G);
    strides3(f.q_s, a.q);
    strides3(f.k_s, a.k);
    strides3(f.v_s, a.v);
    strides3(f.o_s, a.o);
    strides3(f.gate_s, a.gate);
    strides3(f.g_s, a.g);
    strides3(f.lse_s, a.lse);
    f.o_dtype = dtype_code(a.o.dtype);
    f.g_dtype = a.g.defined() ? dtype_code(a.g.dtype) : 2;
    f.gate_dtype = a.gate.defined() ? dtype_code(a.gate.dtype) : 2;
    f.scale_log2 = float(p.scale * 1.4426950408889634);
    f.window = int(p.window);
    f.causal = p.cfg.causal;
    return f;
}

void run_forward_kernel(const Problem& p, const FwdParams& f) {
    const bool bf16 = p.args.q.dtype == DType::BF16;
    const int seqs = int(p.N());
    if (p.max_len == 0 || seqs == 0) return;
    with_head_dim(p.D, p.op, [&](auto d) {
        constexpr int D = decltype(d)::value;
        launch_forward_d<D>(f, bf16, int((p.max_len + FwdTraits<D>::BM - 1) / FwdTraits<D>::BM), int(p.HQ), seqs,
                            p.args.q.device_index, p.op);
    });
}

}  // namespace

void forward(const Problem& p) {
    require_built_head_dim(p.D, p.op);
    check(cudaSetDevice(p.args.q.device_index), p.op, "cudaSetDevice");
    for (const TensorView* t : {&p.args.o, &p.args.g, &p.args.gate}) no_f64(p.op, *t);
    check_aligned(p.op, "q", p.args.q);
    check_aligned(p.op, "k", p.args.k);
    check_aligned(p.op, "v", p.args.v);
    run_forward_kernel(p, forward_params(p));
}

// ---- backward ---------------------------------------------------------------------------------------

void backward(const Problem& p, const TensorView& d_o, const SoftmaxGrads& g) {
    const char* op = p.op;
    require_built_head_dim(p.D, op);
    check(cudaSetDevice(p.args.q.device_index), op, "cudaSetDevice");
    if (p.max_len == 0 || p.N() == 0) return;
    BwdParams b{};
    b.f = forward_params(p);
    b.d_o = d_o.data;
    strides3(b.do_s, d_o);
    b.dq = g.dq.defined() ? g.dq.data : nullptr;
    b.dk = g.dk.defined() ? g.dk.data : nullptr;
    b.dv = g.dv.defined() ? g.dv.data : nullptr;
    b.dgate = g.dgate.defined() ? g.dgate.data : nullptr;
    b.dg = g.dg.defined() ? g.dg.ptr<float>() : nullptr;
    strides3(b.dq_s, g.dq);
    strides3(b.dk_s, g.dk);
    strides3(b.dv_s, g.dv);
    strides3(b.dgate_s, g.dgate);
    strides3(b.dg_s, g.dg);
    b.dq_dtype = g.dq.defined() ? dtype_code(g.dq.dtype) : 2;
    b.dk_dtype = g.dk.defined() ? dtype_code(g.dk.dtype) : 2;
    b.dv_dtype = g.dv.defined() ? dtype_code(g.dv.dtype) : 2;
    b.dgate_dtype = g.dgate.defined() ? dtype_code(g.dgate.dtype) : 2;
    b.do_dtype = dtype_code(d_o.dtype);
    for (const TensorView* t : {&d_o, &g.dq, &g.dk, &g.dv, &g.dgate}) no_f64(op, *t);
    for (const TensorView* t : {&p.args.o, &p.args.g, &p.args.gate}) no_f64(op, *t);
    check_aligned(op, "q", p.args.q);
    check_aligned(op, "k", p.args.k);
    check_aligned(op, "v", p.args.v);
    if (!p.args.gate.defined()) {
        HLA_CHECK(d_o.dtype == p.args.q.dtype, op, ": d_o: the CUDA backend expects the dtype of q (",
                  dtype_name(p.args.q.dtype), "), got ", dtype_name(d_o.dtype));
        check_aligned(op, "d_o", d_o);
    }
    b.scale = float(p.scale);
    // Workspace: dq_acc (B·T·HQ·D fp32, laid out per head and channel segment: dq_acc_row in
    // backward.cuh), delta, lse2, rowsum, colsum [B·T·HQ] fp32, dA [B·T·HQ·D] b16.
    const size_t rows = size_t(p.B * p.T * p.HQ);
    const size_t bytes = rows * size_t(p.D) * 4 + rows * 4 * 4 + rows * size_t(p.D) * 2 + 256;
    char* ws = static_cast<char*>(workspace(op, bytes, p.args.q.device_index));
    b.dq_acc = reinterpret_cast<float*>(ws);
    b.delta = b.dq_acc + rows * p.D;
    b.lse2 = b.delta + rows;
    b.rowsum = b.lse2 + rows;
    b.colsum = b.rowsum + rows;
    b.dA = b.colsum + rows;
    check(cudaMemsetAsync(b.dq_acc, 0, rows * size_t(p.D) * 4, launch_stream()), op, "memset");
    check(cudaMemsetAsync(b.rowsum, 0, rows * 4, launch_stream()), op, "memset");
    const bool bf16 = p.args.q.dtype == DType::BF16;
    const int seqs = int(p.N());
    const int D = int(p.D);

    // The row kernels: D/8 threads a row (8 channels each), 256 threads a block.
    const int rows_per_block = 256 / (D / 8);
    const dim3 row_grid(unsigned((p.B * p.T * p.HQ + rows_per_block - 1) / rows_per_block));
    if (bf16)
        softmax_bwd_preprocess_kernel<__nv_bfloat16><<<row_grid, 256, 0, launch_stream()>>>(b, D);
    else
        softmax_bwd_preprocess_kernel<__half><<<row_grid, 256, 0, launch_stream()>>>(b, D);
    check(cudaGetLastError(), op, "backward preprocess launch");
    with_head_dim(D, op, [&](auto d) {
        constexpr int kD = decltype(d)::value;
        launch_backward_d<kD>(b, bf16, int((p.max_len + BwdTraits<kD>::BN - 1) / BwdTraits<kD>::BN), int(p.HKV), seqs,
                              p.args.q.device_index, op);
    });
    if (bf16)
        softmax_bwd_postprocess_kernel<__nv_bfloat16><<<row_grid, 256, 0, launch_stream()>>>(b, D);
    else
        softmax_bwd_postprocess_kernel<__half><<<row_grid, 256, 0, launch_stream()>>>(b, D);
    check(cudaGetLastError(), op, "backward postprocess launch");
    if (b.dg) {
        softmax_bwd_dg_kernel<<<dim3(unsigned(p.HQ), unsigned(seqs)), 32, 0, launch_stream()>>>(b);
        check(cudaGetLastError(), op, "backward dg launch");
    }
}

// ---- KV cache ---------------------------------------------------------------------------------------

namespace {

// Multiprocessors of `device`, asked once per device (decode sizes its splits with it every step).
int sm_count(int device, const char* op) {
    static std::atomic<int> cached[64] = {};
    const bool slot = device >= 0 && device < 64;
    if (slot) {
        const int n = cached[device].load(std::memory_order_relaxed);
        if (n > 0) return n;
    }
    int n = 0;
    check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), op, "SM count");
    if (slot) cached[device].store(n, std::memory_order_relaxed);
    return n;
}

// Writes the new tokens' k, v (and gates) into the cache rows L_n … L_n + TQ − 1 (clamped).
__global__ void softmax_cache_append_kernel(const DecodeParams p, const void* k, const void* v, const void* g,
                                            int64_t k_s0, int64_t k_s1, int64_t k_s2, int64_t v_s0, int64_t v_s1,
                                            int64_t v_s2, int64_t g_s0, int64_t g_s1, int64_t g_s2, int g_dtype, int D) {
    const int n = blockIdx.x / p.TQ, t = blockIdx.x % p.TQ;
    const int L = int(read_index(p.cache_seqlens, p.lens64, n));
    const int j = L + t;
    if (j >= p.capacity) return;
    const int slot = p.cache_batch_idx ? int(read_index(p.cache_batch_idx, p.idx64, n)) : n;
    const uint16_t* ks = static_cast<const uint16_t*>(k);
    const uint16_t* vs = static_cast<const uint16_t*>(v);
    uint16_t* kd = static_cast<uint16_t*>(const_cast<void*>(p.k_cache));
    uint16_t* vd = static_cast<uint16_t*>(const_cast<void*>(p.v_cache));
    const int64_t krow = cache_row(p, p.kc_s, n, slot, j), vrow = cache_row(p, p.vc_s, n, slot, j);
    for (int e = threadIdx.x; e < p.HKV * D; e += blockDim.x) {
        const int hk = e / D, d = e % D;
        kd[krow + hk * p.kc_s[2] + d] = ks[n * k_s0 + t * k_s1 + hk * k_s2 + d];
        vd[vrow + hk * p.vc_s[2] + d] = vs[n * v_s0 + t * v_s1 + hk * v_s2 + d];
    }
    if (g && p.g_cache) {
        float* gd = const_cast<float*>(static_cast<const float*>(p.g_cache));
        const int64_t grow = cache_row(p, p.gc_s, n, slot, j);
        for (int h = threadIdx.x; h < p.HQ; h += blockDim.x)
            gd[grow + h * p.gc_s[2]] = load_any(g, n * g_s0 + t * g_s1 + h * g_s2, g_dtype);
    }
}

}  // namespace

void decode(const DecodeProblem& p) {
    const char* op = p.op;
    const SoftmaxKVCacheArgs& a = p.args;
    require_built_head_dim(p.D, op);
    check(cudaSetDevice(a.q.device_index), op, "cudaSetDevice");
    for (const TensorView* t : {&a.o, &a.g, &a.gate}) no_f64(op, *t);
    check_aligned(op, "q", a.q);
    check_aligned(op, "k_cache", a.k_cache);
    check_aligned(op, "v_cache", a.v_cache);
    if (p.N == 0 || p.TQ == 0) return;
    DecodeParams d{};
    d.q = a.q.data;
    d.k_cache = a.k_cache.data;
    d.v_cache = a.v_cache.data;
    d.g_cache = a.g_cache.defined() ? a.g_cache.data : nullptr;
    d.gate = a.gate.defined() ? a.gate.data : nullptr;
    d.o = a.o.data;
    d.lse = a.lse.defined() ? a.lse.ptr<float>() : nullptr;
    d.cache_seqlens = a.cache_seqlens.defined() ? a.cache_seqlens.data : nullptr;
    d.lens64 = a.cache_seqlens.defined() && a.cache_seqlens.dtype == DType::I64;
    d.cache_batch_idx = a.cache_batch_idx.defined() ? a.cache_batch_idx.data : nullptr;
    d.idx64 = a.cache_batch_idx.defined() && a.cache_batch_idx.dtype == DType::I64;
    d.block_table = a.block_table.defined() ? a.block_table.ptr<int>() : nullptr;
    d.bt_s0 = a.block_table.defined() ? a.block_table.stride[0] : 0;
    HLA_CHECK(!a.block_table.defined() || a.block_table.stride[1] == 1, op,
              ": block_table: the CUDA backend expects a contiguous innermost dimension");
    d.N = int(p.N);
    d.TQ = int(p.TQ);
    d.HQ = int(p.HQ);
    d.HKV = int(p.HKV);
    d.G = int(p.G);
    d.capacity = int(p.capacity);
    d.page_size = int(p.page_size);
    d.append = p.append;
    strides3(d.q_s, a.q);
    strides3(d.kc_s, a.k_cache);
    strides3(d.vc_s, a.v_cache);
    strides3(d.gc_s, a.g_cache);
    strides3(d.gate_s, a.gate);
    strides3(d.o_s, a.o);
    strides3(d.lse_s, a.lse);
    d.o_dtype = dtype_code(a.o.dtype);
    d.gate_dtype = a.gate.defined() ? dtype_code(a.gate.dtype) : 2;
    d.scale_log2 = float(p.scale * 1.4426950408889634);
    d.window = int(p.window);
    d.causal = p.cfg.causal;

    // Splits: the cache of one (sequence, kv head) is cut into `splits` key ranges so that the grid
    // fills the GPU. At least two waves of resident blocks (a block's start — its first copies in
    // flight — then overlaps another's work), then among up to twice that many the count whose last
    // wave is fullest (equal blocks: the tail wave idles the rest), each split keeping at least 256
    // keys so that the partials stay a small fraction of the cache traffic.
    const int sms = sm_count(a.q.device_index, op);
    const bool bf16 = a.q.dtype == DType::BF16;
    const int rows = int(p.G * p.TQ);
    const bool gates = a.g_cache.defined();
    int per_sm = 1;
    with_head_dim(p.D, op, [&](auto d) { per_sm = decode_blocks_per_sm<decltype(d)::value>(rows, gates, bf16, a.q.device_index, op); });
    const int64_t slots = int64_t(sms) * per_sm;
    const int tile_rows = 16 * decode_row_tiles_per_block(int(p.D), rows);
    const int64_t blocks = p.N * p.HKV * ((rows + tile_rows - 1) / tile_rows);
    const int64_t max_splits = std::max<int64_t>(1, p.capacity / 256);
    const int64_t lo = std::min(max_splits, std::max<int64_t>(1, (2 * slots + blocks - 1) / blocks));
    int64_t splits = lo;
    double best = 0;
    for (int64_t s = lo; s <= std::min(2 * lo, max_splits); ++s) {
        const int64_t total = blocks * s;
        const double fill = double(total) / double((total + slots - 1) / slots * slots);
        if (fill > best + 1e-9) best = fill, splits = s;
    }
    d.splits = int(splits);
    if (splits > 1) {
        const size_t parts = size_t(p.N * p.HQ * p.TQ) * size_t(splits);
        float* ws = static_cast<float*>(workspace(op, parts * size_t(p.D + 2) * 4, a.q.device_index));
        d.part_o = ws;
        d.part_ml = ws + parts * p.D;
    }

    if (p.append) {
        softmax_cache_append_kernel<<<unsigned(p.N * p.TQ), 128, 0, launch_stream()>>>(
            d, a.k.data, a.v.data, a.g.defined() ? a.g.data : nullptr, a.k.stride[0], a.k.stride[1], a.k.stride[2],
            a.v.stride[0], a.v.stride[1], a.v.stride[2], a.g.defined() ? a.g.stride[0] : 0,
            a.g.defined() ? a.g.stride[1] : 0, a.g.defined() ? a.g.stride[2] : 0,
            a.g.defined() ? dtype_code(a.g.dtype) : 2, int(p.D));
        check(cudaGetLastError(), op, "cache append launch");
    }
    with_head_dim(p.D, op, [&](auto dim) { launch_decode_d<decltype(dim)::value>(d, bf16, a.q.device_index, op); });
}

}  // namespace hla::softmax::cuda
