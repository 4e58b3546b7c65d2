// A persistent worker pool. parallel_for gives each thread a fixed share of the indices (thread p of P
// owns [n·p/P, n·(p+1)/P)) and a thread that runs out of its own takes the rest of another's, so ragged
// tasks still balance. The fixed share is for cache affinity: a decode step touches every head's
// state (64 KiB at K = V = 128) once per token, and when the same head goes to the same thread on every
// call its state stays in that core's L2. With one shared counter, which thread got which head varied
// from call to call, each moved state crossed between the cores, and on a 2-core EPYC VM the decode
// step took 28-36 µs on 2 threads against 16.5 µs on one (the cost of a cross-core transfer depends on
// where the host places the virtual cores, hence fast and slow periods: 11-16 µs in others).
// Workers spin briefly before sleeping because decode steps are ~10 µs and a condition-variable
// wake-up alone costs several µs.
#include "hla/threading.hpp"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#include "hla/error.hpp"

namespace hla {
namespace {

class Pool {
public:
    explicit Pool(int n) { resize(n); }
    ~Pool() { stop_workers(); }

    int size() const { return int(workers_.size()) + 1; }  // the calling thread works too

    void resize(int n) {
        stop_workers();
        stop_ = false;
        shares_ = std::vector<Share>(size_t(n));
        for (int i = 0; i + 1 < n; ++i) workers_.emplace_back([this, i] { worker_loop(i + 1); });
    }

    void run(int64_t n, detail::TaskRef fn) {
        if (n <= 0) return;
        if (in_task_ || workers_.empty() || n == 1) {
            for (int64_t i = 0; i < n; ++i) fn.call(fn.object, i);
            return;
        }
        std::lock_guard<std::mutex> one_job_at_a_time(run_mutex_);
        {
            std::lock_guard<std::mutex> lk(mutex_);
            fn_ = fn;
            total_ = n;
            const int64_t parts = int64_t(shares_.size());
            for (int64_t p = 0; p < parts; ++p) {
                shares_[size_t(p)].next.store(n * p / parts, std::memory_order_relaxed);
                shares_[size_t(p)].end = n * (p + 1) / parts;
            }
            done_.store(0);
            error_ = nullptr;
            closed_ = false;
            generation_.fetch_add(1, std::memory_order_release);
        }
        cv_.notify_all();
        work(0);
        while (done_.load(std::memory_order_acquire) < total_) std::this_thread::yield();
        // Close the job once no worker is inside it, so a late worker can never pick up indices of
        // the next job with this job's function.
        for (;;) {
            std::lock_guard<std::mutex> lk(mutex_);
            if (active_.load() == 0) {
                closed_ = true;
                break;
            }
        }
        if (error_) std::rethrow_exception(error_);
    }

private:
    // Thread `self` runs its own share, then what is left of the others'.
    void work(int self) {
        in_task_ = true;
        const int parts = int(shares_.size());
        for (int k = 0; k < parts; ++k) {
            Share& share = shares_[size_t((self + k) % parts)];
            int64_t i;
            while ((i = share.next.fetch_add(1)) < share.end) {
                try {
                    fn_.call(fn_.object, i);
                } catch (...) {
                    std::lock_guard<std::mutex> lk(mutex_);
                    if (!error_) error_ = std::current_exception();
                }
                done_.fetch_add(1, std::memory_order_release);
            }
        }
        in_task_ = false;
    }

    void worker_loop(int self) {
        uint64_t seen = generation_.load();
        for (;;) {
            // Spin ~50 µs for the next job, then sleep.
            for (int spin = 0; spin < 20000 && generation_.load(std::memory_order_acquire) == seen && !stop_; ++spin) {
#if defined(__x86_64__)
                __builtin_ia32_pause();
#endif
            }
            if (generation_.load(std::memory_order_acquire) == seen) {
                std::unique_lock<std::mutex> lk(mutex_);
                cv_.wait(lk, [&] { return stop_ || generation_.load() != seen; });
            }
            bool joined = false;
            {
                std::lock_guard<std::mutex> lk(mutex_);
                if (stop_) return;
                seen = generation_.load();
                if (!closed_) {
                    active_.fetch_add(1);
                    joined = true;
                }
            }
            if (joined) {
                work(self);
                active_.fetch_sub(1);
            }
        }
    }

    void stop_workers() {
        {
            std::lock_guard<std::mutex> lk(mutex_);
            stop_ = true;
        }
        cv_.notify_all();
        for (auto& w : workers_) w.join();
        workers_.clear();
    }

    // One thread's share of the current job; a line each, so the threads' counters do not share one.
    struct alignas(64) Share {
        std::atomic<int64_t> next{0};
        int64_t end = 0;
    };

    std::vector<std::thread> workers_;
    std::vector<Share> shares_;
    std::mutex mutex_, run_mutex_;
    std::condition_variable cv_;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int64_t> done_{0}, active_{0};
    bool closed_ = true;
    int64_t total_ = 0;
    detail::TaskRef fn_{nullptr, nullptr};
    std::exception_ptr error_;
    std::atomic<bool> stop_{false};
    static thread_local bool in_task_;
};

thread_local bool Pool::in_task_ = false;

int default_threads() {
    if (const char* env = std::getenv("HLA_NUM_THREADS")) {
        const int n = std::atoi(env);
        if (n > 0) return n;
    }
    return std::max(1u, std::thread::hardware_concurrency());
}

Pool& pool() {
    static Pool p(default_threads());
    return p;
}

}  // namespace

int num_threads() { return pool().size(); }

void set_num_threads(int n) {
    HLA_CHECK(n >= 1, "set_num_threads: n: expected at least 1, got ", n);
    if (n != pool().size()) pool().resize(n);
}

namespace detail {
void parallel_for(int64_t n, TaskRef task) { pool().run(n, task); }
}  // namespace detail

}  // namespace hla
