// Attention with sinks for one new token per sequence (decode). The plain version is
// model.sdpa_with_sinks, which tests/test_kernels.py compares against.
//
// Why hand-written: a decode step's attention is a few million multiply-adds, but the plain
// path spends ~0.3 ms a layer at 512 cached tokens (float copies of the whole cache, a batched
// matmul, a softmax over a concatenated sink column, another matmul): more than reading the
// layer's weights. Prefill goes through PyTorch's flash kernel instead (kernels.attention).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "parallel.h"
#include "simd.h"

namespace ossgpt::attention {

// Softmax of each head's scores (G rows of S) with its sink as one more logit that takes
// probability and gives no value: the scores become e**(score - m), and inv[g] = 1 / the sum.
inline void softmax_with_sinks(float* scores, int64_t S, int G, const float* top, const float* sinks,
                               float* inv) {
  for (int g = 0; g < G; ++g) {
    const float m = std::max(top[g], sinks[g]);
    float* row = scores + g * S;
    simd::F sum = simd::zero();
    int64_t s = 0;
    for (; s + simd::W <= S; s += simd::W) {
      const simd::F e = simd::exp(simd::sub(simd::load(row + s), simd::set1(m)));
      simd::store(row + s, e);
      sum = simd::add(sum, e);
    }
    float total = simd::reduce(sum) + std::exp(sinks[g] - m);
    for (; s < S; ++s) total += row[s] = std::exp(row[s] - m);
    inv[g] = 1.f / total;
  }
}

// out (DF vectors) = inv * sum_s p[s] v[s] for the keys the mask lets through, rounded to nearest
// even (as .to(torch.bfloat16)); DF, the head's vectors, a constant so the accumulators stay in
// registers (chosen from N down).
template <int N>
inline void weighted_values(int DF, const float* p, const uint16_t* v, int64_t ld, int64_t S,
                            const bool* mask, float inv, uint16_t* out) {
  if constexpr (N > 1)
    if (DF < N) return weighted_values<N - 1>(DF, p, v, ld, S, mask, inv, out);
  simd::F acc[N];
  for (int j = 0; j < N; ++j) acc[j] = simd::zero();
  for (int64_t s = 0; s < S; ++s) {
    if (!mask[s]) continue;
    const simd::F ps = simd::set1(p[s]);
    for (int j = 0; j < N; ++j) acc[j] = simd::fmadd(ps, simd::load_bf16(v + s * ld + j * simd::W), acc[j]);
  }
  for (int j = 0; j < N; ++j) simd::store_bf16(out + j * simd::W, simd::mul(acc[j], simd::set1(inv)));
}

// One (sequence, key/value head): the G query heads that share it, over S cached keys.
// q (G, D) bf16; k, v rows of D bf16 `ld` elements apart; out (G, D) bf16.
inline void head_group(const uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t ld, int64_t S,
                       const bool* mask, const float* sinks, float scale, int G, int D, uint16_t* out,
                       std::vector<float>& scores) {
  scores.resize((size_t)G * S);
  float top[8], inv[8];
  std::fill(top, top + G, -INFINITY);
#if defined(OSSGPT_BF16_DOT)
  // scores: exact bf16 products, float32 sums (as the plain path's float32 einsum)
  const int DV = (D + 31) / 32;                // vdpbf16ps steps per dot product
  const __mmask32 last = D % 32 ? 0xFFFFu : ~0u;  // D % 32 == 16: the last step's upper half is 0
  auto load = [&](const uint16_t* p, int j) {
    return (__m512bh)_mm512_maskz_loadu_epi16(j == DV - 1 ? last : ~0u, p + 32 * j);
  };
  __m512bh qv[8][4];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < DV; ++j) qv[g][j] = load(q + g * D, j);
  for (int64_t s = 0; s < S; ++s) {
    if (!mask[s]) {
      for (int g = 0; g < G; ++g) scores[g * S + s] = -INFINITY;
      continue;
    }
    __m512bh kv[4];
    for (int j = 0; j < DV; ++j) kv[j] = load(k + s * ld, j);
    for (int g = 0; g < G; ++g) {
      __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[g][0], kv[0]);
      for (int j = 1; j < DV; ++j) acc = _mm512_dpbf16_ps(acc, qv[g][j], kv[j]);
      const float x = _mm512_reduce_add_ps(acc) * scale;
      scores[g * S + s] = x;
      top[g] = std::max(top[g], x);
    }
  }
