// hla — tensor views (non-owning, what every op takes) and an owning Tensor for tests, tools and
// the engine.
//
// A TensorView is a pointer plus dtype, device, shape and strides (in elements, not bytes). An
// undefined view (default-constructed) stands for an optional argument that was not given.
// Ops never allocate their outputs: the caller passes views of the memory to write, the way
// FlashAttention's C++ API is embedded.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "hla/dtype.hpp"

namespace hla {

enum class Device : uint8_t { CPU, CUDA };
const char* device_name(Device device);

constexpr int kMaxDims = 6;

struct TensorView {
    void* data = nullptr;
    DType dtype = DType::F32;
    Device device = Device::CPU;
    int device_index = 0;
    int ndim = -1;  // -1: undefined (an optional argument that was not given)
    int64_t shape[kMaxDims] = {};
    int64_t stride[kMaxDims] = {};

    TensorView() = default;
    // A contiguous (row-major) view.
    TensorView(void* data, DType dtype, std::initializer_list<int64_t> shape, Device device = Device::CPU,
               int device_index = 0);
    TensorView(void* data, DType dtype, const std::vector<int64_t>& shape, Device device = Device::CPU,
               int device_index = 0);
    // A strided view; strides in elements.
    static TensorView strided(void* data, DType dtype, const std::vector<int64_t>& shape,
                              const std::vector<int64_t>& strides, Device device = Device::CPU,
                              int device_index = 0);

    bool defined() const { return ndim >= 0; }
    int64_t size(int d) const { return shape[d < 0 ? d + ndim : d]; }
    int64_t numel() const;
    bool is_contiguous() const;
    std::vector<int64_t> sizes() const { return std::vector<int64_t>(shape, shape + (ndim > 0 ? ndim : 0)); }
    std::string shape_string() const;  // "[2, 64, 4, 32]"

    template <class T>
    T* ptr() const { return static_cast<T*>(data); }
};

// Owning, contiguous tensor on the CPU or (when hla is built with CUDA) a CUDA device.
class Tensor {
public:
    Tensor() = default;
    Tensor(std::vector<int64_t> shape, DType dtype, Device device = Device::CPU, int device_index = 0);
    static Tensor zeros(std::vector<int64_t> shape, DType dtype, Device device = Device::CPU);

    const TensorView& view() const { return view_; }
    operator TensorView() const { return view_; }
    bool defined() const { return view_.defined(); }
    void* data() const { return view_.data; }
    template <class T>
    T* ptr() const { return static_cast<T*>(view_.data); }
    DType dtype() const { return view_.dtype; }
    Device device() const { return view_.device; }
    int64_t numel() const { return view_.numel(); }
    int64_t size(int d) const { return view_.size(d); }
    size_t nbytes() const { return size_t(numel()) * dtype_size(view_.dtype); }
    std::vector<int64_t> sizes() const { return view_.sizes(); }

    // Copies (CPU <-> CUDA as needed); `to(dtype)` converts on the CPU.
    Tensor to(Device device) const;
    Tensor to(DType dtype) const;
    Tensor clone() const;
    void copy_from(const Tensor& src);  // same shape and dtype, any devices
    void fill(double value);            // CPU or CUDA

private:
    std::shared_ptr<void> storage_;
    TensorView view_;
};

// Whether a CUDA device is usable by this build of hla (false when built without CUDA).
bool cuda_available();
// Block until all queued work on the current CUDA device is done (no-op without CUDA).
void cuda_synchronize();

// The CUDA stream that hla's CUDA ops called from this thread enqueue their work on: kernels,
// workspace allocations (stream-ordered) and copies. It is a `cudaStream_t` passed as `void*` so this
// header needs no CUDA headers. The default, nullptr, is the legacy default stream.
//
// No op synchronises the host with the device. The decode steps (`linear_decode`,
// `flash_attn_with_kvcache` once its workspace has grown on a first call) neither allocate nor copy
// from the host, so they can be captured into a CUDA graph. The chunked forward and backward copy
// small tables from host memory and cannot be captured.
//
//     cudaStream_t s;  cudaStreamCreate(&s);
//     { hla::CudaStreamScope on(s);  hla::linear_decode(cfg, args); }   // enqueued on s
void set_cuda_stream(void* stream);
void* cuda_stream();

// Sets this thread's hla stream for a scope, and restores the previous one when the scope ends.
class CudaStreamScope {
public:
    explicit CudaStreamScope(void* stream) : previous_(cuda_stream()) { set_cuda_stream(stream); }
    ~CudaStreamScope() { set_cuda_stream(previous_); }
    CudaStreamScope(const CudaStreamScope&) = delete;
    CudaStreamScope& operator=(const CudaStreamScope&) = delete;

private:
    void* previous_;
};

}  // namespace hla
