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

// The ids of entries >= thr (finite), in index order.
std::vector<int64_t> at_least(const std::vector<float>& x, float thr)
{
    std::vector<int64_t> out;
    for (int64_t i = 0; i < (int64_t)x.size(); ++i)
        if (x[i] >= thr && x[i] != INFINITY) out.push_back(i);
    return out;
}

// The head of the row by value, grown until enough(head): every entry within 8, 16, 32, ... of the maximum (so the
// head holds the best entries whatever they are, and one scan replaces a sort of the vocabulary), else every
// finite entry. Unsorted.
template <class Enough>
std::vector<int64_t> head_by_value(const std::vector<float>& x, float max, Enough enough)
{
    for (float gap = 8.0f; gap <= 64.0f; gap *= 2.0f) {
        std::vector<int64_t> head = at_least(x, max - gap);
        if (enough(head)) return head;
    }
    return at_least(x, -INFINITY);
}

// The best head of ids by `better` (a strict total order), grown until enough(head): typical's ranking, which has no
// threshold to scan by. Sorted.
template <class Better, class Enough>
std::vector<int64_t> sorted_head(const std::vector<int64_t>& ids, Better better, Enough enough)
{
    for (size_t m = 64;; m *= 8) {
        std::vector<int64_t> all(ids);
        if (2 * m >= ids.size()) {
            std::sort(all.begin(), all.end(), better);
            return all;
        }
        std::partial_sort(all.begin(), all.begin() + m, all.end(), better);
        all.resize(m);
        if (enough(all)) return all;
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
    // temperature first, on the whole row: it keeps the order (top_k's set is the same before or after)
    if (p.temperature != 1.0f)
        for (float& v : x) v = v / p.temperature;
    const float xmax = *std::max_element(x.begin(), x.end());
    if (xmax == NEG_INF || std::isnan(xmax)) return false;
    auto lse_of = [&](const std::vector<int64_t>& c) {
        float m = NEG_INF;
        for (int64_t i : c) m = std::max(m, x[i]);
        double s = 0.0;
        for (int64_t i : c) s += (double)std::exp(x[i] - m);
        return (double)m + std::log(s);
    };
    std::vector<int64_t> cand;
    double lse = 0.0;             // top_p's normaliser: over the k candidates after top_k, else the whole row
    if (p.top_k > 0 && p.top_k < V) {
        cand = head_by_value(x, xmax, [&](const std::vector<int64_t>& h) { return (int64_t)h.size() >= p.top_k; });
        if ((int64_t)cand.size() > p.top_k) {
            std::nth_element(cand.begin(), cand.begin() + p.top_k, cand.end(), better);
            cand.resize(p.top_k);
        }
        std::sort(cand.begin(), cand.end(), better);
        lse = lse_of(cand);
    } else if (p.top_p < 1.0f) {
        // the nucleus is a prefix of the row sorted by value: only a head that holds the mass needs sorting
        lse = (double)xmax + std::log(sum_exp(x.data(), V, xmax));
        cand = head_by_value(x, xmax, [&](const std::vector<int64_t>& h) {
            double mass = 0.0;
            for (int64_t i : h) mass += std::exp((double)x[i] - lse);
            return mass >= p.top_p + 1e-4;
        });
        std::sort(cand.begin(), cand.end(), better);
    } else if (p.min_p <= 0.0f && p.typical >= 1.0f) {
        vals.swap(x);             // nothing truncates: the draw walks the row itself (ids empty: identity)
        return true;
    } else {
        cand = at_least(x, -INFINITY);
    }
    if (cand.empty()) return false;
    if (p.top_p < 1.0f) {
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
    }
    if (p.typical < 1.0f) {
        const double lse = lse_of(cand);
        double ent = 0.0;
        for (int64_t i : cand) {
            const double lp = (double)x[i] - lse, pr = std::exp(lp);
            if (pr > 0) ent -= pr * lp;
        }
        std::vector<float> shifted(cand.size());       // by position in cand
        for (size_t j = 0; j < cand.size(); ++j) shifted[j] = (float)std::fabs(-((double)x[cand[j]] - lse) - ent);
        // ascending |surprise - entropy|, ties in candidate order (the reference's stable sort)
        std::vector<int64_t> pos(cand.size());
        std::iota(pos.begin(), pos.end(), 0);
        auto more_typical = [&](int64_t a, int64_t b) {
            return shifted[a] < shifted[b] || (shifted[a] == shifted[b] && a < b);
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