#else
  // scores: q widened once, each key row widened as it is read; four keys at a time give four
  // independent chains of multiply-adds
  const int DV = D / simd::W;
  float qf[8 * 128];
  for (int i = 0; i < G * D; i += simd::W) simd::store(qf + i, simd::load_bf16(q + i));
  for (int g = 0; g < G; ++g) {
    const float* qg = qf + g * D;
    float* row = scores.data() + g * S;
    int64_t s = 0;
    for (; s + 4 <= S; s += 4) {
      simd::F acc[4] = {simd::zero(), simd::zero(), simd::zero(), simd::zero()};
      for (int j = 0; j < DV; ++j) {
        const simd::F qj = simd::load(qg + j * simd::W);
        for (int t = 0; t < 4; ++t) acc[t] = simd::fmadd(qj, simd::load_bf16(k + (s + t) * ld + j * simd::W), acc[t]);
      }
      for (int t = 0; t < 4; ++t) row[s + t] = simd::reduce(acc[t]) * scale;
    }
    for (; s < S; ++s) {
      simd::F acc = simd::zero();
      for (int j = 0; j < DV; ++j) acc = simd::fmadd(simd::load(qg + j * simd::W), simd::load_bf16(k + s * ld + j * simd::W), acc);
      row[s] = simd::reduce(acc) * scale;
    }
    for (s = 0; s < S; ++s) {
      if (!mask[s]) row[s] = -INFINITY;
      top[g] = std::max(top[g], row[s]);
    }
  }
#endif
  softmax_with_sinks(scores.data(), S, G, top, sinks, inv);
#if defined(OSSGPT_BF16_DOT)
  // out[g] = sum_s p[g, s] v[s]: D / 16 float accumulators per head, each value row read once
  __m512 acc[8][8];
  const int DF = D / 16;
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < DF; ++j) acc[g][j] = _mm512_setzero_ps();
  for (int64_t s = 0; s < S; ++s) {
    if (!mask[s]) continue;
    __m512 vv[8];
    for (int j = 0; j < DF; ++j) vv[j] = simd::load_bf16(v + s * ld + 16 * j);
    for (int g = 0; g < G; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * S + s]);
      for (int j = 0; j < DF; ++j) acc[g][j] = _mm512_fmadd_ps(p, vv[j], acc[g][j]);
    }
  }
  for (int g = 0; g < G; ++g)   // rounded to nearest even, as .to(torch.bfloat16)
    for (int j = 0; j < DF; ++j) simd::store_bf16(out + g * D + 16 * j, _mm512_mul_ps(acc[g][j], _mm512_set1_ps(inv[g])));
#else
  for (int g = 0; g < G; ++g) weighted_values<128 / simd::W>(D / simd::W, scores.data() + g * S, v, ld, S, mask, inv[g], out + g * D);
#endif
}

// q (B, H, D) bf16; k, v (B, S, K, D) bf16 rows of D contiguous, `sb` and `ss` elements apart over
// B and S (a cache's view); sinks (H,) float32; mask (B, S), true where the query may attend
// the key; out (B, H, D) bf16. D % 16 == 0, D <= 128, H / K <= 8.
inline void forward(const uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t sb, int64_t ss,
                    const float* sinks, const bool* mask, int64_t B, int64_t H, int64_t K, int64_t S,
                    int64_t D, float scale, uint16_t* out, const Parallel& parallel) {
  if (H % K || H / K > 8 || D % 16 || D > 128) throw std::invalid_argument("decode_attention: bad shapes");
  const int G = (int)(H / K);
  parallel(0, B * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / K, h = i % K;
      head_group(q + (b * H + h * G) * D, k + b * sb + h * D, v + b * sb + h * D, ss, S, mask + b * S,
                 sinks + h * G, scale, G, (int)D, out + (b * H + h * G) * D, scores);
    }
  });
}

}  // namespace ossgpt::attention
