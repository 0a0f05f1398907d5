#include "pool.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define CPUK_PAUSE() _mm_pause()
#else
#define CPUK_PAUSE() std::this_thread::yield()
#endif

namespace cpuk {

namespace {

class Pool {
public:
    ~Pool()
    {
        {
            std::lock_guard<std::mutex> l(m_);
            stop_ = true;
            gen_.fetch_add(1);
        }
        cv_.notify_all();
        for (auto& t : threads_) t.join();
    }

    // Runs job(i) for i in 1..n-1 on workers and job(0) here; false (nothing run) when busy.
    bool run(int n, const std::function<void(int)>& job)
    {
        std::unique_lock<std::mutex> busy(run_m_, std::try_to_lock);
        if (!busy.owns_lock()) return false;
        grow(n - 1);
        job_ = &job;
        want_ = n - 1;
        pending_.store(n - 1);
        {
            std::lock_guard<std::mutex> l(m_);
            gen_.fetch_add(1, std::memory_order_release);
        }
        cv_.notify_all();
        job(0);
        while (pending_.load(std::memory_order_acquire) != 0) CPUK_PAUSE();
        return true;
    }

private:
    void grow(int n)
    {
        while ((int)threads_.size() < n) {
            const int idx = (int)threads_.size() + 1;
            const uint64_t now = gen_.load();     // before the thread runs: it must not miss the next region
            threads_.emplace_back([this, idx, now] { loop(idx, now); });
        }
    }

    void loop(int idx, uint64_t seen)
    {
        while (true) {
            // spin up to 5 ms for the next region (a decode step's come every few us, the next step's after the
            // sampler and the websocket: 1 ms cost the chat page 15% of its speed), then sleep; by the clock,
            // since a pause takes 25 ns on one CPU and 1 ns on another
            uint64_t g = gen_.load(std::memory_order_acquire);
            const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(5);
            for (uint32_t i = 1; g == seen; ++i) {
                CPUK_PAUSE();
                g = gen_.load(std::memory_order_acquire);
                if (i % 64 == 0 && std::chrono::steady_clock::now() > until) break;
            }
            if (g == seen) {
                std::unique_lock<std::mutex> l(m_);
                cv_.wait(l, [&] { return gen_.load() != seen; });
                g = gen_.load();
            }
            seen = g;
            if (stop_) return;
            if (idx <= want_) {
                (*job_)(idx);
                pending_.fetch_sub(1, std::memory_order_acq_rel);
            }
        }
    }

    std::vector<std::thread> threads_;
    std::mutex m_, run_m_;
    std::condition_variable cv_;
    std::atomic<uint64_t> gen_{0};
    std::atomic<int> pending_{0};
    const std::function<void(int)>* job_ = nullptr;
    int want_ = 0;
    bool stop_ = false;
};

Pool& pool()
{
    static Pool* p = new Pool();      // never destroyed: workers may outlive static destruction at exit
    return *p;
}

}  // namespace

void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& fn)
{
    const int64_t n = end - begin;
    if (n <= 0) return;
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / std::max<int64_t>(grain, 1)));
    if (parts == 1) {
        fn(begin, end);
        return;
    }
    const int64_t step = (n + parts - 1) / parts;
    const std::function<void(int)> job = [&](int i) {
        const int64_t b = begin + i * step, e = std::min(end, b + step);
        if (b < e) fn(b, e);
    };
    if (!pool().run((int)parts, job))
        for (int i = 0; i < parts; ++i) job(i);
}

}  // namespace cpuk
