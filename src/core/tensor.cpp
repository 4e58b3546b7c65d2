#include "hla/tensor.hpp"

#include <cstdlib>
#include <cstring>
#include <sstream>

#include "hla/error.hpp"
#include "core/cuda_memory.hpp"

namespace hla {

static void init_view(TensorView& t, void* data, DType dtype, const int64_t* shape, int ndim, Device device,
                      int device_index) {
    HLA_CHECK(ndim <= kMaxDims, "TensorView: at most ", kMaxDims, " dimensions, got ", ndim);
    t.data = data;
    t.dtype = dtype;
    t.device = device;
    t.device_index = device_index;
    t.ndim = ndim;
    int64_t s = 1;
    for (int d = ndim - 1; d >= 0; --d) {
        HLA_CHECK(shape[d] >= 0, "TensorView: negative size ", shape[d], " in dimension ", d);
        t.shape[d] = shape[d];
        t.stride[d] = s;
        s *= shape[d] > 0 ? shape[d] : 1;
    }
}

TensorView::TensorView(void* data, DType dtype, std::initializer_list<int64_t> shape, Device device,
                       int device_index) {
    init_view(*this, data, dtype, shape.begin(), int(shape.size()), device, device_index);
}

TensorView::TensorView(void* data, DType dtype, const std::vector<int64_t>& shape, Device device,
                       int device_index) {
    init_view(*this, data, dtype, shape.data(), int(shape.size()), device, device_index);
}

TensorView TensorView::strided(void* data, DType dtype, const std::vector<int64_t>& shape,
                               const std::vector<int64_t>& strides, Device device, int device_index) {
    HLA_CHECK(shape.size() == strides.size(), "TensorView::strided: ", shape.size(), " sizes but ", strides.size(),
              " strides");
    TensorView t(data, dtype, shape, device, device_index);
    for (size_t d = 0; d < strides.size(); ++d) t.stride[d] = strides[d];
    return t;
}

int64_t TensorView::numel() const {
    if (ndim < 0) return 0;
    int64_t n = 1;
    for (int d = 0; d < ndim; ++d) n *= shape[d];
    return n;
}

bool TensorView::is_contiguous() const {
    int64_t s = 1;
    for (int d = ndim - 1; d >= 0; --d) {
        if (shape[d] != 1 && stride[d] != s) return false;
        s *= shape[d];
    }
    return true;
}

std::string TensorView::shape_string() const {
    if (ndim < 0) return "(undefined)";
    std::ostringstream os;
    os << '[';
    for (int d = 0; d < ndim; ++d) os << (d ? ", " : "") << shape[d];
    os << ']';
    return os.str();
}

Tensor::Tensor(std::vector<int64_t> shape, DType dtype, Device device, int device_index) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    const size_t bytes = std::max<size_t>(size_t(n) * dtype_size(dtype), 1);
    void* p = nullptr;
    if (device == Device::CPU) {
        p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
        HLA_CHECK(p != nullptr, "Tensor: out of host memory allocating ", bytes, " bytes");
        storage_ = std::shared_ptr<void>(p, [](void* q) { std::free(q); });
    } else {
        p = detail::cuda_malloc(bytes, device_index);
        storage_ = std::shared_ptr<void>(p, [](void* q) { detail::cuda_free(q); });
    }
    view_ = TensorView(p, dtype, shape, device, device_index);
}

Tensor Tensor::zeros(std::vector<int64_t> shape, DType dtype, Device device) {
    Tensor t(std::move(shape), dtype, device);
    t.fill(0.0);
    return t;
}

void Tensor::copy_from(const Tensor& src) {
    HLA_CHECK(src.sizes() == sizes() && src.dtype() == dtype(), "Tensor::copy_from: source ",
              src.view().shape_string(), " ", dtype_name(src.dtype()), " does not match destination ",
              view_.shape_string(), " ", dtype_name(dtype()));
    if (device() == Device::CPU && src.device() == Device::CPU) {
        std::memcpy(data(), src.data(), nbytes());
    } else {
        detail::cuda_copy(data(), src.data(), nbytes());
    }
}

Tensor Tensor::to(Device target) const {
    Tensor out(sizes(), dtype(), target);
    out.copy_from(*this);
    return out;
}

Tensor Tensor::to(DType target) const {
    HLA_CHECK(device() == Device::CPU, "Tensor::to(dtype): only CPU tensors convert, this one is on ",
              device_name(device()));
    Tensor out(sizes(), target, Device::CPU);
    for (int64_t i = 0; i < numel(); ++i) store_from_double(out.data(), target, i, load_as_double(data(), dtype(), i));
    return out;
}

Tensor Tensor::clone() const { return to(device()); }

void Tensor::fill(double value) {
    if (device() == Device::CPU) {
        for (int64_t i = 0; i < numel(); ++i) store_from_double(data(), dtype(), i, value);
    } else {
        Tensor host(sizes(), dtype(), Device::CPU);
        host.fill(value);
        copy_from(host);
    }
}

}  // namespace hla
