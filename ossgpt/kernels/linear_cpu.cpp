// bf16 matrix products for decode on the CPU: x (a few rows) @ W.T with W read once, at memory
// speed. The plain version is F.linear (oneDNN), which tests/test_kernels.py compares against.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include "bf16_gemm.h"

namespace {
// The product's value plus the bias, rounded once to bf16 (as F.linear's float32 sum + bias).
inline uint16_t finish(float sum, const uint16_t* bias, int64_t r) {
  return c10::BFloat16(bias ? sum + float(c10::BFloat16(bias[r], c10::BFloat16::from_bits())) : sum).x;
}

// out[m, r] = sum_k W[r, k] x[m, k] (+ bias[r]) for rows [r0, r1): bf16 weights, inputs and
// outputs, float32 sums.
template <int M>
void bf16_rows(const uint16_t* w, const uint16_t* x, int64_t K, const uint16_t* bias, uint16_t* out,
               int64_t ldo, int64_t r0, int64_t r1) {
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
      out[m * ldo + r] = finish(_mm512_reduce_add_ps(sum), bias, r);
    }
  }
}

// Row ranges of at least 64 KiB of weights: enough work per task to keep the threads fed.
inline int64_t row_grain(int64_t K) { return std::max<int64_t>(4, (64 << 10) / (K * 2)); }

// out[m, r] for N <= 8 tokens and rows [r0, r1) of W.
void bf16_product(int N, const uint16_t* w, const uint16_t* x, int64_t K, const uint16_t* bias,
                  uint16_t* out, int64_t ldo, int64_t r0, int64_t r1) {
  switch (N) {
    case 1: return bf16_rows<1>(w, x, K, bias, out, ldo, r0, r1);
    case 2: return bf16_rows<2>(w, x, K, bias, out, ldo, r0, r1);
    case 3: return bf16_rows<3>(w, x, K, bias, out, ldo, r0, r1);
    case 4: return bf16_rows<4>(w, x, K, bias, out, ldo, r0, r1);
  }
  // Decode rows of x beyond L1's room beside the weights: each input vector loaded then serves
  // 3 weight rows (3 x 8 accumulators fill the registers), and the rows are prefetched 512
  // bytes ahead (measured: 23.5 against 20.5 GB/s without, 8 rows x 201088 x 2880).
  const int64_t ld = r1 - r0;
  std::vector<float> y(N * ld);
  int64_t r = r0;
  for (; r + 3 <= r1; r += 3) ossgpt::gemm_tile_upto_bf16<3, 8, 512>(N, w + r * K, K, x, K, K, y.data() + r - r0, ld);
  for (; r < r1; ++r) ossgpt::gemm_tile_upto_bf16<1, 8, 512>(N, w + r * K, K, x, K, K, y.data() + r - r0, ld);
  for (int64_t m = 0; m < N; ++m)
    for (r = r0; r < r1; ++r) out[m * ldo + r] = finish(y[m * ld + r - r0], bias, r);
}
}  // namespace

// x (N, K) bf16, weight (R, K) bf16, K % 32 == 0, N <= 8 (decode), bias (R,) bf16 or None ->
// x @ weight.T + bias as bf16 (N, R). oneDNN's bf16 matmul reads a one-row product's weights
// at about half the memory bandwidth here; this reads them once, at full speed, which the
// unembedding (V x C) needs.
torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dtype() == torch::kBFloat16 && weight.dtype() == torch::kBFloat16 &&
              x.dim() == 2 && x.size(0) <= 8 && weight.size(1) == x.size(1) &&
              x.size(1) % 32 == 0, "linear_bf16: needs bf16 x (N <= 8, K % 32 == 0) and weight");
  x = x.contiguous(); weight = weight.contiguous();
  const int64_t N = x.size(0), K = x.size(1), R = weight.size(0);
  torch::Tensor b;
  if (bias.has_value()) {
    b = bias->to(torch::kBFloat16).contiguous();
    TORCH_CHECK(b.numel() == R, "linear_bf16: bias does not match weight");
  }
  auto out = torch::empty({N, R}, x.options());
  const auto* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* bp = b.defined() ? reinterpret_cast<const uint16_t*>(b.data_ptr<at::BFloat16>()) : nullptr;
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, R, row_grain(K), [&](int64_t r0, int64_t r1) {
    bf16_product((int)N, wp, xp, K, bp, op, R, r0, r1);
  });
  return out;
}

