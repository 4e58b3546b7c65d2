// hla — CPU threading: one persistent pool shared by every CPU op.
#pragma once

#include <cstdint>
#include <type_traits>

namespace hla {

// Number of worker threads CPU ops use (default: HLA_NUM_THREADS, else the hardware concurrency).
int num_threads();
void set_num_threads(int n);

namespace detail {
// A non-owning reference to a callable: parallel_for never copies or allocates, so a decode step can
// use the pool on every token without touching the heap.
struct TaskRef {
    void* object;
    void (*call)(void* object, int64_t i);
};
void parallel_for(int64_t n, TaskRef task);
}  // namespace detail

// Runs fn(i) for i in [0, n) on the pool and returns when all are done. Thread p of P first runs its
// own share [n·p/P, n·(p+1)/P), so index i lands on the same thread on every call with the same n (a
// head's decode state stays in one core's cache); a thread out of work then takes the rest of another's
// share, so uneven tasks (ragged sequences) still balance. Nested calls run inline. The first exception
// thrown by a task is rethrown here.
template <class F>
void parallel_for(int64_t n, F&& fn) {
    using Fn = std::remove_reference_t<F>;
    detail::parallel_for(n, detail::TaskRef{const_cast<void*>(static_cast<const void*>(&fn)),
                                            [](void* f, int64_t i) { (*static_cast<Fn*>(f))(i); }});
}

}  // namespace hla
