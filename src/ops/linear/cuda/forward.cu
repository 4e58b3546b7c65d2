// hla — the CUDA backend's entry points for the linear family: picks the dtype instantiation of the
// chunked forward (fwd_<dtype>.cu) and owns the few runtime services the kernels share. The backward's
// entry point is in backward.cu.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#include "ops/linear/cuda/common.cuh"
#include "ops/linear/cuda/forward_plan.hpp"
#include "ops/linear/problem.hpp"

namespace hla::linear::cuda {

template <class E>
void forward_chunked(const Problem& p);  // chunk_fwd.cuh, instantiated in fwd_<dtype>.cu

int sm_count() {
    int dev = 0, n = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    return n > 0 ? n : 1;
}

void refuse_graph_capture(const char* op) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    check_cuda(cudaStreamIsCapturing(launch_stream(), &status), op, "cudaStreamIsCapturing");
    HLA_CHECK(status == cudaStreamCaptureStatusNone, op,
              ": the CUDA chunked forward and backward cannot be captured in a CUDA graph (their chunk tables are "
              "copied from host memory on every call); capture the decode step (linear_decode) instead");
}

// A tuning switch from the environment: `unset` when the variable is not set; an error naming it
// when its value is not one of `allowed` (tests and A/B timing set these; a typo must not silently
// measure the default).
static int env_switch(const char* name, int unset, std::initializer_list<int> allowed, const char* expected) {
    const char* v = std::getenv(name);
    if (!v) return unset;
    char* end = nullptr;
    const long x = std::strtol(v, &end, 10);
    const bool ok = end != v && *end == '\0' &&
                    (allowed.size() == 0 ? x >= 1 && x <= 1024 : std::find(allowed.begin(), allowed.end(), x) != allowed.end());
    if (!ok) detail::fail(name, ": expected ", expected, ", got \"", v, "\"");
    return int(x);
}

int scan_tile_override() { return env_switch("HLA_CUDA_SCAN_VT", 0, {16, 32, 64}, "16, 32 or 64"); }

int raw_operands_override() { return env_switch("HLA_CUDA_FWD_RAW", -1, {0, 1}, "0 or 1"); }

int fwd_form_override() { return env_switch("HLA_CUDA_FWD_FORM", -1, {0, 1}, "0 or 1"); }

int fwd_pieces_override() { return env_switch("HLA_CUDA_FWD_PIECES", 0, {}, "a piece count from 1 to 1024"); }

int fwd_concurrent_override() { return env_switch("HLA_CUDA_FWD_CONCURRENT", -1, {0, 1}, "0 or 1"); }

bool kernels_run_concurrently() {
    if (kernels_serialised_by_environment()) return false;
    int dev = 0, concurrent = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&concurrent, cudaDevAttrConcurrentKernels, dev);
    return concurrent != 0;
}

// Stream-ordered allocation from the device's default pool. The pool keeps freed memory (release
// threshold raised once) so that steady-state calls map nothing new: a forward's workspace is
// O(tokens · heads · K) and is needed again by the next call.
void* workspace_alloc(size_t bytes, const char* op) {
    static const bool pool_ready = [] {
        int dev = 0;
        cudaGetDevice(&dev);
        cudaMemPool_t pool;
        if (cudaDeviceGetDefaultMemPool(&pool, dev) == cudaSuccess) {
            uint64_t keep = UINT64_MAX;
            cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
        }
        return true;
    }();
    (void)pool_ready;
    void* ptr = nullptr;
    check_cuda(cudaMallocAsync(&ptr, bytes, launch_stream()), op, "cudaMallocAsync(workspace)");
    return ptr;
}

void workspace_free(void* ptr) {
    if (ptr) cudaFreeAsync(ptr, launch_stream());
}

void forward(const Problem& p) {
    const LinearForwardArgs& a = p.args;
    HLA_CHECK(a.k.dtype == a.q.dtype && a.v.dtype == a.q.dtype, p.op,
              ": q/k/v: the CUDA backend needs one dtype for q, k and v, got q ", dtype_name(a.q.dtype), ", k ",
              dtype_name(a.k.dtype), ", v ", dtype_name(a.v.dtype));
    HLA_CHECK(p.K == 64 || p.K == 128, p.op, ": q: the CUDA chunked forward supports K in {64, 128}, got K = ", p.K);
    HLA_CHECK(p.V == 64 || p.V == 128, p.op, ": v: the CUDA chunked forward supports V in {64, 128}, got V = ", p.V);
    HLA_CHECK(p.T < (int64_t(1) << 31), p.op, ": q: T = ", p.T, " tokens exceeds the CUDA backend's 2^31 limit");
    check_cuda(cudaSetDevice(a.q.device_index), p.op, "cudaSetDevice");
    refuse_graph_capture(p.op);
    // The input dtypes this build compiled the chunked forward for (CMake HLA_CUDA_LINEAR_DTYPES, all
    // three by default; a bf16-only build leaves out fwd_f16.cu and fwd_f32.cu).
    switch (a.q.dtype) {
#if HLA_CUDA_LINEAR_BF16
        case DType::BF16: return forward_chunked<__nv_bfloat16>(p);
#endif
#if HLA_CUDA_LINEAR_F16
        case DType::F16: return forward_chunked<__half>(p);
#endif
#if HLA_CUDA_LINEAR_F32
        case DType::F32: return forward_chunked<float>(p);
#endif
        default: break;
    }
    detail::fail(p.op, ": q: the CUDA chunked forward for ", dtype_name(a.q.dtype), " inputs is not compiled into this ",
                 "build (CMake HLA_CUDA_LINEAR_DTYPES leaves it out)");
}

}  // namespace hla::linear::cuda
