// hla — explicit instantiation of the chunked forward for bf16 inputs (one dtype per file so the
// build runs them in parallel).
#include "ops/linear/cuda/chunk_fwd.cuh"

namespace hla::linear::cuda {
template void forward_chunked<__nv_bfloat16>(const Problem& p);
template void* forward_recompute<__nv_bfloat16>(const Problem& p, void* states, FwdParams* keep);
}  // namespace hla::linear::cuda
