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

// Blocks go two at a time, so that one 256-bit register holds a pair's codes: its 32 code bytes
// (block g's 16, then block g + 1's) masked give both blocks' even elements, shifted their odd
// ones, where one block a register took a broadcast, a variable shift and a mask; the two blocks'
// 16-bit sums add before they widen (one vpmaddwd a pair, not one a block), and 8 blocks' sums
// reduce in 3 vphaddd (6 and two lane permutes before). One thread on Zen 1, weights in L2: 8.0
// cycles a block became 5.3; streaming from memory 8.7 became 5.6 (with the prefetch below).
// A row of inputs is laid out to match: per pair, 160 bytes
//   |v| of g's even elements, of g + 1's even, of g's odd, of g + 1's odd (16 bytes each),
//   then their signs in the same order (64 bytes),
//   then the signs as flips of the codes' sign bits, lined up with the 32 code bytes (bit 3 for
//   the even element of a byte, bit 7 for the odd one; below);
// a last odd block is a pair with a block of zeros. Scales: one a block, padded to whole pairs,
// and within each whole group of 8 blocks in the order the reduction yields their sums (lane i
// holds block 2 i, then lane 4 + i block 2 i + 1); in block order after the last whole group.

inline int64_t i9_pairs(int64_t G) { return (G + 1) / 2; }

constexpr int64_t kPairBytes = 160;

// where block g's scale is stored
inline int64_t i9_scale_slot(int64_t g, int64_t G) {
  const int64_t g0 = g / 8 * 8;
  return g0 + 8 <= G ? g0 + g % 8 / 2 + g % 2 * 4 : g;
}

// x (K floats) -> the pairs (i9_pairs(K / 32) * kPairBytes bytes) and the block scales.
inline void to_i9_bytes(const float* x, int64_t K, uint8_t* q, float* scale) {
  const int64_t G = K / 32;
  std::fill(q, q + i9_pairs(G) * kPairBytes, uint8_t(0));
  for (int64_t g = 0; g < G; ++g) {
    int32_t v[32];
    quantize_block(x + g * 32, v, scale[i9_scale_slot(g, G)]);
    uint8_t* out = q + g / 2 * kPairBytes + g % 2 * 16;
    for (int j = 0; j < 32; ++j) {
      const int at = j % 2 * 32 + j / 2;
      out[at] = (uint8_t)std::abs(v[j]);
      out[64 + at] = (uint8_t)(v[j] > 0 ? 1 : v[j] < 0 ? 0xFF : 0);
      if (v[j] < 0) out[128 + j / 2] |= j % 2 ? 0x80 : 0x08;
    }
  }
  if (G % 2) scale[G] = 0.f;
}

// A pair's 32 code bytes -> its codes as signed bytes 2 * E2M1: even = the even elements of
// both blocks (g's in the low 128 bits), odd = their odd ones. A lone last block: the high
// half zero.
inline void pair_codes(__m256i bytes, __m256i& even, __m256i& odd) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12,
                                       0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  even = _mm256_shuffle_epi8(lut, _mm256_and_si256(bytes, low4));
  odd = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4));
}

inline void pair_codes(const uint8_t* b, bool lone, __m256i& even, __m256i& odd) {
  pair_codes(lone ? _mm256_set_m128i(_mm_setzero_si128(), _mm_loadu_si128((const __m128i*)b))
                  : _mm256_loadu_si256((const __m256i*)b), even, odd);
}

// The codes already signed as the inputs' are dotted with the inputs' magnitudes (a pair's first
// 64 bytes): 8 int32, the low 4 summing to block g's dot, the high 4 to block g + 1's; exact (each
// 16-bit sum is of 4 products, at most 4 * 12 * 255).
inline __m256i i9_magnitude_dot(__m256i even, __m256i odd, const uint8_t* q) {
  const __m256i e = _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i*)q), even);
  const __m256i o = _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i*)(q + 32)), odd);
  return _mm256_madd_epi16(_mm256_add_epi16(e, o), _mm256_set1_epi16(1));
}

// A pair's codes dotted with its input: the inputs' signs moved onto the codes (vpsignb), for
// codes decoded once and met by several tokens.
inline __m256i i9_pair_dot(__m256i even, __m256i odd, const uint8_t* q) {
  return i9_magnitude_dot(_mm256_sign_epi8(even, _mm256_loadu_si256((const __m256i*)(q + 64))),
                          _mm256_sign_epi8(odd, _mm256_loadu_si256((const __m256i*)(q + 96))), q);
}

// The same for one token: its signs flip the codes' sign bits before the lookup (code bits ^ the
// pair's last 32 bytes), one vpxor where two vpsignb were (Zen 1, one thread: 6.8 cycles a block
// of 32 weights became 6.5 streaming from memory). A zero input's code keeps its sign; its
// magnitude is 0.
inline __m256i i9_pair_dot_flipped(const uint8_t* codes, const uint8_t* q) {
  __m256i even, odd;
  pair_codes(_mm256_xor_si256(_mm256_loadu_si256((const __m256i*)codes),
                              _mm256_loadu_si256((const __m256i*)(q + 128))), even, odd);
  return i9_magnitude_dot(even, odd, q);
}

