// The experts' decode products for bf16 models on the x86 levels without bf16 products (avx2,
// avx512): 16-bit integer activations as two bytes (mxfp4.h holds the layout, the float32 and
// the other levels' products). quantize_block is also prefill's (gemm_i16.h), so the two agree.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "mxfp4.h"

#if defined(OSSGPT_AVX2) || defined(OSSGPT_AVX512)
namespace ossgpt::mxfp4 {

// -- 16-bit integer activations as two bytes (x86 levels without bf16 products) -----------------
//
// Each block of 32 inputs as integers v = round(x / d), d = max |x| / 32512, |v| <= 32512 (an
// error of at most d / 2, a 2**-16 fraction of the block's largest), stored as two int8 parts
// v = 256 hi + lo. Why: with int16 inputs (vpmaddwd) the expert products were bound by arithmetic
// on AVX2, the experts read at 16 GB/s; vpmaddubsw multiplies 32 bytes at once, and eight
// blocks' sums gathered into one register before they are scaled leave 11 instructions a block
// where there were 19 (the experts read at 25 GB/s). vpmaddubsw multiplies unsigned by signed
// bytes, so the codes are looked up as 2 * E2M1 + 12 (0..24) and 12 times the block's input sum
// taken off after; every integer sum is exact (a byte pair's at most 2 * 24 * 128).

// x (K floats) -> per block of 32, the hi then the lo parts in pair-split order (64 bytes), its d,
// and 12 * the sum of its v
// One block of 32 inputs as the integers v[j] = round(x[j] / d), |v| <= 32512, and d (0 or NaN,
// and v all 0, where block_amax finds nothing to scale by). Shared by decode's two-byte layout
// and prefill's int16 groups (gemm_i16.h), so a bf16 model's prefill and decode agree.
inline void quantize_block(const float* b, int32_t v[32], float& d) {
  constexpr float top = 127.f * 256.f;
  float amax;
  if (!block_amax(b, amax, d)) {
    std::fill(v, v + 32, 0);
    return;
  }
  const float inv = top / amax;
  for (int j = 0; j < 32; ++j) v[j] = (int32_t)std::clamp(std::nearbyint(b[j] * inv), -top, top);
  d = amax / top;
}

inline void to_i16_bytes(const float* x, int64_t K, int8_t* q, float* scale, int32_t* sum12) {
  for (int64_t g = 0; g < K / 32; ++g) {
    int32_t v[32], sum = 0;
    quantize_block(x + g * 32, v, scale[g]);
    int8_t* out = q + g * 64;
    for (int j = 0; j < 32; ++j) {
      const int32_t lo = (int8_t)(v[j] & 0xFF);       // lo in [-128, 127], hi in [-127, 127]
      const int at = j % 2 * 16 + j / 2;              // pair-split
      out[at] = (int8_t)((v[j] - lo) / 256), out[32 + at] = (int8_t)lo;
      sum += v[j];
    }
    sum12[g] = 12 * sum;
  }
}

// One block's 16 code bytes -> 32 unsigned bytes 2 * E2M1 + 12, pair-split.
inline __m256i offset_codes(const uint8_t* b) {
  const __m256i lut = _mm256_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0,
                                       12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0);
  // the 16 bytes in both halves (the broadcast is a load), the high half shifted down a nibble
  const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)b));
  const __m256i both = _mm256_srlv_epi32(bytes, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
  return _mm256_shuffle_epi8(lut, _mm256_and_si256(both, _mm256_set1_epi8(0x0F)));
}

// A block's offset codes dotted with its 32 inputs (64 bytes), as 8 int32 partial sums.
inline __m256i bytes_block_dot(__m256i codes, const int8_t* q) {
  const __m256i hi = _mm256_maddubs_epi16(codes, _mm256_loadu_si256((const __m256i*)q));
  const __m256i lo = _mm256_maddubs_epi16(codes, _mm256_loadu_si256((const __m256i*)(q + 32)));
  return _mm256_add_epi32(_mm256_madd_epi16(hi, _mm256_set1_epi16(256)), _mm256_madd_epi16(lo, _mm256_set1_epi16(1)));
}

