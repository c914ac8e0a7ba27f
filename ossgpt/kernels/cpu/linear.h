// bf16 matrix products for decode on the CPU: x (a few rows) @ W.T with W read once, at memory
// speed, W dense or in the 12-bit packed form (packed_bf16.h). oneDNN's bf16 matmul reads a
// one-row product's weights at about half the memory bandwidth; the unembedding (V x C) needs
// all of it. The plain version is F.linear, which tests/test_kernels.py and
// tests/test_packed_bf16.py compare against. Products are exact (bf16 x bf16 fits float32),
// sums float32, each output rounded once to bf16 after its bias is added (as F.linear).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "gemm.h"
#include "packed_bf16.h"
#include "parallel.h"
#include "simd.h"

namespace ossgpt::linear {

using packed::PackedBF16;

// The product's value plus the bias, rounded once to bf16.
inline uint16_t finish(float sum, const uint16_t* bias, int64_t r) {
  return float_to_bf16(bias ? sum + bf16_to_float(bias[r]) : sum);
}

// x as the products read it: bf16 as given; on levels without bf16 products also float32, in
// element order (dense weights) and in packed::order within each 64 (packed weights).
struct Inputs {
  const uint16_t* bf16;
  int64_t N, K;
  Buffer<float> plain, permuted;

  Inputs(const uint16_t* x, int64_t N_, int64_t K_, bool dense, bool packed)
      : bf16(x), N(N_), K(K_), plain(dense ? N_ * K_ : 0), permuted(packed ? N_ * K_ : 0) {
#if !defined(OSSGPT_BF16_DOT)
    if (dense)
      for (int64_t i = 0; i < N * K; i += simd::W) simd::store(plain.get() + i, simd::load_bf16(x + i));
    if (packed) {
      int order[64];
      for (int p = 0; p < 64; ++p) order[p] = packed::order(p);
      for (int64_t i = 0; i < N * K; i += 64)
        for (int p = 0; p < 64; ++p) permuted.get()[i + p] = bf16_to_float(x[i + order[p]]);
    }
#endif
  }
};

// Row ranges of at least 64 KiB of weights: enough work per task to keep the threads fed.
inline int64_t row_grain(int64_t K) { return std::max<int64_t>(4, (64 << 10) / (K * 2)); }

#if defined(OSSGPT_BF16_DOT)
// -- the avx512bf16 level: bf16 inputs straight into vdpbf16ps -----------------------------------

// out[m, r] = sum_k W[r, k] x[m, k] (+ bias[r]) for rows [r0, r1).
template <int M>
void dense_rows(const uint16_t* w, const Inputs& in, const uint16_t* bias, uint16_t* out, int64_t ldo,
                int64_t r0, int64_t r1) {
  // One row at a time: the weights stream through memory in order (interleaving rows splits
  // that into several streams, which the hardware prefetcher follows less well). U independent
  // accumulators per token cover vdpbf16ps's latency when there are few tokens.
  constexpr int U = M == 1 ? 4 : 2;
  const int64_t K = in.K;
  const uint16_t* x = in.bf16;
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* row = w + r * K;
    __m512 acc[U][M];
    for (int u = 0; u < U; ++u)
      for (int m = 0; m < M; ++m) acc[u][m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 * U <= K; k += 32 * U)
      for (int u = 0; u < U; ++u) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(row + k + 32 * u);
        for (int m = 0; m < M; ++m)
          acc[u][m] = _mm512_dpbf16_ps(acc[u][m], wv, (__m512bh)_mm512_loadu_si512(x + m * K + k + 32 * u));
      }
    for (; k < K; k += 32) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(row + k);
      for (int m = 0; m < M; ++m)
        acc[0][m] = _mm512_dpbf16_ps(acc[0][m], wv, (__m512bh)_mm512_loadu_si512(x + m * K + k));
    }
    for (int m = 0; m < M; ++m) {
      __m512 sum = acc[0][m];
      for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[u][m]);
      out[m * ldo + r] = finish(_mm512_reduce_add_ps(sum), bias, r);
    }
  }
}

