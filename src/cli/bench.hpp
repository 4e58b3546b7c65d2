// hla bench — error against the fp64 reference and speed for every linear-family op and backend.
#pragma once

#include "cli/bench_options.hpp"

namespace hla::cli {

// Runs the benchmark and prints the table (or JSON) on stdout, progress on stderr.
// Returns the process exit code: 0, or 1 when a run failed or produced NaN/Inf.
int run_bench(const BenchOptions& options);

}  // namespace hla::cli
