// Prefill's expert products for bf16 models on the x86 levels without bf16 products (avx2,
// avx512): integer products in a register-tiled GEMM.
//
// Why: with many tokens per expert the float32 panels (moe.h, gemm.h) run at the float32 FMA
// peak (an AVX2 fma: 8 products), and prefill is bound by it. Here the weights are decoded once
// per panel into int16 (each code as the integer 2 * E2M1, in [-12, 12]) and the activations are
// decode's 9-bit integers as int16 (mxfp4::quantize_block: a scale a block of 32, rounded to at
// most 2**-9 of the block's largest), so prefill and decode agree. vpmaddwd makes 16 products an
// instruction and their integer sums are exact; only the blocks' sums are scaled, in float32.
//
// Layout ("groups"): blocks go in groups of 8, one 32-bit lane each. Vector v (0..15) of a group
// holds, in lane j, the pair of elements (2v, 2v + 1) of block j. Then a vpmaddwd of a weight
// vector and an input vector adds one pair's two products of each of 8 blocks, each in its own
// lane: after a group's 16 vectors every lane holds its block's whole dot product, with no
// horizontal sums, and the 8 blocks' sums are scaled by one vector of 8 (weight scale x input
// scale) and added to a float32 accumulator. A row of G blocks is padded with zero blocks (and
// zero scales) to whole groups.
#pragma once

#include <algorithm>
#include <cstdint>

#include "mxfp4_bytes.h"
#include "simd.h"

#if defined(OSSGPT_AVX2) || defined(OSSGPT_AVX512)
namespace ossgpt::gemm_i16 {

constexpr int kGroup = 8;                   // blocks a group
constexpr int kGroupValues = kGroup * 32;   // int16 values a group

inline int64_t groups(int64_t G) { return (G + kGroup - 1) / kGroup; }

// x (K floats) -> groups(K / 32) groups of int16 and each block's scale d (0 for the padding).
inline void to_groups(const float* x, int64_t K, int16_t* q, float* scale) {
  const int64_t G = K / 32, n = groups(G);
  std::fill(q + G / kGroup * kGroupValues, q + n * kGroupValues, int16_t(0));
  std::fill(scale + G, scale + n * kGroup, 0.f);
  for (int64_t g = 0; g < G; ++g) {
    int32_t v[32];
    mxfp4::quantize_block(x + g * 32, v, scale[g]);
    int16_t* group = q + g / kGroup * kGroupValues + 2 * (g % kGroup);
    for (int p = 0; p < 16; ++p) group[16 * p] = (int16_t)v[2 * p], group[16 * p + 1] = (int16_t)v[2 * p + 1];
  }
}

// 8 rows of 8 int32 -> their transpose, in place.
inline void transpose8(__m256i r[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4)
    for (int h = 0; h < 2; ++h) {
      u[i + h] = _mm256_unpacklo_epi64(t[i + h], t[i + 2 + h]);
      u[i + 2 + h] = _mm256_unpackhi_epi64(t[i + h], t[i + 2 + h]);
    }
  // u[0..3] hold rows 0-3 of columns 0|4, 2|6, 1|5, 3|7 (128-bit halves), u[4..7] rows 4-7
  const int order[4] = {0, 2, 1, 3};
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2x128_si256(u[order[i]], u[4 + order[i]], 0x20);
    r[4 + i] = _mm256_permute2x128_si256(u[order[i]], u[4 + order[i]], 0x31);
  }
}

// A weight row's G blocks (16 code bytes each) and E8M0 scales -> its groups of int16 codes
// (2 * E2M1) and each block's scale 2**(s - 128) (the half: codes are twice E2M1), 0 for padding.
inline void decode_row(const uint8_t* b, const uint8_t* s, int64_t G, int16_t* out, float* scale) {
  const float* half = mxfp4::scale_table().half;
  const __m128i lut = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (int64_t n = 0; n < groups(G); ++n) {
    __m256i lo[8], hi[8];   // block j's pairs 0-7 and 8-15, a pair per 32-bit lane
    for (int j = 0; j < kGroup; ++j) {
      const int64_t g = n * kGroup + j;
      if (g >= G) {
        lo[j] = hi[j] = _mm256_setzero_si256();
        scale[g] = 0.f;
        continue;
      }
      const __m128i bytes = _mm_loadu_si128((const __m128i*)(b + g * 16));
      const __m128i even = _mm_shuffle_epi8(lut, _mm_and_si128(bytes, low4));
      const __m128i odd = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(bytes, 4), low4));
      lo[j] = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(even, odd));   // element order
      hi[j] = _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(even, odd));
      scale[g] = half[s[g]];
    }
    transpose8(lo);
    transpose8(hi);
    __m256i* group = (__m256i*)(out + n * kGroupValues);
    for (int v = 0; v < 8; ++v) _mm256_storeu_si256(group + v, lo[v]), _mm256_storeu_si256(group + 8 + v, hi[v]);
  }
}