// Decode rows of x beyond L1's room beside the weights: each input vector loaded then serves
// 3 weight rows (3 x 8 accumulators fill the registers), and the rows are prefetched 512 bytes
// ahead (measured: 23.5 against 20.5 GB/s without, 8 rows x 201088 x 2880).
inline void dense_tiles(int N, const uint16_t* w, const Inputs& in, float* y, int64_t ld, int64_t r0,
                        int64_t r1) {
  const int64_t K = in.K;
  int64_t r = r0;
  for (; r + 3 <= r1; r += 3) gemm_tile_upto_bf16<3, 8, 512>(N, w + r * K, K, in.bf16, K, K, y + r - r0, ld);
  for (; r < r1; ++r) gemm_tile_upto_bf16<1, 8, 512>(N, w + r * K, K, in.bf16, K, K, y + r - r0, ld);
}

// dense_rows for packed weights: each 64 elements decoded in registers (packed_bf16.h) serve the
// M tokens; U chunks a step give one token 4 independent accumulators.
template <int M>
void packed_rows(const PackedBF16& w, const Inputs& in, const uint16_t* bias, uint16_t* out, int64_t ldo,
                 int64_t r0, int64_t r1) {
  constexpr int U = M == 1 ? 2 : 1;
  const int64_t K = w.K;
  const uint16_t* x = in.bf16;
  for (int64_t r = r0; r < r1; ++r) {
    const __m512i table = packed::exponent_table(w.base[r]);
    __m512 acc[2 * U][M];
    for (int u = 0; u < 2 * U; ++u)
      for (int m = 0; m < M; ++m) acc[u][m] = _mm512_setzero_ps();
    for (int64_t c = 0; c < K; c += 64 * U)
      for (int u = 0; u < U && c + 64 * u < K; ++u) {
        const int64_t k = c + 64 * u;
        __m512i lo, hi;
        packed::decode64(w, r, k, table, lo, hi);
        for (int m = 0; m < M; ++m) {
          acc[2 * u][m] = _mm512_dpbf16_ps(acc[2 * u][m], (__m512bh)lo, (__m512bh)_mm512_loadu_si512(x + m * K + k));
          acc[2 * u + 1][m] = _mm512_dpbf16_ps(acc[2 * u + 1][m], (__m512bh)hi,
                                               (__m512bh)_mm512_loadu_si512(x + m * K + k + 32));
        }
      }
    for (int m = 0; m < M; ++m) {
      __m512 sum = acc[0][m];
      for (int u = 1; u < 2 * U; ++u) sum = _mm512_add_ps(sum, acc[u][m]);
      out[m * ldo + r] = finish(_mm512_reduce_add_ps(sum) + packed::listed_dot(w, r, x + m * K), bias, r);
    }
  }
}

// RT rows at a time: each input vector loaded serves RT decoded rows (x's 8 rows do not fit in
// L1 beside the weights). Rows go in blocks of kBlock while the next block is prefetched into L2
// (RowPrefetch). Measured against the 201088 x 2880 unembedding, interleaved runs:
//   8 tokens: 3 rows 50 ms, 2 rows 63, 1 row 76, the dense tile 52, before the prefetch; with
//             it, 30-38 ms against 49-60 (5 tokens: 28-33 against 43-50);
//   fewer tokens stay row by row (packed_rows): this tile took 3 and 4 tokens in 33 and 44 ms
//   against 28 and 30, and 1 token 9% faster or 10% slower by the run (24 layers end to end:
//   slower), where the unembedding and attention rows are read at near the bus's speed anyway.
template <int RT, int M>
void packed_tile(const PackedBF16& w, const Inputs& in, const uint16_t* bias, uint16_t* out, int64_t ldo,
                 int64_t r0, int64_t r1) {
  constexpr int64_t kBlock = 16 * RT;
  const int64_t K = w.K;
  const uint16_t* x = in.bf16;
  packed::RowPrefetch next(w, r0, 0, 0);
  int64_t r = r0;
  for (; r + RT <= r1; r += RT) {
    if ((r - r0) % kBlock == 0) {
      const int64_t start = std::min(r + kBlock, r1);
      next = packed::RowPrefetch(w, start, std::min(kBlock, r1 - start), kBlock / RT * (K / 64));
    }
    __m512i table[RT];
    __m512 acc[RT][M];
    for (int i = 0; i < RT; ++i) {
      table[i] = packed::exponent_table(w.base[r + i]);
      for (int m = 0; m < M; ++m) acc[i][m] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < K; k += 64) {
      next.step();
      __m512i lo[RT], hi[RT];
      for (int i = 0; i < RT; ++i) packed::decode64(w, r + i, k, table[i], lo[i], hi[i]);
      for (int m = 0; m < M; ++m) {
        const __m512bh xl = (__m512bh)_mm512_loadu_si512(x + m * K + k);
        for (int i = 0; i < RT; ++i) acc[i][m] = _mm512_dpbf16_ps(acc[i][m], (__m512bh)lo[i], xl);
        const __m512bh xh = (__m512bh)_mm512_loadu_si512(x + m * K + k + 32);
        for (int i = 0; i < RT; ++i) acc[i][m] = _mm512_dpbf16_ps(acc[i][m], (__m512bh)hi[i], xh);
      }
    }
    for (int i = 0; i < RT; ++i)
      for (int m = 0; m < M; ++m)
        out[m * ldo + r + i] = finish(_mm512_reduce_add_ps(acc[i][m]) + packed::listed_dot(w, r + i, x + m * K),
                                      bias, r + i);
  }
  if (r < r1) packed_rows<M>(w, in, bias, out, ldo, r, r1);
}

