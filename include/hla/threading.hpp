// hla — CPU threading: one persistent pool shared by every CPU op.
#pragma once

#include <cstdint>
#include <functional>

namespace hla {

// Number of worker threads CPU ops use (default: HLA_NUM_THREADS, else the hardware concurrency).
int num_threads();
void set_num_threads(int n);

// Runs fn(i) for i in [0, n) on the pool and returns when all are done. Tasks are handed out
// dynamically, so uneven tasks (ragged sequences) balance. Nested calls run inline.
void parallel_for(int64_t n, const std::function<void(int64_t)>& fn);

}  // namespace hla