// The attention's inputs for a few tokens (decode): RMSNorm of x, the q, k and v products in one
// parallel pass over the three weights, and the rotary embedding of q and k. One call where the
// plain path makes about forty small ones (a decode step's Python and dispatch time exceeded
// the layer's weight reads at small context). The same roundings as the plain path: the norm
// and each product to bf16, then the rotation in float32 to bf16.
// x (N, C) bf16; norm_weight (C,); weights (Rj, C) bf16 and biases (Rj,) for q, k, v; cos, sin
// (N, D/2) float32; the first `rope_heads` heads of D columns are rotated -> (N, Rq + Rk + Rv).
torch::Tensor qkv_rope_bf16(torch::Tensor x, torch::Tensor norm_weight, double eps,
                            std::vector<torch::Tensor> weights, std::vector<torch::Tensor> biases,
                            torch::Tensor cos, torch::Tensor sin, int64_t rope_heads) {
  TORCH_CHECK(x.dtype() == torch::kBFloat16 && x.dim() == 2 && x.size(0) <= 8 && x.size(1) % 32 == 0 &&
              weights.size() == 3 && biases.size() == 3 && cos.dtype() == torch::kFloat32 &&
              sin.dtype() == torch::kFloat32, "qkv_rope_bf16: bad arguments");
  const int64_t N = x.size(0), C = x.size(1), D = 2 * cos.size(-1);
  x = x.contiguous(); cos = cos.contiguous(); sin = sin.contiguous();
  // RMSNorm as model.RMSNorm: float32 x * rsqrt(mean(x**2) + eps), times the weight, to bf16
  auto h = torch::empty({N, C}, x.options());
  const auto w = norm_weight.to(torch::kFloat32).contiguous();
  const float* wn = w.data_ptr<float>();
  for (int64_t m = 0; m < N; ++m) {
    const c10::BFloat16* xr = x.data_ptr<at::BFloat16>() + m * C;
    c10::BFloat16* hr = h.data_ptr<at::BFloat16>() + m * C;
    float ss = 0.f;
    for (int64_t c = 0; c < C; ++c) ss += float(xr[c]) * float(xr[c]);
    const float r = 1.f / std::sqrt(ss / C + (float)eps);
    for (int64_t c = 0; c < C; ++c) hr[c] = c10::BFloat16(float(xr[c]) * r * wn[c]);
  }
  int64_t starts[4] = {0, 0, 0, 0};
  const uint16_t* wp[3];
  const uint16_t* bp[3];
  for (int j = 0; j < 3; ++j) {
    weights[j] = weights[j].contiguous();
    TORCH_CHECK(weights[j].dtype() == torch::kBFloat16 && weights[j].size(1) == C,
                "qkv_rope_bf16: weight ", j, " does not match x");
    biases[j] = biases[j].to(torch::kBFloat16).contiguous();
    wp[j] = reinterpret_cast<const uint16_t*>(weights[j].data_ptr<at::BFloat16>());
    bp[j] = reinterpret_cast<const uint16_t*>(biases[j].data_ptr<at::BFloat16>());
    starts[j + 1] = starts[j] + weights[j].size(0);
  }
  const int64_t R = starts[3];
  TORCH_CHECK(rope_heads * D <= R && cos.size(0) == N, "qkv_rope_bf16: rotary shapes do not match");
  auto out = torch::empty({N, R}, x.options());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const auto* hp = reinterpret_cast<const uint16_t*>(h.data_ptr<at::BFloat16>());
  at::parallel_for(0, R, row_grain(C), [&](int64_t r0, int64_t r1) {
    for (int j = 0; j < 3; ++j) {   // the part of [r0, r1) in weight j
      const int64_t a = std::max(r0, starts[j]), b = std::min(r1, starts[j + 1]);
      if (a < b)
        bf16_product((int)N, wp[j] - starts[j] * C, hp, C, bp[j] - starts[j], op, R, a, b);
    }
  });
  // rotate each head's halves: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  c10::BFloat16* rows = out.data_ptr<at::BFloat16>();
  for (int64_t m = 0; m < N; ++m)
    for (int64_t head = 0; head < rope_heads; ++head) {
      c10::BFloat16* y = rows + m * R + head * D;
      for (int64_t i = 0; i < D / 2; ++i) {
        const float x1 = y[i], x2 = y[i + D / 2], c = cp[m * D / 2 + i], s = sp[m * D / 2 + i];
        y[i] = c10::BFloat16(x1 * c - x2 * s);
        y[i + D / 2] = c10::BFloat16(x2 * c + x1 * s);
      }
    }
  return out;
}
#endif