#else
// -- the other levels: float32 inputs, weights widened to float32 in registers (exact) ----------

template <int M>
void dense_rows(const uint16_t* w, const Inputs& in, const uint16_t* bias, uint16_t* out, int64_t ldo,
                int64_t r0, int64_t r1) {
  // One row at a time, as the weights stream from memory; U accumulators a token hide the
  // fma's latency when there are few tokens.
  constexpr int U = M == 1 ? 4 : 2;
  const int64_t K = in.K;
  const float* x = in.plain.get();
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* row = w + r * K;
    simd::F acc[U][M];
    for (int u = 0; u < U; ++u)
      for (int m = 0; m < M; ++m) acc[u][m] = simd::zero();
    int64_t k = 0;
    for (; k + simd::W * U <= K; k += simd::W * U)
      for (int u = 0; u < U; ++u) {
        const simd::F wv = simd::load_bf16(row + k + simd::W * u);
        for (int m = 0; m < M; ++m)
          acc[u][m] = simd::fmadd(wv, simd::load(x + m * K + k + simd::W * u), acc[u][m]);
      }
    for (; k < K; k += simd::W) {
      const simd::F wv = simd::load_bf16(row + k);
      for (int m = 0; m < M; ++m) acc[0][m] = simd::fmadd(wv, simd::load(x + m * K + k), acc[0][m]);
    }
    for (int m = 0; m < M; ++m) {
      simd::F sum = acc[0][m];
      for (int u = 1; u < U; ++u) sum = simd::add(sum, acc[u][m]);
      out[m * ldo + r] = finish(simd::reduce(sum), bias, r);
    }
  }
}

// 5 to 8 tokens: each weight vector widened once serves every token, as many rows at once as the
// registers hold, prefetched 512 bytes ahead.
inline void dense_tiles(int N, const uint16_t* w, const Inputs& in, float* y, int64_t ld, int64_t r0,
                        int64_t r1) {
  constexpr int R = (simd::kRegisters - 1) / 9;   // rows whose 8 tokens' accumulators fit
  const int64_t K = in.K;
  const float* x = in.plain.get();
  int64_t r = r0;
  for (; r + R <= r1; r += R) gemm_tile_upto<R, 8, 512>(N, w + r * K, K, x, K, K, y + r - r0, ld);
  for (; r < r1; ++r) gemm_tile_upto<1, 8, 512>(N, w + r * K, K, x, K, K, y + r - r0, ld);
}

