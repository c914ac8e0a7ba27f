// The experts' decode products for bf16 models on the x86 levels without bf16 products (avx2,
// avx512): 9-bit integer activations as bytes (mxfp4.h holds the layout, the float32 and the other
// levels' products). quantize_block is also prefill's (gemm_i16.h), so the two agree.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "mxfp4.h"

#if defined(OSSGPT_AVX2) || defined(OSSGPT_AVX512)
namespace ossgpt::mxfp4 {

// -- 9-bit integer inputs ---------------------------------------------------------------------------
//
// Each block of 32 inputs as the integers v = round(x / d), d = max |x| / 255: an error of at most
// d / 2, a 2**-9 fraction of the block's largest (bf16 itself rounds each element to 2**-9 of its
// own size). Decode holds them as |v| (unsigned bytes) and the sign of v (+1, -1 or 0), pair-split,
// 64 bytes a block; prefill as int16 in gemm_i16.h's groups. Both round the same way (this
// function), so a prompt's experts give what its tokens one at a time give.
//
// Why 9 bits: vpmaddubsw multiplies unsigned by signed bytes, so with the inputs' signs moved onto
// the codes (vpsignb) one vpmaddubsw makes a block's 32 products, where 16-bit inputs as two bytes
// took two, and their widening two more: 4 multiplies a block became 2, and the multiplies bound
// the experts' decode (Zen 1 issues one 256-bit multiply every other cycle; there one MoE layer's
// decode took about 15 ms on a thread where it took 24). llama.cpp's AVX2 products move signs the
// same way with 8-bit inputs (|v| <= 127, twice this error); benchmarks/isa_logits.py and
// expert_input_precision.py measure what each costs a model's logits.

// One block of 32 inputs -> v[j] and d (0 or NaN, and v all 0, where block_amax finds nothing to
// scale by).
inline void quantize_block(const float* b, int32_t v[32], float& d) {
  float amax;
  if (!block_amax(b, amax, d)) {
    std::fill(v, v + 32, 0);
    return;
  }
  d = amax / 255.f;
  // x / d rounds to at most 255 in magnitude; the clamp is for the one that might round past it
  for (int j = 0; j < 32; ++j) v[j] = (int32_t)std::clamp(std::nearbyint(b[j] / d), -255.f, 255.f);
}

// x (K floats) -> per block, |v| then the signs (64 bytes, pair-split), and its d.
inline void to_i9_bytes(const float* x, int64_t K, uint8_t* q, float* scale) {
  for (int64_t g = 0; g < K / 32; ++g) {
    int32_t v[32];
    quantize_block(x + g * 32, v, scale[g]);
    uint8_t* out = q + g * 64;
    for (int j = 0; j < 32; ++j) {
      const int at = j % 2 * 16 + j / 2;
      out[at] = (uint8_t)std::abs(v[j]);
      out[32 + at] = (uint8_t)(v[j] > 0 ? 1 : v[j] < 0 ? 0xFF : 0);
    }
  }
}

// One block's 16 code bytes -> 32 signed bytes 2 * E2M1, pair-split.
inline __m256i signed_codes(const uint8_t* b) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12,
                                       0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
  // the 16 bytes in both halves (the broadcast is a load), the high half shifted down a nibble
  const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)b));
  const __m256i both = _mm256_srlv_epi32(bytes, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
  return _mm256_shuffle_epi8(lut, _mm256_and_si256(both, _mm256_set1_epi8(0x0F)));
}

// A block's codes dotted with its 32 inputs (64 bytes), as 8 int32 partial sums; exact (a byte
// pair's sum is at most 2 * 12 * 255).
inline __m256i i9_block_dot(__m256i codes, const uint8_t* q) {
  const __m256i signed_codes = _mm256_sign_epi8(codes, _mm256_loadu_si256((const __m256i*)(q + 32)));
  const __m256i pairs = _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i*)q), signed_codes);
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

// 2**(s - 128) (the half scales: codes are twice E2M1) of 8 E8M0 bytes. The float whose exponent
// field is s - 1, for s in [2, 254]; the table (subnormals, NaN) otherwise. Why not a gather:
// Zen 1's vgatherdps is microcoded, about as long as 8 blocks' products.
inline __m256 half_scales8(const uint8_t* s) {
  const __m256i e = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)s));
  const __m256i special = _mm256_or_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(2), e),
                                          _mm256_cmpeq_epi32(e, _mm256_set1_epi32(255)));
  if (!_mm256_testz_si256(special, special)) return _mm256_i32gather_ps(scale_table().half, e, 4);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(1)), 23));
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

// rows_matmul for 9-bit x (rows of 2 K bytes, K / 32 scales a row).
template <int M>
void rows_matmul_i9_bytes(const uint8_t* blocks, const uint8_t* scales, int64_t G, const uint8_t* q,
                          const float* qscale, float* y, int64_t ldy, const float* bias, int64_t r0, int64_t r1) {
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
      const __m256 ws = half_scales8(rs + g);
      if constexpr (M == 1) {
        // one token: each block's codes meet the input as they are made and the sums are added
        // pairwise as they come (8 blocks' codes and sums at once need more registers than
        // AVX2 has: spills)
        __m256i h[4];
        for (int j = 0; j < 8; j += 2)
          h[j / 2] = _mm256_hadd_epi32(i9_block_dot(signed_codes(rb + (g + j) * 16), q + 2 * (g + j) * 32),
                                       i9_block_dot(signed_codes(rb + (g + j + 1) * 16), q + 2 * (g + j + 1) * 32));
        const __m256i a = _mm256_hadd_epi32(h[0], h[1]), b = _mm256_hadd_epi32(h[2], h[3]);
        const __m256i dot = _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
        acc[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(ws, _mm256_loadu_ps(qscale + g)), acc[0]);
        continue;
      }
      __m256i codes[8], p[8];
      for (int j = 0; j < 8; ++j) codes[j] = signed_codes(rb + (g + j) * 16);
      for (int m = 0; m < M; ++m) {
        for (int j = 0; j < 8; ++j) p[j] = i9_block_dot(codes[j], q + 2 * (m * K + (g + j) * 32));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum8(p)), _mm256_mul_ps(ws, _mm256_loadu_ps(qscale + m * G + g)),
                                 acc[m]);
      }
    }
    for (; g < G; ++g) {
      const __m256i codes = signed_codes(rb + g * 16);
      for (int m = 0; m < M; ++m)
        tail[m] += (float)sum1(i9_block_dot(codes, q + 2 * (m * K + g * 32))) * (half[rs[g]] * qscale[m * G + g]);
    }
    for (int m = 0; m < M; ++m) y[m * ldy + r] = reduce8(acc[m]) + tail[m] + bias[r];
  }
}

inline void tile_matmul_i9_bytes(int M, const uint8_t* blocks, const uint8_t* scales, int64_t G, const uint8_t* q,
                                 const float* qscale, float* y, int64_t ldy, const float* bias, int64_t r0,
                                 int64_t r1) {
  with_tokens(M, [&](auto m) {
    rows_matmul_i9_bytes<decltype(m)::value>(blocks, scales, G, q, qscale, y, ldy, bias, r0, r1);
  });
}

}  // namespace ossgpt::mxfp4
#endif
