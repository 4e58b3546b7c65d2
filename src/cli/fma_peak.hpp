// hla bench — the machine's fp32 FMA peak, measured: the ceiling GFLOP/s is reported against.
#pragma once

namespace hla::cli {

struct FmaPeak {
    double gflops = 0;              // the peak for `threads` threads: max of the two below
    double all_threads_gflops = 0;  // 2 · FMAs / s, `threads` threads running together
    double one_thread_gflops = 0;   // one thread alone
    int threads = 0;
    int vector_floats = 0;    // floats per vector register the compiler used (16 with AVX-512)
    double seconds = 0;       // how long it ran
};

// Runs `threads` threads (then one thread), each issuing independent vector FMA chains, for about
// `seconds` in all; the best of a few trials.
FmaPeak measure_fma_peak(int threads, double seconds = 0.2);

}  // namespace hla::cli
