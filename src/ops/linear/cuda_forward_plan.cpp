// hla — the record of the chunked CUDA forward's last plan, and which environments serialise kernels
// (cuda/forward_plan.hpp). Compiled in every build, so that the tests link without CUDA too (the
// record then says that nothing ran).
#include "ops/linear/cuda/forward_plan.hpp"

#include <cstdlib>
#include <cstring>
#include <initializer_list>

namespace hla::linear::cuda {

namespace {
thread_local ForwardPlan last_plan;
}

ForwardPlan last_forward_plan() { return last_plan; }

bool kernels_serialised_by_environment() {
    const char* blocking = std::getenv("CUDA_LAUNCH_BLOCKING");
    if (blocking && std::strcmp(blocking, "0") != 0) return true;
    for (const char* tool : {"CUDA_INJECTION64_PATH", "NV_NSIGHT_INJECTION_TRANSPORT_TYPE", "NV_COMPUTE_PROFILER_PERFWORKS_DIR"})
        if (std::getenv(tool)) return true;
    return false;
}

void record_forward_plan(const ForwardPlan& plan) { last_plan = plan; }

}  // namespace hla::linear::cuda
