// hla — explicit instantiation of the chunked forward for f32 inputs (one dtype per file so the
// build runs them in parallel).
#include "ops/linear/cuda/chunk_fwd.cuh"

namespace hla::linear::cuda {
template void forward_chunked<float>(const Problem& p);
template void* forward_recompute<float>(const Problem& p, void* states, FwdParams* keep);
}  // namespace hla::linear::cuda
