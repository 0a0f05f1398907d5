// CPU sampling of one row (sampler.h). Mirrors model/sampler.py: the same survivor sets (partial sorts grown until
// they hold the mass, as the torch Sampler does), fp32 logits, fp64 draw.
#include "sampler.h"

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <unordered_map>

namespace cpuk {

namespace {

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

void apply_penalties(std::vector<float>& x, const int64_t* h, int64_t T, const SampleParams& p)
{
    if ((p.repetition_penalty == 1.0f && p.presence == 0.0f && p.frequency == 0.0f) || T == 0) return;
    const int64_t V = (int64_t)x.size();
    const int64_t window = p.sustain < 0 ? T : std::min(T, p.sustain + p.decay);
    struct Seen { float strength = 0.0f; int count = 0; };
    std::unordered_map<int64_t, Seen> seen;
    seen.reserve((size_t)window * 2);
    for (int64_t i = T - window; i < T; ++i) {
        const int64_t id = h[i];
        if (id < 0 || id >= V) continue;
        const int64_t d = T - 1 - i;                      // 0 = most recent
        float st = 1.0f;
        if (p.sustain >= 0)
            st = std::min(1.0f, std::max(0.0f, (float)(p.sustain + p.decay - d) / (float)(p.decay + 1)));
        Seen& s = seen[id];
        s.strength = std::max(s.strength, st);
        s.count += 1;
    }
    for (const auto& [id, s] : seen) {
        float v = x[id];
        if (p.repetition_penalty != 1.0f) {
            const float pen = 1.0f + (p.repetition_penalty - 1.0f) * s.strength;
            v = v > 0 ? v / pen : v * pen;
        }
        v = v - p.frequency * (float)s.count - p.presence * (s.count > 0 ? 1.0f : 0.0f);
        x[id] = v;
    }
}

// The m best entries of key over ids (better(a, b): a ranks before b; a strict total order), in rank order: one pass
// with a heap of m, so a 50 or 1024 best of a 49k vocabulary costs one comparison an entry.
template <class Better>
std::vector<int64_t> best_m(const std::vector<int64_t>& ids, size_t m, Better better)
{
    std::vector<int64_t> heap;
    heap.reserve(m + 1);
    for (int64_t i : ids) {           // heap.front(): the worst of the best so far
        if (heap.size() < m) {
            heap.push_back(i);
            std::push_heap(heap.begin(), heap.end(), better);
        } else if (better(i, heap.front())) {
            std::pop_heap(heap.begin(), heap.end(), better);
            heap.back() = i;
            std::push_heap(heap.begin(), heap.end(), better);
        }
    }
    std::sort_heap(heap.begin(), heap.end(), better);
    return heap;
}

// The best head of ids in rank order, grown x8 from 1024 until enough(head) (or all of them, sorted): the torch
// Sampler's partial topk.
template <class Better, class Enough>
std::vector<int64_t> sorted_head(const std::vector<int64_t>& ids, Better better, Enough enough)
{
    for (size_t m = 1024;; m *= 8) {
        if (2 * m >= ids.size()) {
            std::vector<int64_t> all(ids);
            std::sort(all.begin(), all.end(), better);
            return all;
        }
        std::vector<int64_t> head = best_m(ids, m, better);
        if (enough(head)) return head;
    }
}

}  // namespace

bool sample_candidates(std::vector<float>& x, const int64_t* history, int64_t T, const int64_t* banned, int64_t nb,
                       const SampleParams& p, std::vector<int64_t>& ids, std::vector<float>& vals)
{
    const int64_t V = (int64_t)x.size();
    apply_penalties(x, history, T, p);
    for (int64_t i = 0; i < nb; ++i)
        if (banned[i] >= 0 && banned[i] < V) x[banned[i]] = NEG_INF;
    ids.clear();
    vals.clear();
    if (p.temperature == 0.0f || p.top_k == 1) {         // greedy: torch.argmax's first maximum
        const int64_t best = std::max_element(x.begin(), x.end()) - x.begin();
        for (float v : x)
            if (std::isnan(v)) return false;
        if (!std::isfinite(x[best])) return false;
        ids.push_back(best);
        vals.push_back(0.0f);
        return true;
    }
    auto better = [&](int64_t a, int64_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); };
    std::vector<int64_t> cand;
    cand.reserve(V);
    for (int64_t i = 0; i < V; ++i)
        if (x[i] != NEG_INF) cand.push_back(i);
    bool sorted = false, whole = true;       // whole: the candidates are every finite entry of x
    if (p.top_k > 0 && p.top_k < (int64_t)cand.size()) {
        cand = best_m(cand, (size_t)p.top_k, better);
        sorted = true;
        whole = false;
    }
    if (cand.empty()) return false;
    if (p.temperature != 1.0f)
        for (int64_t i : cand) x[i] = x[i] / p.temperature;
    // log of the normaliser over the candidates (fp64 sums)
    // log of the normaliser over the candidates; while they are the whole row, over x itself (exp(-inf) = 0)
    auto lse_of = [&](const std::vector<int64_t>& c) {
        float m = NEG_INF;
        for (int64_t i : c) m = std::max(m, x[i]);
        if (whole) return (double)m + std::log(sum_exp(x.data(), V, m));
        double s = 0.0;
        for (int64_t i : c) s += (double)std::exp(x[i] - m);
        return (double)m + std::log(s);
    };
    if (p.top_p < 1.0f) {
        const double lse = lse_of(cand);
        if (!sorted) {
            cand = sorted_head(cand, better, [&](const std::vector<int64_t>& head) {
                double mass = 0.0;
                for (int64_t i : head) mass += std::exp((double)x[i] - lse);
                return mass >= p.top_p + 1e-4;
            });
            sorted = true;
        }
        whole = false;
        double before = 0.0;
        size_t keep = 0;
        for (; keep < cand.size(); ++keep) {
            if (keep > 0 && before >= p.top_p) break;
            before += std::exp((double)x[cand[keep]] - lse);
        }
        cand.resize(std::max<size_t>(1, keep));
    }
    if (p.min_p > 0.0f) {
        float m = NEG_INF;
        for (int64_t i : cand) m = std::max(m, x[i]);
        const float thr = m + std::log(p.min_p);
        std::vector<int64_t> kept;
        for (int64_t i : cand)
            if (!(x[i] < thr)) kept.push_back(i);
        cand.swap(kept);
        whole = false;
    }
    if (p.typical < 1.0f) {
        const double lse = lse_of(cand);
        double ent = 0.0;
        for (int64_t i : cand) {
            const double lp = (double)x[i] - lse, pr = std::exp(lp);
            if (pr > 0) ent -= pr * lp;
        }
        std::vector<float> shifted(V);
        for (int64_t i : cand) shifted[i] = (float)std::fabs(-((double)x[i] - lse) - ent);
        // ascending |surprise - entropy|, ties in candidate order (the reference's stable sort)
        std::vector<int64_t> pos(cand.size());
        std::iota(pos.begin(), pos.end(), 0);
        auto more_typical = [&](int64_t a, int64_t b) {
            const float sa = shifted[cand[a]], sb = shifted[cand[b]];
            return sa < sb || (sa == sb && a < b);
        };
        const std::vector<int64_t> order = sorted_head(pos, more_typical, [&](const std::vector<int64_t>& head) {
            double mass = 0.0;
            for (int64_t j : head) mass += std::exp((double)x[cand[j]] - lse);
            return mass >= p.typical + 1e-4;
        });
        double before = 0.0;
        std::vector<int64_t> kept;
        for (size_t j = 0; j < order.size(); ++j) {
            if (j > 0 && before >= p.typical) break;
            before += std::exp((double)x[cand[order[j]]] - lse);
            kept.push_back(cand[order[j]]);
        }
        cand.swap(kept);
    }
    for (int64_t i : cand) {
        if (std::isfinite(x[i])) {
            ids.push_back(i);
            vals.push_back(x[i]);
        }
    }
    return !ids.empty();
}

int64_t draw(const std::vector<float>& vals, double u)
{
    float m = NEG_INF;
    for (float v : vals) m = std::max(m, v);
    std::vector<float> w(vals.size());
    exp_shifted(vals.data(), (int64_t)vals.size(), m, w.data());   // fp32 weights, fp64 cdf: as the reference
    std::vector<double> cdf(vals.size());
    double total = 0.0;
    for (size_t i = 0; i < vals.size(); ++i) {
        total += (double)w[i];
        cdf[i] = total;
    }
    // v < total strictly, so the first cdf entry > v has a non-zero weight
    const double v = std::min(u * total, std::nextafter(total, 0.0));
    return (int64_t)(std::upper_bound(cdf.begin(), cdf.end(), v) - cdf.begin());
}

}  // namespace cpuk
