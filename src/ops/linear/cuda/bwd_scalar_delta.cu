// hla — explicit instantiation of the per-chunk backward kernel (stage 3 of chunk_bwd.cuh) for one
// <vector decay, delta update> pair (one per file so the build runs them in parallel; "scalar" covers
// no, fixed and per-token scalar decay).
#include "ops/linear/cuda/chunk_bwd.cuh"

namespace hla::linear::cuda {
template int backward_blocks<false,true>();
template void launch_backward<false,true>(const bwd::Params&, int, const char*);
}  // namespace hla::linear::cuda