// y[m * ldy + i] = sum over the groups of rows w[i] (ldw int16 apart, scales lds apart) and
// tokens x[m] (ldx apart, scales ldxs apart) + bias[i], for R rows and M tokens. The R x M int32
// accumulators stay in registers for a group's 16 steps (R * M + R + 2 <= the vector registers:
// accumulators, weights, an input and a product); the float32 sums, touched once a group, are
// left to the compiler (in memory where registers run out).
template <int R, int M>
inline void tile(const int16_t* w, int64_t ldw, const float* ws, int64_t lds, const int16_t* x, int64_t ldx,
                 const float* xs, int64_t ldxs, int64_t n_groups, float* y, int64_t ldy, const float* bias) {
  __m256 sums[R][M];
  for (int i = 0; i < R; ++i)
    for (int m = 0; m < M; ++m) sums[i][m] = _mm256_setzero_ps();
  for (int64_t n = 0; n < n_groups; ++n) {
    __m256i acc[R][M];
    for (int i = 0; i < R; ++i)
      for (int m = 0; m < M; ++m) acc[i][m] = _mm256_setzero_si256();
    for (int v = 0; v < 16; ++v) {
      __m256i wv[R];
      for (int i = 0; i < R; ++i) wv[i] = _mm256_loadu_si256((const __m256i*)(w + i * ldw + n * kGroupValues) + v);
      for (int m = 0; m < M; ++m) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(x + m * ldx + n * kGroupValues) + v);
        for (int i = 0; i < R; ++i) {
          const __m256i p = _mm256_madd_epi16(wv[i], xv);
          // acc += p, written out: with _mm256_add_epi32 GCC 12 makes p the sum's register and
          // copies it back into acc (or, written so it cannot, spills accumulators): 58 GMAC/s
          // a core where this runs at 86 (a 3 x 3 tile, float32 panels: 60)
          __asm__("vpaddd %1, %0, %0" : "+v"(acc[i][m]) : "v"(p));
        }
      }
    }
    for (int i = 0; i < R; ++i) {
      const __m256 wsv = _mm256_loadu_ps(ws + i * lds + n * kGroup);
      for (int m = 0; m < M; ++m)
        sums[i][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i][m]),
                                     _mm256_mul_ps(wsv, _mm256_loadu_ps(xs + m * ldxs + n * kGroup)), sums[i][m]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int m = 0; m < M; ++m) y[m * ldy + i] = mxfp4::reduce8(sums[i][m]) + bias[i];
}

template <int R, int M>
inline void tile_upto(int tokens, const int16_t* w, int64_t ldw, const float* ws, int64_t lds, const int16_t* x,
                      int64_t ldx, const float* xs, int64_t ldxs, int64_t n_groups, float* y, int64_t ldy,
                      const float* bias) {
  if constexpr (M > 1)
    if (tokens < M) return tile_upto<R, M - 1>(tokens, w, ldw, ws, lds, x, ldx, xs, ldxs, n_groups, y, ldy, bias);
  tile<R, M>(w, ldw, ws, lds, x, ldx, xs, ldxs, n_groups, y, ldy, bias);
}

// Tiles of kRows x kTokens: 3 x 3 on AVX2 (14 of 16 registers; measured on Zen 5 at avx2, a
// core: 3 x 3 86 GMAC/s, 4 x 2 58, 2 x 6 35), 4 x 4 with AVX-512's 32 (99, float32 panels 88).
constexpr int kRows = simd::kRegisters >= 32 ? 4 : 3;
constexpr int kTokens = simd::kRegisters >= 32 ? 4 : 3;

// y[m * ldy + r] = W[r] . x[m] + bias[r] for `rows` decoded rows (ldw int16 and lds scales
// apart) and `tokens` token rows (ldx int16 and ldxs scales apart), both in groups. Token tiles
// outermost: a tile of inputs is reused across all the rows, which the caller keeps in cache.
inline void gemm(const int16_t* w, int64_t ldw, const float* ws, int64_t lds, int64_t rows, const int16_t* x,
                 int64_t ldx, const float* xs, int64_t ldxs, int64_t tokens, int64_t n_groups, float* y, int64_t ldy,
                 const float* bias) {
  for (int64_t t = 0; t < tokens; t += kTokens) {
    const int n = (int)std::min<int64_t>(kTokens, tokens - t);
    const int16_t* xt = x + t * ldx;
    const float* xst = xs + t * ldxs;
    int64_t r = 0;
    for (; r + kRows <= rows; r += kRows)
      tile_upto<kRows, kTokens>(n, w + r * ldw, ldw, ws + r * lds, lds, xt, ldx, xst, ldxs, n_groups,
                                y + t * ldy + r, ldy, bias + r);
    for (; r < rows; ++r)
      tile_upto<1, kTokens>(n, w + r * ldw, ldw, ws + r * lds, lds, xt, ldx, xst, ldxs, n_groups,
                            y + t * ldy + r, ldy, bias + r);
  }
}

}  // namespace ossgpt::gemm_i16
#endif