// Packed weights, row by row: each chunk of 64 decoded in registers meets x laid out in the
// decoder's order (Inputs::permuted); the listed elements meet x as given.
template <int M>
void packed_rows(const PackedBF16& w, const Inputs& in, const uint16_t* bias, uint16_t* out, int64_t ldo,
                 int64_t r0, int64_t r1) {
  constexpr int V = 32 / simd::W;                  // vectors a half chunk
  constexpr int U = M == 1 ? 4 : M == 2 ? 2 : 1;   // accumulators a token
  const int64_t K = w.K;
  const float* x = in.permuted.get();
  for (int64_t r = r0; r < r1; ++r) {
    const packed::RowDecoder decoder(w.base[r]);
    simd::F acc[U][M];
    for (int u = 0; u < U; ++u)
      for (int m = 0; m < M; ++m) acc[u][m] = simd::zero();
    for (int64_t c = 0; c < K; c += 64) {
      // the rows stream from memory as two arrays; the hardware prefetcher alone left a thread
      // ~15% slower than from L2 (Zen 1, 1.77 against 2.04 multiply-adds a cycle), 1 KiB of sm
      // and 512 bytes of nib ahead close it
      __builtin_prefetch(w.sm + r * K + c + 1024, 0, 3);
      __builtin_prefetch(w.nib + r * (K / 2) + c / 2 + 512, 0, 3);
      for (int h = 0; h < 2; ++h) {
        simd::F v[V];
        decoder.f32(w, r, c, h, v);
        for (int i = 0; i < V; ++i)
          for (int m = 0; m < M; ++m)
            acc[i % U][m] = simd::fmadd(v[i], simd::load(x + m * K + c + 32 * h + simd::W * i), acc[i % U][m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      simd::F sum = acc[0][m];
      for (int u = 1; u < U; ++u) sum = simd::add(sum, acc[u][m]);
      out[m * ldo + r] = finish(simd::reduce(sum) + packed::listed_dot(w, r, in.bf16 + m * K), bias, r);
    }
  }
}
#endif

// A weight (R, K): dense bf16, or packed.
struct Weight {
  int64_t R = 0, K = 0;
  const uint16_t* dense = nullptr;
  PackedBF16 packed{};

  // out[m * ldo + r] for the N <= 8 tokens of `in` and rows [r0, r1); bias indexed by r as well
  void product(int N, const Inputs& in, const uint16_t* bias, uint16_t* out, int64_t ldo, int64_t r0,
               int64_t r1) const {
    if (dense && N > 4) {
      const int64_t ld = r1 - r0;
      std::vector<float> y(N * ld);
      dense_tiles(N, dense, in, y.data(), ld, r0, r1);
      for (int64_t m = 0; m < N; ++m)
        for (int64_t r = r0; r < r1; ++r) out[m * ldo + r] = finish(y[m * ld + r - r0], bias, r);
      return;
    }
    with_tokens(N, [&](auto tokens) {
      constexpr int M = decltype(tokens)::value;
      if (dense) {
        if constexpr (M <= 4) dense_rows<M>(dense, in, bias, out, ldo, r0, r1);
#if defined(OSSGPT_BF16_DOT)
      } else if constexpr (M >= 5) {
        packed_tile<3, M>(packed, in, bias, out, ldo, r0, r1);
#endif
      } else {
        packed_rows<M>(packed, in, bias, out, ldo, r0, r1);
      }
    });
  }
};

#if !defined(OSSGPT_BF16_DOT)
// Many rows (prefill) on levels without bf16 products, where oneDNN's bf16 matmul is slow
// (it emulates them: 13 GMAC/s on 2 AVX2 cores, against 90-109 for this): each panel of weight rows
// (dense or packed) is widened to float32 once, sized to stay in L2, and every token passes
// over it in register tiles.
inline void forward_many(const uint16_t* x, int64_t N, const Weight& w, const uint16_t* bias, uint16_t* out,
                         const Parallel& parallel) {
  const int64_t K = w.K, R = w.R;
  Buffer<float> xf(N * K);
  parallel(0, N, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b * K; i < e * K; i += simd::W) simd::store(xf.get() + i, simd::load_bf16(x + i));
  });
  const int64_t rows = std::max<int64_t>(kPanelRows, (256 << 10) / (K * 4) / kPanelRows * kPanelRows);
  parallel(0, (R + rows - 1) / rows, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> panel(rows * K), y(N * rows);
    std::vector<uint16_t> row(K);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t r0 = p * rows, n = std::min(rows, R - r0);
      for (int64_t r = 0; r < n; ++r) {
        const uint16_t* src = w.dense ? w.dense + (r0 + r) * K : row.data();
        if (!w.dense) packed::unpack_row(w.packed, r0 + r, row.data());
        for (int64_t k = 0; k < K; k += simd::W) simd::store(panel.data() + r * K + k, simd::load_bf16(src + k));
      }
      gemm<kPanelRows, kPanelTokens>(panel.data(), K, n, xf.get(), K, N, K, y.data(), n, nullptr);
      for (int64_t m = 0; m < N; ++m)
        for (int64_t r = 0; r < n; ++r) out[m * R + r0 + r] = finish(y[m * n + r], bias, r0 + r);
    }
  });
}
#endif

