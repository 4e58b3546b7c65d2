// hla — how the chunked CUDA forward ran its last call on this thread (forward_chunked_impl decides:
// pieces, the concurrent mode, raw operands, the scan's tile). For tests and measurements: a change
// that silently stops a path from being taken (and so from being tested or timed) shows up here.
#pragma once

namespace hla::linear::cuda {

struct ForwardPlan {
    bool ran = false;              // a chunked CUDA forward ran on this thread (the fields below are its)
    int pieces = 1;                // sequences cut into this many pieces (1: single-shot)
    bool parallel_pieces = false;  // pieces by the state pass (additive update on bf16), else in turn
    bool concurrent = false;       // prepare and the scan at once, the scan waiting on prepare's flags
    bool raw_operands = false;     // the scan reads q, k (and v) with row factors instead of prepare's copies
    bool scan_forms_wu = false;    // the delta rule's scan forms U and W from prepare's T (W from raw k, or
                                   // with vector decay from prepare's K⊙γ; else W is prepare's)
    int scan_tile = 0;             // value columns per scan block
};

// True where this process's environment makes CUDA run kernels one at a time: CUDA_LAUNCH_BLOCKING=1,
// or Nsight Compute, which serialises kernels to profile them. Nsight Compute 2025.3 preloads its
// injection library and sets NV_NSIGHT_INJECTION_TRANSPORT_TYPE (and NV_COMPUTE_PROFILER_PERFWORKS_DIR)
// but not CUDA_INJECTION64_PATH, which earlier versions and other tools set. The concurrent forward is
// off then: its scan, launched first, would wait for a prepare that cannot start until the scan ends.
bool kernels_serialised_by_environment();

// The plan of this thread's last chunked CUDA forward (not the backward's recompute); `ran` false
// when none ran (or hla was built without CUDA).
ForwardPlan last_forward_plan();
void record_forward_plan(const ForwardPlan& plan);

}  // namespace hla::linear::cuda