// 8 registers of 8 int32 -> one register of their 8 sums, in order.
inline __m256i sum8(const __m256i p[8]) {
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
  const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

inline int32_t sum1(__m256i p) {
  const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
  const __m128i s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
  return _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1)));
}

inline float reduce8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// rows_matmul for two-byte x (rows of 2 K bytes, K / 32 scales and sums a row).
template <int M>
void rows_matmul_i16_bytes(const uint8_t* blocks, const uint8_t* scales, int64_t G, const int8_t* q,
                           const float* qscale, const int32_t* qsum12, float* y, int64_t ldy, const float* bias,
                           int64_t r0, int64_t r1) {
  const int64_t K = G * 32;
  const float* half = scale_table().half;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* rb = blocks + r * G * 16;
    const uint8_t* rs = scales + r * G;
    __m256 acc[M];
    float tail[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps(), tail[m] = 0.f;
    int64_t g = 0;
    for (; g + 8 <= G; g += 8) {
      __m256i codes[8], p[8];
      const __m256 ws = _mm256_i32gather_ps(half, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(rs + g))), 4);
      if constexpr (M == 1) {
        // one token: each block's codes meet the input as they are made and the sums are added
        // pairwise as they come (8 blocks' codes and sums at once need more registers than
        // AVX2 has: spills). With the codes' one shift (offset_codes), a core's products went
        // from 14.8 to 17.0 GB/s (weights in L2, Zen 5 at avx2).
        __m256i h[4];
        for (int j = 0; j < 8; j += 2)
          h[j / 2] = _mm256_hadd_epi32(bytes_block_dot(offset_codes(rb + (g + j) * 16), q + 2 * (g + j) * 32),
                                       bytes_block_dot(offset_codes(rb + (g + j + 1) * 16), q + 2 * (g + j + 1) * 32));
        const __m256i a = _mm256_hadd_epi32(h[0], h[1]), b = _mm256_hadd_epi32(h[2], h[3]);
        const __m256i s8 = _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
        const __m256i dot = _mm256_sub_epi32(s8, _mm256_loadu_si256((const __m256i*)(qsum12 + g)));
        acc[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(ws, _mm256_loadu_ps(qscale + g)), acc[0]);
        continue;
      }
      for (int j = 0; j < 8; ++j) codes[j] = offset_codes(rb + (g + j) * 16);
      for (int m = 0; m < M; ++m) {
        for (int j = 0; j < 8; ++j) p[j] = bytes_block_dot(codes[j], q + 2 * (m * K + (g + j) * 32));
        const __m256i dot = _mm256_sub_epi32(sum8(p), _mm256_loadu_si256((const __m256i*)(qsum12 + m * G + g)));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(ws, _mm256_loadu_ps(qscale + m * G + g)), acc[m]);
      }
    }
    for (; g < G; ++g) {
      const __m256i codes = offset_codes(rb + g * 16);
      for (int m = 0; m < M; ++m) {
        const int32_t dot = sum1(bytes_block_dot(codes, q + 2 * (m * K + g * 32))) - qsum12[m * G + g];
        tail[m] += (float)dot * (half[rs[g]] * qscale[m * G + g]);
      }
    }
    for (int m = 0; m < M; ++m) y[m * ldy + r] = reduce8(acc[m]) + tail[m] + bias[r];
  }
}

inline void tile_matmul_i16_bytes(int M, const uint8_t* blocks, const uint8_t* scales, int64_t G, const int8_t* q,
                                  const float* qscale, const int32_t* qsum12, float* y, int64_t ldy,
                                  const float* bias, int64_t r0, int64_t r1) {
  with_tokens(M, [&](auto m) {
    rows_matmul_i16_bytes<decltype(m)::value>(blocks, scales, G, q, qscale, qsum12, y, ldy, bias, r0, r1);
  });
}

}  // namespace ossgpt::mxfp4
#endif