// out (N, R) = x (N, K) @ w.T + bias, all bf16; N <= 8 on the avx512bf16 level (oneDNN's bf16
// matmul takes more rows there), any N on the others.
inline void forward(const uint16_t* x, int64_t N, const Weight& w, const uint16_t* bias, uint16_t* out,
                    const Parallel& parallel) {
  if (N < 1 || w.K % 32) throw std::invalid_argument("linear_bf16: needs rows of K % 32 == 0 inputs");
#if defined(OSSGPT_BF16_DOT)
  if (N > 8) throw std::invalid_argument("linear_bf16: at most 8 rows on this level");
#else
  if (N > 8) return forward_many(x, N, w, bias, out, parallel);
#endif
  const Inputs in(x, N, w.K, w.dense != nullptr, w.dense == nullptr);
  parallel(0, w.R, row_grain(w.K), [&](int64_t r0, int64_t r1) {
    w.product((int)N, in, bias, out, w.R, r0, r1);
  });
}

// The attention's inputs for a few tokens (decode): RMSNorm of x, the q, k and v products in one
// parallel pass over the three weights, and the rotary embedding of q and k. One call where the
// plain path makes about forty small ones (a decode step's Python and dispatch time exceeded
// the layer's weight reads at small context). The same roundings as the plain path: the norm
// and each product to bf16, then the rotation in float32 to bf16.
// x (N, C) bf16; norm_weight (C,) float32; weights (Rj, C) and biases (Rj,) bf16 for q, k, v;
// cos, sin (N, D/2) float32; the first `rope_heads` heads of D columns are rotated;
// out (N, Rq + Rk + Rv) bf16.
inline void qkv_rope(const uint16_t* x, int64_t N, int64_t C, const float* norm_weight, float eps,
                     const Weight (&w)[3], const uint16_t* const (&bias)[3], const float* cos, const float* sin,
                     int64_t D, int64_t rope_heads, uint16_t* out, const Parallel& parallel) {
  if (N < 1 || N > 8 || C % 32) throw std::invalid_argument("qkv_rope_bf16: needs 1..8 rows of C % 32 == 0");
  // RMSNorm as model.RMSNorm: float32 x * rsqrt(mean(x**2) + eps), times the weight, to bf16
  std::vector<uint16_t> h(N * C);
  for (int64_t m = 0; m < N; ++m) {
    const uint16_t* xr = x + m * C;
    float ss = 0.f;
    for (int64_t c = 0; c < C; ++c) ss += bf16_to_float(xr[c]) * bf16_to_float(xr[c]);
    const float r = 1.f / std::sqrt(ss / C + eps);
    for (int64_t c = 0; c < C; ++c) h[m * C + c] = float_to_bf16(bf16_to_float(xr[c]) * r * norm_weight[c]);
  }
  int64_t starts[4] = {0, 0, 0, 0};
  bool dense = false, packed = false;
  for (int j = 0; j < 3; ++j) {
    if (w[j].K != C) throw std::invalid_argument("qkv_rope_bf16: a weight does not match x");
    starts[j + 1] = starts[j] + w[j].R;
    (w[j].dense ? dense : packed) = true;
  }
  const int64_t R = starts[3];
  if (rope_heads * D > R) throw std::invalid_argument("qkv_rope_bf16: rotary shapes do not match");
  const Inputs in(h.data(), N, C, dense, packed);
  parallel(0, R, row_grain(C), [&](int64_t r0, int64_t r1) {
    for (int j = 0; j < 3; ++j) {   // the part of [r0, r1) in weight j
      const int64_t a = std::max(r0, starts[j]), b = std::min(r1, starts[j + 1]);
      if (a < b) w[j].product((int)N, in, bias[j], out + starts[j], R, a - starts[j], b - starts[j]);
    }
  });
  // rotate each head's halves: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
  for (int64_t m = 0; m < N; ++m)
    for (int64_t head = 0; head < rope_heads; ++head) {
      uint16_t* y = out + m * R + head * D;
      for (int64_t i = 0; i < D / 2; ++i) {
        const float x1 = bf16_to_float(y[i]), x2 = bf16_to_float(y[i + D / 2]);
        const float c = cos[m * D / 2 + i], s = sin[m * D / 2 + i];
        y[i] = float_to_bf16(x1 * c - x2 * s);
        y[i + D / 2] = float_to_bf16(x2 * c + x1 * s);
      }
    }
}

}  // namespace ossgpt::linear
