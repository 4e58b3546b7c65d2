// hla — explicit instantiation of the tensor-core per-chunk backward for vector decay (stage 3,
// chunk_bwd_vec_mma.cuh) with the delta update (bf16 inputs; every K, V in {64, 128}).
#include "ops/linear/cuda/chunk_bwd_vec_mma.cuh"

namespace hla::linear::cuda {
#if HLA_CUDA_LINEAR_BF16
template void launch_backward_mma_vector<Update::Delta>(const bwd::Params&, const Stage3Views&, const char*);
#endif
}  // namespace hla::linear::cuda
