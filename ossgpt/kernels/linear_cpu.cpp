// bf16 matrix products for decode on the CPU: x (a few rows) @ W.T with W read once, at memory
// speed. The plain version is F.linear (oneDNN), which tests/test_kernels.py compares against.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include "bf16_gemm.h"

namespace {
// y[m, r] = sum_k W[r, k] x[m, k] for rows [r0, r1): bf16 weights and inputs, float32 sums.
template <int M>
void bf16_rows(const uint16_t* w, const uint16_t* x, int64_t K, float* y, int64_t ldy,
               int64_t r0, int64_t r1) {
  // One row at a time: the weights stream through memory in order (interleaving rows splits
  // that into several streams, which the hardware prefetcher follows less well). U independent
  // accumulators per token cover vdpbf16ps's latency when there are few tokens.
  constexpr int U = M == 1 ? 4 : 2;
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
      y[m * ldy + r] = _mm512_reduce_add_ps(sum);
    }
  }
}

void bf16_tile(int M, const uint16_t* w, const uint16_t* x, int64_t K, float* y, int64_t ldy,
               int64_t r0, int64_t r1) {
  switch (M) {
    case 1: return bf16_rows<1>(w, x, K, y, ldy, r0, r1);
    case 2: return bf16_rows<2>(w, x, K, y, ldy, r0, r1);
    case 3: return bf16_rows<3>(w, x, K, y, ldy, r0, r1);
    default: return bf16_rows<4>(w, x, K, y, ldy, r0, r1);
  }
}
}  // namespace

// x (N, K) bf16, weight (R, K) bf16, K % 32 == 0, N <= 8 (decode) -> x @ weight.T + bias as
// bf16 (N, R). oneDNN's bf16 matmul reads a one-row product's weights at about half the memory
// bandwidth here; this reads them once, at full speed, which the unembedding (V x C) needs.
torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dtype() == torch::kBFloat16 && weight.dtype() == torch::kBFloat16 &&
              x.dim() == 2 && x.size(0) <= 8 && weight.size(1) == x.size(1) &&
              x.size(1) % 32 == 0, "linear_bf16: needs bf16 x (N <= 8, K % 32 == 0) and weight");
  x = x.contiguous(); weight = weight.contiguous();
  const int64_t N = x.size(0), K = x.size(1), R = weight.size(0);
  auto y = torch::empty({N, R}, torch::TensorOptions().dtype(torch::kFloat32));
  const auto* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  // Row ranges of at least 64 KiB of weights: enough work per task to keep the threads fed.
  const int64_t grain = std::max<int64_t>(4, (64 << 10) / (K * 2));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    if (N <= 4) return bf16_tile((int)N, wp, xp, K, yp, R, r0, r1);
    // More rows of x than L1 holds beside the weights: each input vector loaded must then serve
    // several weight rows (3 rows x 8 tokens of accumulators fill the registers).
    // Decode rows of x beyond L1's room beside the weights: each input vector loaded then serves
    // 3 weight rows (3 x 8 accumulators fill the registers), and the rows are prefetched 512
    // bytes ahead (measured: 23.5 against 20.5 GB/s without, 8 rows x 201088 x 2880).
    int64_t r = r0;
    for (; r + 3 <= r1; r += 3) ossgpt::gemm_tile_upto_bf16<3, 8, 512>(N, wp + r * K, K, xp, K, K, yp + r, R);
    for (; r < r1; ++r) ossgpt::gemm_tile_upto_bf16<1, 8, 512>(N, wp + r * K, K, xp, K, K, yp + r, R);
  });
  if (bias.has_value()) y += bias->to(torch::kFloat32);
  return y.to(torch::kBFloat16);
}
#endif