// 4 pairs' dots (8 blocks) -> one register of the 8 blocks' sums, in the scales' group order.
inline __m256i group_sums(const __m256i p[4]) {
  return _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
}

// 2**(s - 128) (the half scales: codes are twice E2M1) of 8 E8M0 bytes, in the group order. The float
// whose exponent field is s - 1, for s in [2, 254]; the table (subnormals, NaN) otherwise. Why
// not always a gather: Zen 1's vgatherdps is microcoded, about as long as 8 blocks' products.
// Normal: the caller knows all 8 are in [2, 254] (normal_scales), and the check is left out.
template <bool Normal>
inline __m256 half_scales8(const uint8_t* s) {
  const __m128i order = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i e = _mm256_cvtepu8_epi32(_mm_shuffle_epi8(_mm_loadl_epi64((const __m128i*)s), order));
  if constexpr (!Normal) {
    const __m256i special = _mm256_or_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(2), e),
                                            _mm256_cmpeq_epi32(e, _mm256_set1_epi32(255)));
    if (!_mm256_testz_si256(special, special)) return _mm256_i32gather_ps(scale_table().half, e, 4);
  }
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(1)), 23));
}

// Whether all n >= 32 scale bytes are in [2, 254], the ones half_scales8 computes: checking a
// row once took the check out of every group of 8 blocks (Zen 1, one thread: 6.8 cycles a block
// became 6.2, weights streaming from memory).
inline bool normal_scales(const uint8_t* s, int64_t n) {
  // s - 2 wraps 0, 1 and 255 to 254, 255 and 253, and the rest to 0 .. 252
  const __m256i two = _mm256_set1_epi8(2), top = _mm256_set1_epi8((char)252);
  __m256i most = _mm256_setzero_si256();
  for (int64_t g = 0; g < n; g += 32) {
    const uint8_t* at = s + std::min(g, n - 32);   // the last 32 overlap the ones before
    most = _mm256_max_epu8(most, _mm256_sub_epi8(_mm256_loadu_si256((const __m256i*)at), two));
  }
  return _mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_max_epu8(most, top), top)) == -1;
}

inline float reduce8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// rows_matmul for 9-bit x (rows of i9_pairs(G) * kPairBytes bytes and 2 i9_pairs(G) scales).
template <int M>
void rows_matmul_i9_bytes(const uint8_t* blocks, const uint8_t* scales, int64_t G, const uint8_t* q,
                          const float* qscale, float* y, int64_t ldy, const float* bias, int64_t r0, int64_t r1) {
  const int64_t row_bytes = i9_pairs(G) * kPairBytes, row_scales = 2 * i9_pairs(G);
  const float* half = scale_table().half;
  auto row = [&](auto normal, const uint8_t* rb, const uint8_t* rs, __m256 acc[M]) {
    int64_t g = 0;
    for (; g + 8 <= G; g += 8) {
      // the hardware prefetcher alone left a thread streaming from memory ~20% slower than from
      // L2 (Zen 1: 6.5 against 5.3 cycles a block); 1 KiB ahead closes most of that
      _mm_prefetch((const char*)(rb + g * 16 + 1024), _MM_HINT_T0);
      _mm_prefetch((const char*)(rb + g * 16 + 1088), _MM_HINT_T0);
      const __m256 ws = half_scales8<decltype(normal)::value>(rs + g);
      __m256i even[4], odd[4], p[4];
      for (int j = 0; j < 4; ++j) {
        if constexpr (M == 1) p[j] = i9_pair_dot_flipped(rb + (g + 2 * j) * 16, q + (g / 2 + j) * kPairBytes);
        else pair_codes(rb + (g + 2 * j) * 16, false, even[j], odd[j]);
      }
      for (int m = 0; m < M; ++m) {
        if constexpr (M > 1)
          for (int j = 0; j < 4; ++j)
            p[j] = i9_pair_dot(even[j], odd[j], q + m * row_bytes + (g / 2 + j) * kPairBytes);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(group_sums(p)),
                                 _mm256_mul_ps(ws, _mm256_loadu_ps(qscale + m * row_scales + g)), acc[m]);
      }
    }
    for (; g < G; g += 2) {   // the pairs after the last whole group, in block order
      const bool lone = g + 1 == G;
      __m256i even, odd;
      pair_codes(rb + g * 16, lone, even, odd);
      const float w0 = half[rs[g]], w1 = lone ? 0.f : half[rs[g + 1]];
      for (int m = 0; m < M; ++m) {
        const float* qs = qscale + m * row_scales + g;
        const __m256 sc = _mm256_setr_m128(_mm_set1_ps(w0 * qs[0]), _mm_set1_ps(w1 * qs[1]));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i9_pair_dot(even, odd, q + m * row_bytes + g / 2 * kPairBytes)),
                                 sc, acc[m]);
      }
    }
  };
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* rs = scales + r * G;
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    if (G >= 32 && normal_scales(rs, G)) row(std::true_type{}, blocks + r * G * 16, rs, acc);
    else row(std::false_type{}, blocks + r * G * 16, rs, acc);
    for (int m = 0; m < M; ++m) y[m * ldy + r] = reduce8(acc[m]) + bias[r];
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
