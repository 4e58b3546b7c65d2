// Built when hla is configured without CUDA: every CUDA request is a clear error.
#include "core/cuda_memory.hpp"
#include "hla/error.hpp"
#include "hla/tensor.hpp"

namespace hla {
namespace detail {

void* cuda_malloc(size_t, int) { fail("Tensor: this build of hla has no CUDA support (configure with HLA_CUDA=ON)"); }
void cuda_free(void*) {}
void cuda_copy(void*, const void*, size_t) { fail("Tensor: this build of hla has no CUDA support"); }

}  // namespace detail

bool cuda_available() { return false; }
void cuda_synchronize() {}

}  // namespace hla
