// The register-tiled product the kernels share: y[m, r] = sum_k W[r, k] x[m, k] (+ bias) for a
// few rows of W and a few tokens, where each weight row meets many tokens: the experts' prefill
// panels (moe.h) and batched decode's dense products (linear.h). Weights float32 or bf16
// (exact in float32), x float32, float32 sums; on the avx512bf16 level also bf16 x bf16 with
// vdpbf16ps (exact products, float32 sums).
#pragma once

#include <algorithm>
#include <cstdint>

#include "simd.h"

namespace ossgpt {

inline simd::F load_weights(const float* p) { return simd::load(p); }
inline simd::F load_weights(const uint16_t* p) { return simd::load_bf16(p); }

// R rows x M tokens of accumulators stay in registers (R * M + R + 1 <= simd::kRegisters); each
// step of W inputs loads R weight vectors and M input vectors for R * M multiply-adds. PF > 0
// prefetches the weight rows that many bytes ahead (weights streamed from memory, not cache).
template <int R, int M, int PF = 0, class T>
inline void gemm_tile(const T* w, int64_t ldw, const float* x, int64_t ldx, int64_t K, float* y,
                      int64_t ldy, const float* bias = nullptr) {
  static_assert(R * M + R + 1 <= simd::kRegisters, "the tile must fit the vector registers");
  simd::F acc[R][M];
  for (int i = 0; i < R; ++i)
    for (int m = 0; m < M; ++m) acc[i][m] = simd::zero();
  for (int64_t k = 0; k < K; k += simd::W) {
    simd::F wv[R];
    for (int i = 0; i < R; ++i) {
      if constexpr (PF > 0) __builtin_prefetch((const char*)(w + i * ldw + k) + PF);
      wv[i] = load_weights(w + i * ldw + k);
    }
    for (int m = 0; m < M; ++m) {
      const simd::F xv = simd::load(x + m * ldx + k);
      for (int i = 0; i < R; ++i) acc[i][m] = simd::fmadd(wv[i], xv, acc[i][m]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int m = 0; m < M; ++m) y[m * ldy + i] = simd::reduce(acc[i][m]) + (bias ? bias[i] : 0.f);
}

// The tile for R rows and `tokens` <= M tokens, chosen at run time.
template <int R, int M, int PF = 0, class T>
inline void gemm_tile_upto(int tokens, const T* w, int64_t ldw, const float* x, int64_t ldx, int64_t K,
                           float* y, int64_t ldy, const float* bias = nullptr) {
  if constexpr (M > 1)
    if (tokens < M) return gemm_tile_upto<R, M - 1, PF>(tokens, w, ldw, x, ldx, K, y, ldy, bias);
  gemm_tile<R, M, PF>(w, ldw, x, ldx, K, y, ldy, bias);
}

// y[m * ldy + r] = sum_k W[r * ldw + k] x[m * ldx + k] + bias[r], for `rows` rows and `tokens`
// tokens, K % 32 == 0. Tiles of kR rows x kM tokens, token tiles outermost (an input tile is
// reused across all the rows, which the caller keeps in cache).
template <int kR, int kM, class T>
inline void gemm(const T* w, int64_t ldw, int64_t rows, const float* x, int64_t ldx, int64_t tokens,
                 int64_t K, float* y, int64_t ldy, const float* bias) {
  for (int64_t t = 0; t < tokens; t += kM) {
    const int n = (int)std::min<int64_t>(kM, tokens - t);
    int64_t r = 0;
    for (; r + kR <= rows; r += kR)
      gemm_tile_upto<kR, kM>(n, w + r * ldw, ldw, x + t * ldx, ldx, K, y + t * ldy + r, ldy,
                             bias ? bias + r : nullptr);
    for (; r < rows; ++r)
      gemm_tile_upto<1, kM>(n, w + r * ldw, ldw, x + t * ldx, ldx, K, y + t * ldy + r, ldy,
                            bias ? bias + r : nullptr);
  }
}

// The panel GEMM's tile for this level's registers: 4 x 6 (29 of 32), 3 x 4 on AVX2 (16 of 16).
constexpr int kPanelRows = simd::kRegisters >= 32 ? 4 : 3;
constexpr int kPanelTokens = simd::kRegisters >= 32 ? 6 : 4;

#if defined(OSSGPT_BF16_DOT)
// The same tiles for bf16 x with vdpbf16ps: 32 pairs an instruction.
template <int R, int M, int PF = 0>
inline void gemm_tile_bf16(const uint16_t* w, int64_t ldw, const uint16_t* x, int64_t ldx, int64_t K,
                           float* y, int64_t ldy, const float* bias = nullptr) {
  __m512 acc[R][M];
  for (int i = 0; i < R; ++i)
    for (int m = 0; m < M; ++m) acc[i][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh wv[R];
    for (int i = 0; i < R; ++i) {
      if constexpr (PF > 0) _mm_prefetch((const char*)(w + i * ldw + k) + PF, _MM_HINT_T0);
      wv[i] = (__m512bh)_mm512_loadu_si512(w + i * ldw + k);
    }
    for (int m = 0; m < M; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * ldx + k);
      for (int i = 0; i < R; ++i) acc[i][m] = _mm512_dpbf16_ps(acc[i][m], wv[i], xv);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int m = 0; m < M; ++m)
      y[m * ldy + i] = _mm512_reduce_add_ps(acc[i][m]) + (bias ? bias[i] : 0.f);
}

template <int R, int M, int PF = 0>
inline void gemm_tile_upto_bf16(int tokens, const uint16_t* w, int64_t ldw, const uint16_t* x,
                                int64_t ldx, int64_t K, float* y, int64_t ldy,
                                const float* bias = nullptr) {
  if constexpr (M > 1)
    if (tokens < M) return gemm_tile_upto_bf16<R, M - 1, PF>(tokens, w, ldw, x, ldx, K, y, ldy, bias);
  gemm_tile_bf16<R, M, PF>(w, ldw, x, ldx, K, y, ldy, bias);
}

template <int kR, int kM>
inline void gemm_bf16(const uint16_t* w, int64_t ldw, int64_t rows, const uint16_t* x, int64_t ldx,
                      int64_t tokens, int64_t K, float* y, int64_t ldy, const float* bias) {
  for (int64_t t = 0; t < tokens; t += kM) {
    const int n = (int)std::min<int64_t>(kM, tokens - t);
    int64_t r = 0;
    for (; r + kR <= rows; r += kR)
      gemm_tile_upto_bf16<kR, kM>(n, w + r * ldw, ldw, x + t * ldx, ldx, K, y + t * ldy + r, ldy,
                                  bias ? bias + r : nullptr);
    for (; r < rows; ++r)
      gemm_tile_upto_bf16<1, kM>(n, w + r * ldw, ldw, x + t * ldx, ldx, K, y + t * ldy + r, ldy,
                                 bias ? bias + r : nullptr);
  }
}
#endif

}  // namespace ossgpt
