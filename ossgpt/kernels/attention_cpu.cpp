// Attention with sinks for one new token per sequence (decode) on the CPU. The plain version is
// model.sdpa_with_sinks, which tests/test_kernels.py compares against.
//
// Why hand-written: a decode step's attention is a few million multiply-adds, but the plain
// path spends ~0.3 ms a layer at 512 cached tokens (float copies of the whole cache, a batched
// matmul, a softmax over a concatenated sink column, another matmul): more than reading the
// layer's weights. Prefill goes through PyTorch's flash kernel instead (kernels.attention).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include "vec_math.h"

namespace {

inline __m512 bf16x16_to_float(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// One (sequence, key/value head): the G query heads that share it, over S cached keys.
// q (G, D) bf16; k, v rows of D bf16 `ld` elements apart; out (G, D) bf16.
void head_group(const uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t ld, int64_t S,
                const bool* mask, const float* sinks, float scale, int G, int D, uint16_t* out,
                std::vector<float>& scores) {
  scores.resize((size_t)G * S);
  const int DV = (D + 31) / 32;                // vdpbf16ps steps per dot product
  const __mmask32 last = D % 32 ? 0xFFFFu : ~0u;  // D % 32 == 16: the last step's upper half is 0
  auto load = [&](const uint16_t* p, int j) {
    return (__m512bh)_mm512_maskz_loadu_epi16(j == DV - 1 ? last : ~0u, p + 32 * j);
  };
  __m512bh qv[8][4];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < DV; ++j) qv[g][j] = load(q + g * D, j);
  // scores: exact bf16 products, float32 sums (as the plain path's float32 einsum)
  float top[8];
  std::fill(top, top + G, -INFINITY);
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
  // softmax with the sink as one more logit that takes probability and gives no value
  float inv[8];
  for (int g = 0; g < G; ++g) {
    const float m = std::max(top[g], sinks[g]);
    float* row = scores.data() + g * S;
    __m512 sum = _mm512_setzero_ps();
    int64_t s = 0;
    for (; s + 16 <= S; s += 16) {
      const __m512 e = ossgpt::exp512(_mm512_sub_ps(_mm512_loadu_ps(row + s), _mm512_set1_ps(m)));
      _mm512_storeu_ps(row + s, e);
      sum = _mm512_add_ps(sum, e);
    }
    float total = _mm512_reduce_add_ps(sum) + std::exp(sinks[g] - m);
    for (; s < S; ++s) total += row[s] = std::exp(row[s] - m);
    inv[g] = 1.f / total;
  }
  // out[g] = sum_s p[g, s] v[s]: D / 16 float accumulators per head
  __m512 acc[8][8];
  const int DF = D / 16;
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < DF; ++j) acc[g][j] = _mm512_setzero_ps();
  for (int64_t s = 0; s < S; ++s) {
    if (!mask[s]) continue;
    __m512 vv[8];
    for (int j = 0; j < DF; ++j) vv[j] = bf16x16_to_float(v + s * ld + 16 * j);
    for (int g = 0; g < G; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * S + s]);
      for (int j = 0; j < DF; ++j) acc[g][j] = _mm512_fmadd_ps(p, vv[j], acc[g][j]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < DF; ++j)   // round to nearest even, as .to(torch.bfloat16)
      _mm256_storeu_si256((__m256i*)(out + g * D + 16 * j),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[g][j], _mm512_set1_ps(inv[g]))));
}

}  // namespace

// q (B, H, D) bf16; k, v (B, S, K, D) bf16 (a cache's view: strided over B and S, each row of
// D contiguous); sinks (H,) float32; mask (B, S) bool, true where the query may attend the key.
// -> (B, H, D) bf16. D % 16 == 0, D <= 128, H / K <= 8.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor sinks,
                               torch::Tensor mask, double scale) {
  TORCH_CHECK(q.dtype() == torch::kBFloat16 && k.dtype() == torch::kBFloat16 &&
              v.dtype() == torch::kBFloat16 && sinks.dtype() == torch::kFloat32 &&
              mask.dtype() == torch::kBool, "decode_attention: bad dtypes");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), S = k.size(1), K = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D && H % K == 0 &&
              H / K <= 8 && D % 16 == 0 && D <= 128 && mask.size(0) == B && mask.size(1) == S,
              "decode_attention: bad shapes");
  q = q.contiguous(); sinks = sinks.contiguous(); mask = mask.contiguous();
  if (k.stride(3) != 1 || k.stride(2) != D) k = k.contiguous();
  if (v.stride(3) != 1 || v.stride(2) != D || v.strides() != k.strides()) { k = k.contiguous(); v = v.contiguous(); }
  auto out = torch::empty({B, H, D}, q.options());
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const bool* mp = mask.data_ptr<bool>();
  const float* sp = sinks.data_ptr<float>();
  const int G = (int)(H / K);
  const int64_t sb = k.stride(0), ss = k.stride(1);
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / K, h = i % K;
      head_group(qp + (b * H + h * G) * D, kp + b * sb + h * D, vp + b * sb + h * D, ss, S,
                 mp + b * S, sp + h * G, (float)scale, G, (int)D, op + (b * H + h * G) * D, scores);
    }
  });
  return out;
}
#endif
