#include "core/checks.hpp"

#include <sstream>

#include "core/cuda_memory.hpp"

namespace hla {

const char* backend_name(Backend b) {
    switch (b) {
        case Backend::Auto: return "auto";
        case Backend::Reference: return "reference";
        case Backend::Cpu: return "cpu";
        case Backend::Cuda: return "cuda";
    }
    return "?";
}

}  // namespace hla

namespace hla::detail {

Backend resolve_backend(const char* op, Backend requested, Device dev) {
    if (requested == Backend::Auto) return dev == Device::CUDA ? Backend::Cuda : Backend::Cpu;
    if (requested == Backend::Cuda)
        HLA_CHECK(dev == Device::CUDA, op, ": backend: cuda needs CUDA tensors, got tensors on ", device_name(dev));
    else
        HLA_CHECK(dev == Device::CPU, op, ": backend: ", backend_name(requested), " needs CPU tensors, got tensors on ",
                  device_name(dev));
    return requested;
}

std::string dims_string(std::initializer_list<Dim> dims) {
    std::ostringstream os;
    os << '[';
    bool first = true;
    for (const Dim& d : dims) {
        os << (first ? "" : ", ") << d.letter << '=' << d.size;
        first = false;
    }
    os << ']';
    return os.str();
}

std::string dtypes_string(std::initializer_list<DType> dtypes) {
    std::string s;
    for (DType d : dtypes) s += (s.empty() ? "" : " | ") + std::string(dtype_name(d));
    return s;
}

void check_same_device(const char* op, const char* name, const TensorView& x, Device device, int device_index) {
    HLA_CHECK(x.device == device && x.device_index == device_index, op, ": ", name, ": expected a tensor on ",
              device_name(device), ":", device_index, " like the other inputs, got one on ", device_name(x.device),
              ":", x.device_index);
}

void check_tensor(const char* op, const char* name, const TensorView& x, std::initializer_list<Dim> dims,
                  std::initializer_list<DType> dtypes, Device device, int device_index) {
    HLA_CHECK(x.defined(), op, ": ", name, ": required, got none (expected shape ", dims_string(dims), ")");
    HLA_CHECK(x.ndim == int(dims.size()), op, ": ", name, ": expected rank ", dims.size(), " with shape ",
              dims_string(dims), ", got rank ", x.ndim, " with shape ", x.shape_string());
    int d = 0;
    for (const Dim& e : dims) {
        HLA_CHECK(x.shape[d] == e.size, op, ": ", name, ": expected shape ", dims_string(dims), ", got ",
                  x.shape_string(), " (dimension ", d, ", ", e.letter, ")");
        ++d;
    }
    bool dtype_ok = false;
    for (DType t : dtypes) dtype_ok |= (x.dtype == t);
    HLA_CHECK(dtype_ok, op, ": ", name, ": expected dtype ", dtypes_string(dtypes), ", got ", dtype_name(x.dtype));
    check_same_device(op, name, x, device, device_index);
    HLA_CHECK(x.numel() == 0 || x.data != nullptr, op, ": ", name, ": null data pointer for a non-empty tensor");
    if (x.ndim > 0 && x.shape[x.ndim - 1] > 1)
        HLA_CHECK(x.stride[x.ndim - 1] == 1, op, ": ", name, ": expected a contiguous innermost dimension (stride 1), got stride ",
                  x.stride[x.ndim - 1], "; other strides may be arbitrary");
    for (int i = 0; i < x.ndim; ++i)
        HLA_CHECK(x.stride[i] >= 0, op, ": ", name, ": negative stride ", x.stride[i], " in dimension ", i,
                  " is not supported");
}

void check_absent(const char* op, const char* name, const TensorView& x, const char* why) {
    HLA_CHECK(!x.defined(), op, ": ", name, ": not expected (", why, "), got a tensor of shape ", x.shape_string());
}

int64_t read_host_index(const TensorView& x, int64_t i) {
    const int64_t at = i * x.stride[0];
    return x.dtype == DType::I32 ? int64_t(x.ptr<int32_t>()[at]) : x.ptr<int64_t>()[at];
}

std::vector<int64_t> read_indices(const TensorView& x) {
    const int64_t n = x.numel();
    std::vector<int64_t> out(static_cast<size_t>(n));
    std::vector<char> host;
    const void* base = x.data;
    const size_t esize = dtype_size(x.dtype);
    // Gather the (1-D, possibly strided) elements.
    if (x.device == Device::CUDA) {
        const int64_t span = n == 0 ? 0 : (n - 1) * x.stride[0] + 1;
        host.resize(size_t(span) * esize);
        if (span) cuda_copy(host.data(), x.data, host.size());
        base = host.data();
    }
    for (int64_t i = 0; i < n; ++i) {
        const int64_t at = i * x.stride[0];
        out[size_t(i)] = x.dtype == DType::I64 ? static_cast<const int64_t*>(base)[at]
                                               : int64_t(static_cast<const int32_t*>(base)[at]);
    }
    return out;
}

std::vector<int64_t> read_cu_seqlens(const char* op, const TensorView& cu, int64_t total) {
    HLA_CHECK(cu.ndim == 1, op, ": cu_seqlens: expected rank 1 [N+1], got shape ", cu.shape_string());
    HLA_CHECK(cu.dtype == DType::I32 || cu.dtype == DType::I64, op, ": cu_seqlens: expected dtype i32 | i64, got ",
              dtype_name(cu.dtype));
    HLA_CHECK(cu.shape[0] >= 2, op, ": cu_seqlens: expected at least 2 entries [N+1 with N >= 1], got ",
              cu.shape_string());
    std::vector<int64_t> off = read_indices(cu);
    HLA_CHECK(off[0] == 0, op, ": cu_seqlens: expected cu_seqlens[0] == 0, got ", off[0]);
    for (size_t i = 1; i < off.size(); ++i)
        HLA_CHECK(off[i] >= off[i - 1], op, ": cu_seqlens: expected non-decreasing offsets, got cu_seqlens[", i - 1,
                  "] = ", off[i - 1], " > cu_seqlens[", i, "] = ", off[i]);
    HLA_CHECK(off.back() == total, op, ": cu_seqlens: expected the last offset to equal the packed length T = ", total,
              ", got ", off.back());
    return off;
}

}  // namespace hla::detail
