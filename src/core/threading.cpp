// A persistent worker pool. parallel_for hands out indices through one atomic counter so ragged
// tasks balance; workers spin briefly before sleeping because decode steps are ~10 µs and a
// condition-variable wake-up alone costs several µs.
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
        for (int i = 0; i + 1 < n; ++i) workers_.emplace_back([this] { worker_loop(); });
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
            next_.store(0);
            done_.store(0);
            error_ = nullptr;
            closed_ = false;
            generation_.fetch_add(1, std::memory_order_release);
        }
        cv_.notify_all();
        work();
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
    void work() {
        in_task_ = true;
        int64_t i;
        while ((i = next_.fetch_add(1)) < total_) {
            try {
                fn_.call(fn_.object, i);
            } catch (...) {
                std::lock_guard<std::mutex> lk(mutex_);
                if (!error_) error_ = std::current_exception();
            }
            done_.fetch_add(1, std::memory_order_release);
        }
        in_task_ = false;
    }

    void worker_loop() {
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
                work();
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

    std::vector<std::thread> workers_;
    std::mutex mutex_, run_mutex_;
    std::condition_variable cv_;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int64_t> next_{0}, done_{0}, active_{0};
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
