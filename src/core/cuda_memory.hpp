// hla — the few CUDA runtime calls the core needs, behind plain C++ so that core files compile
// without the CUDA headers. Without CUDA support they throw hla::Error.
#pragma once

#include <cstddef>

namespace hla::detail {

void* cuda_malloc(size_t bytes, int device_index);
void cuda_free(void* p);
void cuda_copy(void* dst, const void* src, size_t bytes);  // any direction, synchronous

}  // namespace hla::detail
