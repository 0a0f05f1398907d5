// One row's sampling on the CPU (model/sampler.py's order and rules; the torch Sampler is the reference):
// penalties, bans, greedy, temperature, top_k, top_p, min_p, typical, then an inverse-CDF draw with a uniform u.
#pragma once

#include <cstdint>
#include <vector>

namespace cpuk {

struct SampleParams {
    float repetition_penalty = 1.0f;
    int64_t sustain = -1, decay = 0;
    float presence = 0.0f, frequency = 0.0f;
    float temperature = 1.0f;
    int64_t top_k = 0;
    float top_p = 1.0f, min_p = 0.0f, typical = 1.0f;
};

// The candidates that survive (ids) and their final logits, in the order the draw walks them; greedy: one id; no
// truncation at all: ids empty and vals the whole row (id = position). x: the row's logits [V] (a working copy,
// modified or taken). Returns false when no token can be sampled.
bool sample_candidates(std::vector<float>& x, const int64_t* history, int64_t T, const int64_t* banned, int64_t nb,
                       const SampleParams& p, std::vector<int64_t>& ids, std::vector<float>& vals);

// Inverse-CDF pick among candidates (vals: final logits) with a uniform u in [0, 1): an index into vals.
int64_t draw(const std::vector<float>& vals, double u);

}  // namespace cpuk
