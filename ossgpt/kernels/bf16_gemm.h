// The bf16 register-tiled product both kernel files share: y[m, r] = sum_k W[r, k] x[m, k] (+ bias)
// for a few rows of W and a few tokens, with vdpbf16ps (exact products, float32 sums).
// Used where each weight row meets many tokens: the experts' prefill panels (mxfp4_cpu.cpp) and
// batched decode's bf16 products (linear_cpu.cpp).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace ossgpt {

// R rows x M tokens of accumulators stay in registers (R * M + R + 1 <= 32); each step of 32
// inputs loads R weight vectors and M input vectors for R * M vdpbf16ps. PF > 0 prefetches the
// weight rows that many bytes ahead (for weights streamed from memory rather than cache).
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

// The tile for R rows and `tokens` <= M tokens, chosen at run time.
template <int R, int M, int PF = 0>
inline void gemm_tile_upto_bf16(int tokens, const uint16_t* w, int64_t ldw, const uint16_t* x,
                                int64_t ldx, int64_t K, float* y, int64_t ldy,
                                const float* bias = nullptr) {
  if constexpr (M > 1)
    if (tokens < M) return gemm_tile_upto_bf16<R, M - 1, PF>(tokens, w, ldw, x, ldx, K, y, ldy, bias);
  gemm_tile_bf16<R, M, PF>(w, ldw, x, ldx, K, y, ldy, bias);
}

// y[m * ldy + r] = sum_k W[r * ldw + k] x[m * ldx + k] + bias[r], for `rows` rows and `tokens`
// tokens, K % 32 == 0. Tiles of kR rows x kM tokens, token tiles outermost (an input tile is
// reused across all the rows, which the caller keeps in cache).
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

}  // namespace ossgpt
