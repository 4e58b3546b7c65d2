// hla — explicit instantiation of the chunked forward for f16 inputs (one dtype per file so the
// build runs them in parallel).
#include "ops/linear/cuda/chunk_fwd.cuh"

namespace hla::linear::cuda {
template void forward_chunked<__half>(const Problem& p);
template void* forward_recompute<__half>(const Problem& p, void* states, FwdParams* keep);
}  // namespace hla::linear::cuda
