// bf16 matrix products for decode on the CPU: x (a few rows) @ W.T with W read once, at memory
// speed, W dense or in the 12-bit packed form (packed_bf16.h). The plain version is F.linear
// (oneDNN), which tests/test_kernels.py and tests/test_packed_bf16.py compare against.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include "bf16_gemm.h"
#include "packed_bf16.h"

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

// bf16_rows for packed weights: each 64 elements decoded in registers (packed_bf16.h) serve the
// M tokens; U chunks a step give one token 4 independent accumulators.
template <int M>
void packed_rows(const ossgpt::PackedBF16& w, const uint16_t* x, const uint16_t* bias, uint16_t* out,
                 int64_t ldo, int64_t r0, int64_t r1) {
  constexpr int U = M == 1 ? 2 : 1;
  const int64_t K = w.K;
  for (int64_t r = r0; r < r1; ++r) {
    const __m512i table = ossgpt::exponent_table(w.base[r]);
    __m512 acc[2 * U][M];
    for (int u = 0; u < 2 * U; ++u)
      for (int m = 0; m < M; ++m) acc[u][m] = _mm512_setzero_ps();
    for (int64_t c = 0; c < K; c += 64 * U)
      for (int u = 0; u < U && c + 64 * u < K; ++u) {
        const int64_t k = c + 64 * u;
        __m512i lo, hi;
        ossgpt::decode64(w, r, k, table, lo, hi);
        for (int m = 0; m < M; ++m) {
          acc[2 * u][m] = _mm512_dpbf16_ps(acc[2 * u][m], (__m512bh)lo, (__m512bh)_mm512_loadu_si512(x + m * K + k));
          acc[2 * u + 1][m] = _mm512_dpbf16_ps(acc[2 * u + 1][m], (__m512bh)hi,
                                               (__m512bh)_mm512_loadu_si512(x + m * K + k + 32));
        }
      }
    for (int m = 0; m < M; ++m) {
      __m512 sum = acc[0][m];
      for (int u = 1; u < 2 * U; ++u) sum = _mm512_add_ps(sum, acc[u][m]);
      out[m * ldo + r] = finish(_mm512_reduce_add_ps(sum) + ossgpt::listed_dot(w, r, x + m * K), bias, r);
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
void packed_tile(const ossgpt::PackedBF16& w, const uint16_t* x, const uint16_t* bias, uint16_t* out,
                 int64_t ldo, int64_t r0, int64_t r1) {
  constexpr int64_t kBlock = 16 * RT;
  const int64_t K = w.K;
  ossgpt::RowPrefetch next(w, r0, 0, 0);
  int64_t r = r0;
  for (; r + RT <= r1; r += RT) {
    if ((r - r0) % kBlock == 0) {
      const int64_t start = std::min(r + kBlock, r1);
      next = ossgpt::RowPrefetch(w, start, std::min(kBlock, r1 - start), kBlock / RT * (K / 64));
    }
    __m512i table[RT];
    __m512 acc[RT][M];
    for (int i = 0; i < RT; ++i) {
      table[i] = ossgpt::exponent_table(w.base[r + i]);
      for (int m = 0; m < M; ++m) acc[i][m] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < K; k += 64) {
      next.step();
      __m512i lo[RT], hi[RT];
      for (int i = 0; i < RT; ++i) ossgpt::decode64(w, r + i, k, table[i], lo[i], hi[i]);
      for (int m = 0; m < M; ++m) {
        const __m512bh xl = (__m512bh)_mm512_loadu_si512(x + m * K + k);
        for (int i = 0; i < RT; ++i) acc[i][m] = _mm512_dpbf16_ps(acc[i][m], (__m512bh)lo[i], xl);
        const __m512bh xh = (__m512bh)_mm512_loadu_si512(x + m * K + k + 32);
        for (int i = 0; i < RT; ++i) acc[i][m] = _mm512_dpbf16_ps(acc[i][m], (__m512bh)hi[i], xh);
      }
    }
    for (int i = 0; i < RT; ++i)
      for (int m = 0; m < M; ++m)
        out[m * ldo + r + i] = finish(_mm512_reduce_add_ps(acc[i][m]) + ossgpt::listed_dot(w, r + i, x + m * K),
                                      bias, r + i);
  }
  if (r < r1) packed_rows<M>(w, x, bias, out, ldo, r, r1);
}

void packed_product(int N, const ossgpt::PackedBF16& w, const uint16_t* x, const uint16_t* bias,
                    uint16_t* out, int64_t ldo, int64_t r0, int64_t r1) {
  switch (N) {
    case 1: return packed_rows<1>(w, x, bias, out, ldo, r0, r1);
    case 2: return packed_rows<2>(w, x, bias, out, ldo, r0, r1);
    case 3: return packed_rows<3>(w, x, bias, out, ldo, r0, r1);
    case 4: return packed_rows<4>(w, x, bias, out, ldo, r0, r1);
    case 5: return packed_tile<3, 5>(w, x, bias, out, ldo, r0, r1);
    case 6: return packed_tile<3, 6>(w, x, bias, out, ldo, r0, r1);
    case 7: return packed_tile<3, 7>(w, x, bias, out, ldo, r0, r1);
    default: return packed_tile<3, 8>(w, x, bias, out, ldo, r0, r1);
  }
}

// A weight (R, K) as Python passes it: [dense bf16] or the six parts of ossgpt.packed_bf16.
struct Weight {
  int64_t R = 0, K = 0;
  const uint16_t* dense = nullptr;
  ossgpt::PackedBF16 packed{};

  explicit Weight(std::vector<torch::Tensor>& parts) {
    if (parts.size() == 1) {
      parts[0] = parts[0].contiguous();
      TORCH_CHECK(parts[0].dtype() == torch::kBFloat16 && parts[0].dim() == 2, "weight: needs bf16 (R, K)");
      R = parts[0].size(0), K = parts[0].size(1);
      dense = reinterpret_cast<const uint16_t*>(parts[0].data_ptr<at::BFloat16>());
      return;
    }
    TORCH_CHECK(parts.size() == 6 && parts[0].dim() == 2 && parts[0].size(1) % 64 == 0 &&
                parts[0].is_contiguous() && parts[1].is_contiguous(), "weight: bad packed parts");
    R = parts[0].size(0), K = parts[0].size(1);
    packed = {parts[0].data_ptr<uint8_t>(), parts[1].data_ptr<uint8_t>(), parts[2].data_ptr<uint8_t>(),
              parts[3].data_ptr<int64_t>(), parts[4].data_ptr<int32_t>(), parts[5].data_ptr<float>(), K};
  }

  // out[m * ldo + r] for N tokens of x (N, K) and rows [r0, r1); bias indexed by r as well
  void product(int N, const uint16_t* x, const uint16_t* bias, uint16_t* out, int64_t ldo,
               int64_t r0, int64_t r1) const {
    if (dense) bf16_product(N, dense, x, K, bias, out, ldo, r0, r1);
    else packed_product(N, packed, x, bias, out, ldo, r0, r1);
  }
};
}  // namespace

// x (N, K) bf16, weight [(R, K) bf16] or packed parts, K % 32 == 0, N <= 8 (decode), bias (R,)
// bf16 or None -> x @ weight.T + bias as bf16 (N, R). oneDNN's bf16 matmul reads a one-row
// product's weights at about half the memory bandwidth here; this reads them once, at full
// speed, which the unembedding (V x C) needs.
torch::Tensor linear_bf16(torch::Tensor x, std::vector<torch::Tensor> weight, c10::optional<torch::Tensor> bias) {
  const Weight w(weight);
  TORCH_CHECK(x.dtype() == torch::kBFloat16 && x.dim() == 2 && x.size(0) <= 8 && w.K == x.size(1) &&
              x.size(1) % 32 == 0, "linear_bf16: needs bf16 x (N <= 8, K % 32 == 0) and a matching weight");
  x = x.contiguous();
  const int64_t N = x.size(0), K = x.size(1), R = w.R;
  torch::Tensor b;
  if (bias.has_value()) {
    b = bias->to(torch::kBFloat16).contiguous();
    TORCH_CHECK(b.numel() == R, "linear_bf16: bias does not match weight");
  }
  auto out = torch::empty({N, R}, x.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* bp = b.defined() ? reinterpret_cast<const uint16_t*>(b.data_ptr<at::BFloat16>()) : nullptr;
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, R, row_grain(K), [&](int64_t r0, int64_t r1) {
    w.product((int)N, xp, bp, op, R, r0, r1);
  });
  return out;
}

// The attention's inputs for a few tokens (decode): RMSNorm of x, the q, k and v products in one
// parallel pass over the three weights, and the rotary embedding of q and k. One call where the
// plain path makes about forty small ones (a decode step's Python and dispatch time exceeded
// the layer's weight reads at small context). The same roundings as the plain path: the norm
// and each product to bf16, then the rotation in float32 to bf16.
// x (N, C) bf16; norm_weight (C,); weights (Rj, C) as linear_bf16's and biases (Rj,) for q, k, v;
// cos, sin (N, D/2) float32; the first `rope_heads` heads of D columns are rotated
// -> (N, Rq + Rk + Rv).
torch::Tensor qkv_rope_bf16(torch::Tensor x, torch::Tensor norm_weight, double eps,
                            std::vector<std::vector<torch::Tensor>> weights, std::vector<torch::Tensor> biases,
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
  std::vector<Weight> wj;
  const uint16_t* bp[3];
  for (int j = 0; j < 3; ++j) {
    wj.emplace_back(weights[j]);
    TORCH_CHECK(wj[j].K == C && biases[j].numel() == wj[j].R, "qkv_rope_bf16: weight ", j, " does not match x");
    biases[j] = biases[j].to(torch::kBFloat16).contiguous();
    bp[j] = reinterpret_cast<const uint16_t*>(biases[j].data_ptr<at::BFloat16>());
    starts[j + 1] = starts[j] + wj[j].R;
  }
  const int64_t R = starts[3];
  TORCH_CHECK(rope_heads * D <= R && cos.size(0) == N, "qkv_rope_bf16: rotary shapes do not match");
  auto out = torch::empty({N, R}, x.options());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const auto* hp = reinterpret_cast<const uint16_t*>(h.data_ptr<at::BFloat16>());
  at::parallel_for(0, R, row_grain(C), [&](int64_t r0, int64_t r1) {
    for (int j = 0; j < 3; ++j) {   // the part of [r0, r1) in weight j
      const int64_t a = std::max(r0, starts[j]), b = std::min(r1, starts[j + 1]);
      if (a < b) wj[j].product((int)N, hp, bp[j], op + starts[j], R, a - starts[j], b - starts[j]);
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

