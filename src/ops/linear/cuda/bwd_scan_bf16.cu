// hla — explicit instantiation of the backward's state-gradient scan (chunk_bwd_scan.cuh) for bf16
// operands (bf16 inputs).
#include "ops/linear/cuda/chunk_bwd_scan.cuh"

namespace hla::linear::cuda {
#if HLA_CUDA_LINEAR_BF16
template void dstate_scan<__nv_bfloat16>(const Problem&, const FwdParams&, const DScanParams&);
#endif
}  // namespace hla::linear::cuda
