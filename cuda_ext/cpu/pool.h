// The CPU kernels' own thread pool. torch's OpenMP pool is fast only from the thread that created it: called from
// any other thread (a web server's request thread), every parallel region of libgomp woke its workers from sleep,
// and a decode step has ~180 of them (the embedded model: 174 t/s on the main thread, 70 t/s on another). These
// workers spin for a while after each region, whoever called it, then sleep.
#pragma once

#include <cstdint>
#include <functional>

namespace cpuk {

// fn(b, e) over [begin, end) split into at most as many contiguous ranges as threads (torch's intra-op count), each
// of at least `grain` items; the caller takes the first range. Serial when another call is running.
void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace cpuk
