// hla — the record of the chunked CUDA forward's last plan (cuda/forward_plan.hpp). Compiled in every
// build, so that code asking for it links without CUDA too (it then reports that nothing ran).
#include "ops/linear/cuda/forward_plan.hpp"

namespace hla::linear::cuda {

namespace {
thread_local ForwardPlan last_plan;
}

ForwardPlan last_forward_plan() { return last_plan; }

void record_forward_plan(const ForwardPlan& plan) { last_plan = plan; }

}  // namespace hla::linear::cuda
