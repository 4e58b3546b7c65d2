// hla — argument checks shared by every op's dispatch. Each failure names the op, the argument, what
// was expected and what came.
#pragma once

#include <initializer_list>
#include <string>
#include <vector>

#include "hla/error.hpp"
#include "hla/linear.hpp"  // Backend
#include "hla/tensor.hpp"

namespace hla::detail {

// A dimension the caller must match exactly, with the letter that names it in messages.
struct Dim {
    const char* letter;
    int64_t size;
};

// Formats "[B=2, T=64, H=4, K=32]".
std::string dims_string(std::initializer_list<Dim> dims);

// Checks `x` is defined, on `device`, has exactly these dims, a dtype in `dtypes` and a contiguous
// innermost dimension.
void check_tensor(const char* op, const char* name, const TensorView& x, std::initializer_list<Dim> dims,
                  std::initializer_list<DType> dtypes, Device device, int device_index);

// Checks `x` is undefined; used for arguments a configuration does not take.
void check_absent(const char* op, const char* name, const TensorView& x, const char* why);

// The first device of a call; every other tensor must be on it.
void check_same_device(const char* op, const char* name, const TensorView& x, Device device, int device_index);

std::string dtypes_string(std::initializer_list<DType> dtypes);

// The backend a call runs on: Auto follows the tensors' device; an explicit choice must match it.
Backend resolve_backend(const char* op, Backend requested, Device device);

// Runs the implementation of the backend a validated call resolved to (one place for the choice, so a
// new backend is added here and in each family's three functions, not in every entry point).
template <class Reference, class Cpu, class Cuda>
void on_backend(Backend backend, Reference&& reference, Cpu&& cpu, Cuda&& cuda) {
    switch (backend) {
        case Backend::Reference: reference(); return;
        case Backend::Cuda: cuda(); return;
        default: cpu(); return;
    }
}

// Reads cu_seqlens (i32 or i64, CPU or CUDA) into host offsets and checks 0 = cu[0] ≤ … ≤ cu[N] = total.
std::vector<int64_t> read_cu_seqlens(const char* op, const TensorView& cu, int64_t total);

// Copies a small device or host integer tensor to the host as int64.
std::vector<int64_t> read_indices(const TensorView& x);
// Element i of a 1-D i32 / i64 tensor in host memory (no copy, no allocation: for per-token paths).
int64_t read_host_index(const TensorView& x, int64_t i);

}  // namespace hla::detail
