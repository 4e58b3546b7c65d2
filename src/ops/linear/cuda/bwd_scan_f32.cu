// hla — explicit instantiation of the backward's state-gradient scan (chunk_bwd_scan.cuh) for fp32
// operands (fp16 and fp32 inputs, whose forward intermediates are fp32).
#include "ops/linear/cuda/chunk_bwd_scan.cuh"

namespace hla::linear::cuda {
#if HLA_CUDA_LINEAR_F16 || HLA_CUDA_LINEAR_F32
template void dstate_scan<float>(const Problem&, const FwdParams&, const DScanParams&);
#endif
}  // namespace hla::linear::cuda
