// MXFP4 mixture-of-experts for the CPU: each routed expert's weights are read once, in their
// packed form, never materialised whole. With few tokens per expert (decode) they are
// dequantized in registers (a fused dequant-matmul); with many (prefill) a few rows at a time
// into a bf16 panel that stays in cache while a register-tiled GEMM passes every token over it.
//
// Why hand-written: decode is bound by memory traffic, and PyTorch has no MXFP4 matmul, so the
// plain path must write a dequantized bf16 copy of every routed expert (4x the bytes) before
// multiplying. The plain version in ossgpt/model.py is the reference these kernels are tested
// against (tests/test_kernels.py).
//
// Layout (ossgpt/mxfp4.py): a weight row of K inputs is K/32 blocks of 16 bytes (two E2M1 codes
// per byte, low nibble = even element) and K/32 E8M0 scale bytes.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#include "vec_math.h"
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include "bf16_gemm.h"
#endif

namespace {

constexpr float kFp4[16] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f,
                            -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

// 2**(s - 127) for every E8M0 byte, exactly as ossgpt.mxfp4 (0xFF is NaN).
struct ScaleTable {
  float v[256];
  ScaleTable() {
    for (int s = 0; s < 256; ++s) v[s] = std::ldexp(1.0f, s - 127);
    v[255] = NAN;
  }
};
const ScaleTable kScale;

constexpr int kMaxTokens = 8;  // token rows per job tile (the fp32 kernel takes 4 at a time)
constexpr int kRows = 4;       // weight rows per register tile
constexpr int kPanelTokens = 4;   // bf16: tokens per expert from which panels pay (measured)

// n consecutive MXFP4 blocks (16 bytes and one scale each) -> 32 n bfloat16 in element order,
// exact as mxfp4.dequantize: an E2M1 value times a power of two is a bf16, so truncating the
// float32 product is exact (zero, subnormal, inf and NaN scales included).
inline void decode_blocks_bf16(const uint8_t* b, const uint8_t* s, int64_t n, uint16_t* out) {
#if defined(__AVX512F__)
  const __m512 lut = _mm512_loadu_ps(kFp4);
  const __m512i low4 = _mm512_set1_epi32(0x0F), high16 = _mm512_set1_epi32((int)0xFFFF0000u);
  for (int64_t g = 0; g < n; ++g) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(b + g * 16)));
    const __m512 scale = _mm512_set1_ps(kScale.v[s[g]]);
    const __m512i even = _mm512_castps_si512(
        _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(bytes, low4), lut), scale));
    const __m512i odd = _mm512_castps_si512(
        _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), lut), scale));
    // 32-bit lane j holds elements 2j (low half) and 2j + 1 (high half): the bf16 pair in order
    _mm512_storeu_si512(out + g * 32,
                        _mm512_or_si512(_mm512_srli_epi32(even, 16), _mm512_and_si512(odd, high16)));
  }
#else
  for (int64_t g = 0; g < n; ++g) {
    const float scale = kScale.v[s[g]];
    for (int j = 0; j < 32; ++j) {
      const float v = kFp4[(b[g * 16 + j / 2] >> (4 * (j % 2))) & 0x0F] * scale;
      uint32_t bits;
      std::memcpy(&bits, &v, sizeof bits);
      out[g * 32 + j] = (uint16_t)(bits >> 16);
    }
  }
#endif
}

#if defined(__AVX512F__)
// The register tiling both MXFP4 kernels share: rows [r0, r1) in tiles of kTileRows rows (then
// single rows), each with zeroed accumulators acc[R][M] that `step(acc, r)` fills; then
// y[m, r + i] = sum(acc[i][m]) + bias[r + i].
template <int M, int kTileRows, class Step>
inline void row_tiles(int64_t r0, int64_t r1, float* y, int64_t ldy, const float* bias, Step step) {
  auto tile = [&](auto rows_const, int64_t r) {
    constexpr int R = decltype(rows_const)::value;
    __m512 acc[R][M];
    for (int i = 0; i < R; ++i)
      for (int m = 0; m < M; ++m) acc[i][m] = _mm512_setzero_ps();
    step(acc, r);
    for (int i = 0; i < R; ++i)
      for (int m = 0; m < M; ++m) y[m * ldy + r + i] = _mm512_reduce_add_ps(acc[i][m]) + bias[r + i];
  };
  int64_t r = r0;
  for (; r + kTileRows <= r1; r += kTileRows) tile(std::integral_constant<int, kTileRows>{}, r);
  for (; r < r1; ++r) tile(std::integral_constant<int, 1>{}, r);
}
#endif

// y[m * ldy + r] = sum_k W[r, k] * x[m, k] + bias[r] for rows r in [r0, r1), M <= kMaxTokens
// tokens. x is "pair-split": per block of 32 inputs, the 16 even elements then the 16 odd ones,
// matching the low/high nibbles of the 16 packed bytes.
template <int M>
void rows_matmul(const uint8_t* blocks, const uint8_t* scales, int64_t G, const float* x,
                 float* y, int64_t ldy, const float* bias, int64_t r0, int64_t r1) {
  const int64_t K = G * 32;
#if defined(__AVX512F__)
  const __m512 lut = _mm512_loadu_ps(kFp4);
  const __m512i low4 = _mm512_set1_epi32(0x0F);
  row_tiles<M, kRows>(r0, r1, y, ldy, bias, [&](auto& acc, int64_t r) {
    constexpr int R = std::extent_v<std::remove_reference_t<decltype(acc)>>;  // tile rows
    for (int64_t g = 0; g < G; ++g) {
      for (int i = 0; i < R; ++i) {
        const uint8_t* b = blocks + ((r + i) * G + g) * 16;
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)b));
        const __m512 scale = _mm512_set1_ps(kScale.v[scales[(r + i) * G + g]]);
        const __m512 lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(bytes, low4), lut), scale);
        const __m512 hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), lut), scale);
        for (int m = 0; m < M; ++m) {
          const float* xm = x + m * K + g * 32;
          acc[i][m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xm), acc[i][m]);
          acc[i][m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xm + 16), acc[i][m]);
        }
      }
    }
  });
#else  // portable scalar version of the same loop
  for (int64_t r = r0; r < r1; ++r) {
    float acc[M] = {};
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* b = blocks + (r * G + g) * 16;
      const float scale = kScale.v[scales[r * G + g]];
      for (int j = 0; j < 16; ++j) {
        const float lo = kFp4[b[j] & 0x0F] * scale, hi = kFp4[b[j] >> 4] * scale;
        for (int m = 0; m < M; ++m)
          acc[m] += lo * x[m * K + g * 32 + j] + hi * x[m * K + g * 32 + 16 + j];
      }
    }
    for (int m = 0; m < M; ++m) y[m * ldy + r] = acc[m] + bias[r];
  }
#endif
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define OSSGPT_BF16_KERNEL 1
// The bf16 version for bf16 models: weights become bf16 in registers (exact) and vdpbf16ps
// multiplies 32 pairs per instruction. Blocks go four at a time (64 bytes, one 128-bit lane
// each). Shuffles limit this loop, so each 16-bit word's four nibbles are shifted into place and
// looked up in a word table by vpermw (4 shuffles per quad; byte tables and unpacks took 8:
// 14 GB/s a core against 17, one token, weights in L2): vector i holds, in word j, element 4 (j % 8) + i of block j / 8.
// x is laid out the same way (Operand::set_row); a last partial quad is loaded masked (zeros).

// Lanes of a quad's scale vector: 4 fp32 lanes per block (vdpbf16ps sums pairs of 16-bit lanes).
alignas(64) const int32_t kQuadLanes[4][16] = {
    {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3},
    {4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7},
    {8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11},
    {12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15}};

// 2**(s - 127) of n <= 16 E8M0 bytes as floats, exact as kScale: the byte is the float's
// exponent field, except 0 (the subnormal 2**-127) and 0xFF (NaN).
inline __m512 scale_vector(const uint8_t* s, int n) {
  const __m512i e = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8((__mmask16)((1u << n) - 1), s));
  __m512i bits = _mm512_slli_epi32(e, 23);
  bits = _mm512_mask_mov_epi32(bits, _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512()),
                               _mm512_set1_epi32(0x00400000));
  bits = _mm512_mask_mov_epi32(bits, _mm512_cmpeq_epi32_mask(e, _mm512_set1_epi32(255)),
                               _mm512_set1_epi32(0x7FC00000));
  return _mm512_castsi512_ps(bits);
}

inline int64_t quads(int64_t G) { return (G + 3) / 4; }

template <int M>
void rows_matmul_bf16(const uint8_t* blocks, const uint8_t* scales, int64_t G, const uint16_t* x,
                      float* y, int64_t ldy, const float* bias, int64_t r0, int64_t r1) {
  const int64_t Kp = quads(G) * 128;            // x's padded row length
  // The bf16 bits of each E2M1 code, a word table for vpermw (twice: 32 entries).
  const __m512i lut = _mm512_broadcast_i64x4(_mm256_setr_epi16(
      0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0,
      (short)0x8000, (short)0xBF00, (short)0xBF80, (short)0xBFC0, (short)0xC000, (short)0xC040,
      (short)0xC080, (short)0xC0C0));
  // Rows x tokens accumulators must fit the 32 vector registers. Up to 4 tokens (decode) go row
  // by row: the weights then stream through memory in order, which the hardware prefetcher
  // follows best (4 rows at once split it into interleaved streams: batch-8 decode's experts
  // took 65 ms a step that way against 49 ms row by row, 4 layers of gpt-oss-20b).
  constexpr int kTileRows = M <= 4 ? 1 : 2;
  row_tiles<M, kTileRows>(r0, r1, y, ldy, bias, [&](auto& acc, int64_t r) {
    constexpr int R = std::extent_v<std::remove_reference_t<decltype(acc)>>;  // tile rows
    for (int64_t g0 = 0; g0 < G; g0 += 16) {    // 16 blocks' scales at a time
      const int n = (int)std::min<int64_t>(16, G - g0);
      __m512 s16[R];
      for (int i = 0; i < R; ++i) s16[i] = scale_vector(scales + (r + i) * G + g0, n);
      for (int q = 0; q * 4 < n; ++q) {
        const int64_t g = g0 + 4 * q;
        const int nb = (int)std::min<int64_t>(4, G - g);
        const __mmask64 bytes = nb == 4 ? ~0ull : (1ull << (16 * nb)) - 1;
        const __m512i spread = _mm512_load_si512(kQuadLanes[q]);
        for (int i = 0; i < R; ++i) {
          const __m512i v = _mm512_maskz_loadu_epi8(bytes, blocks + ((r + i) * G + g) * 16);
          // word j of the quad holds block j / 8's elements 4 (j % 8) .. 4 (j % 8) + 3, a nibble
          // each; vpermw reads an index's low 5 bits, and the table repeats after 16, so the
          // bit above each nibble needs no mask
          const __m512bh w0 = (__m512bh)_mm512_permutexvar_epi16(v, lut);
          const __m512bh w1 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), lut);
          const __m512bh w2 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), lut);
          const __m512bh w3 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), lut);
          const __m512 scale = _mm512_permutexvar_ps(spread, s16[i]);
          for (int m = 0; m < M; ++m) {
            const uint16_t* xm = x + m * Kp + g * 32;
            __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), w0, (__m512bh)_mm512_loadu_si512(xm));
            d = _mm512_dpbf16_ps(d, w1, (__m512bh)_mm512_loadu_si512(xm + 32));
            d = _mm512_dpbf16_ps(d, w2, (__m512bh)_mm512_loadu_si512(xm + 64));
            d = _mm512_dpbf16_ps(d, w3, (__m512bh)_mm512_loadu_si512(xm + 96));
            acc[i][m] = _mm512_fmadd_ps(d, scale, acc[i][m]);
          }
        }
      }
    }
  });
}

void tile_matmul_bf16(int M, const uint8_t* blocks, const uint8_t* scales, int64_t G,
                      const uint16_t* x, float* y, int64_t ldy, const float* bias, int64_t r0,
                      int64_t r1) {
  switch (M) {
    case 1: return rows_matmul_bf16<1>(blocks, scales, G, x, y, ldy, bias, r0, r1);
    case 2: return rows_matmul_bf16<2>(blocks, scales, G, x, y, ldy, bias, r0, r1);
    case 3: return rows_matmul_bf16<3>(blocks, scales, G, x, y, ldy, bias, r0, r1);
    case 4: return rows_matmul_bf16<4>(blocks, scales, G, x, y, ldy, bias, r0, r1);
    case 5: return rows_matmul_bf16<5>(blocks, scales, G, x, y, ldy, bias, r0, r1);
    case 6: return rows_matmul_bf16<6>(blocks, scales, G, x, y, ldy, bias, r0, r1);
    case 7: return rows_matmul_bf16<7>(blocks, scales, G, x, y, ldy, bias, r0, r1);
    default: return rows_matmul_bf16<8>(blocks, scales, G, x, y, ldy, bias, r0, r1);
  }
}
#endif

void tile_matmul(int M, const uint8_t* blocks, const uint8_t* scales, int64_t G, const float* x,
                 float* y, int64_t ldy, const float* bias, int64_t r0, int64_t r1) {
  if (M > 4) {
    tile_matmul(4, blocks, scales, G, x, y, ldy, bias, r0, r1);
    return tile_matmul(M - 4, blocks, scales, G, x + 4 * G * 32, y + 4 * ldy, ldy, bias, r0, r1);
  }
  switch (M) {
    case 1: return rows_matmul<1>(blocks, scales, G, x, y, ldy, bias, r0, r1);
    case 2: return rows_matmul<2>(blocks, scales, G, x, y, ldy, bias, r0, r1);
    case 3: return rows_matmul<3>(blocks, scales, G, x, y, ldy, bias, r0, r1);
    default: return rows_matmul<4>(blocks, scales, G, x, y, ldy, bias, r0, r1);
  }
}

// How activations are laid out for the kernels: one row of K inputs per (token, expert) pair.
//   F32Pairs:  float32, per block of 32 the even elements then the odd ones (rows_matmul);
//   Bf16Quads: bf16 in the order of rows_matmul_bf16's registers, padded to whole quads;
//   Bf16Plain: bf16 in element order, for the prefill panels (expert_matmul).
enum class Layout { F32Pairs, Bf16Quads, Bf16Plain };

struct Operand {
  Layout layout;
  int64_t K, stride;   // inputs per row; elements per stored row
  torch::Tensor data;  // (P, stride) float32, or int16 holding bf16 bits

  Operand(Layout layout_, int64_t P, int64_t K_) : layout(layout_), K(K_), stride(K_) {
#ifdef OSSGPT_BF16_KERNEL
    if (layout == Layout::Bf16Quads) stride = quads(K / 32) * 128;
#endif
    const bool f32 = layout == Layout::F32Pairs;
    data = torch::zeros({P, stride}, torch::TensorOptions().dtype(f32 ? torch::kFloat32 : torch::kInt16));
  }

  uint16_t* bf16_row(int64_t i) const {
    return reinterpret_cast<uint16_t*>(data.data_ptr<int16_t>()) + i * stride;
  }

  // Write row i from K floats, reordered so each packed nibble meets its input (see the kernels).
  void set_row(int64_t i, const float* src) {
    if (layout == Layout::F32Pairs) {   // per block: the 16 even elements, then the 16 odd ones
      float* dst = data.data_ptr<float>() + i * stride;
      for (int64_t g = 0; g < K; g += 32)
        for (int j = 0; j < 16; ++j) {
          dst[g + j] = src[g + 2 * j];
          dst[g + 16 + j] = src[g + 2 * j + 1];
        }
      return;
    }
#ifdef OSSGPT_BF16_KERNEL
    uint16_t* dst = bf16_row(i);
    const auto to_bf16 = [](const float* from, uint16_t* to) {   // 32 floats, nearest even
      _mm256_storeu_si256((__m256i*)to, (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(from)));
      _mm256_storeu_si256((__m256i*)(to + 16), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(from + 16)));
    };
    if (layout == Layout::Bf16Plain) {
      for (int64_t c = 0; c < K; c += 32) to_bf16(src + c, dst + c);
      return;
    }
    // per quad of blocks, four vectors of 32: vector i's word j holds element 4 (j % 8) + i of
    // block j / 8 (the padding stays zero)
    for (int64_t g = 0; g < K / 32; ++g) {
      const int64_t quad = g / 4, L = g % 4;
      uint16_t block[32];
      to_bf16(src + g * 32, block);
      for (int i = 0; i < 4; ++i)
        for (int t = 0; t < 8; ++t) dst[quad * 128 + i * 32 + L * 8 + t] = block[4 * t + i];
    }
#endif
  }
};

// One job: rows [r0, r1) of one expert's matrix, for all the tokens routed to it (in tiles of
// kMaxTokens, so the rows' packed weights stay in cache while each tile reads them).
struct Job {
  int64_t expert, r0, r1;
};

// Each used expert's rows in ranges sized so there are several jobs per thread, and small enough
// (256 KiB of weights, `row_bytes` each as the kernel holds them) to stay in a core's L2 cache
// while the token tiles pass over them.
std::vector<Job> make_jobs(const std::vector<int64_t>& starts, int64_t R, int64_t row_bytes) {
  const int64_t n_experts = (int64_t)starts.size() - 1;
  int64_t used = 0;
  for (int64_t e = 0; e < n_experts; ++e) used += starts[e + 1] > starts[e];
  const int64_t want = 8 * at::get_num_threads();
  int64_t chunk = std::max<int64_t>(kRows, R * used / std::max<int64_t>(want, 1));
  chunk = std::min<int64_t>(chunk, std::max<int64_t>(kRows, (256 << 10) / row_bytes));
  chunk = std::min<int64_t>(R, (chunk + kRows - 1) / kRows * kRows);
  std::vector<Job> jobs;
  for (int64_t e = 0; e < n_experts; ++e)
    if (starts[e + 1] > starts[e])
      for (int64_t r = 0; r < R; r += chunk) jobs.push_back({e, r, std::min(R, r + chunk)});
  return jobs;
}

// The biases (E, R) of the experts in use as float32, the others left unset: converting a bf16
// model's whole (E, R) bias on every call cost more than a decode step's other work here.
torch::Tensor used_biases(const torch::Tensor& bias, const std::vector<int64_t>& starts) {
  if (bias.dtype() == torch::kFloat32) return bias.contiguous();
  auto out = torch::empty(bias.sizes(), bias.options().dtype(torch::kFloat32));
  for (int64_t e = 0; e + 1 < (int64_t)starts.size(); ++e)
    if (starts[e + 1] > starts[e]) out[e].copy_(bias[e]);
  return out;
}

// y (P, R) = x @ W_e.T + b_e, each row of x multiplied by the expert its (token, slot) pair
// routes to; `starts` delimits each expert's rows of x.
torch::Tensor expert_matmul(const Operand& x, const std::vector<int64_t>& starts,
                            const torch::Tensor& blocks, const torch::Tensor& scales,
                            const torch::Tensor& bias) {
  const int64_t R = blocks.size(1), G = blocks.size(2), P = x.data.size(0), K = G * 32;
  auto y = torch::empty({P, R}, torch::TensorOptions().dtype(torch::kFloat32));
  const bool panels = x.layout == Layout::Bf16Plain;
  const auto jobs = make_jobs(starts, R, panels ? K * 2 : G * 17);
  const uint8_t* bp = blocks.data_ptr<uint8_t>();
  const uint8_t* sp = scales.data_ptr<uint8_t>();
  const float* biasp = bias.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (int64_t)jobs.size(), 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> panel;
    for (int64_t j = begin; j < end; ++j) {
      const Job& job = jobs[j];
      const uint8_t* wb = bp + job.expert * R * G * 16;
      const uint8_t* ws = sp + job.expert * R * G;
      const float* b = biasp + job.expert * R;
      const int64_t t0 = starts[job.expert], t_end = starts[job.expert + 1];
#ifdef OSSGPT_BF16_KERNEL
      if (panels) {   // many tokens: dequantize the rows once into a bf16 panel, then a GEMM
        panel.resize((job.r1 - job.r0) * K);
        decode_blocks_bf16(wb + job.r0 * G * 16, ws + job.r0 * G, (job.r1 - job.r0) * G, panel.data());
        ossgpt::gemm_bf16<4, 6>(panel.data(), K, job.r1 - job.r0, x.bf16_row(t0), x.stride, t_end - t0,
                                K, yp + t0 * R + job.r0, R, b + job.r0);
        continue;
      }
#endif
      for (int64_t t = t0; t < t_end; t += kMaxTokens) {
        const int n = (int)std::min<int64_t>(kMaxTokens, t_end - t);
#ifdef OSSGPT_BF16_KERNEL
        if (x.layout == Layout::Bf16Quads) {
          tile_matmul_bf16(n, wb, ws, G, x.bf16_row(t), yp + t * R, R, b, job.r0, job.r1);
          continue;
        }
#endif
        tile_matmul(n, wb, ws, G, x.data.data_ptr<float>() + t * x.stride, yp + t * R, R, b, job.r0,
                    job.r1);
      }
    }
  });
  return y;
}

}  // namespace

// x (N, C) float32 or bfloat16 (then the bf16 kernels run: the products are exact, the sums
// float32); indices (N, k) int64; gates (N, k) float32; mlp1 (E, 2I, C/32, 16) u8 +
// (E, 2I, C/32) u8 + bias (E, 2I) of any float dtype; mlp2 (E, C, I/32, 16) + (E, C, I/32) + (E, C).
// Returns sum_j gates[n, j] * expert_{indices[n, j]}(x[n]) as (N, C) float32.
torch::Tensor moe_forward(torch::Tensor x, torch::Tensor indices, torch::Tensor gates,
                          torch::Tensor mlp1_blocks, torch::Tensor mlp1_scales, torch::Tensor mlp1_bias,
                          torch::Tensor mlp2_blocks, torch::Tensor mlp2_scales, torch::Tensor mlp2_bias,
                          double limit, double alpha) {
  TORCH_CHECK(gates.dtype() == torch::kFloat32, "moe_forward: gates must be float32");
  TORCH_CHECK(indices.dtype() == torch::kInt64 && mlp1_blocks.dtype() == torch::kUInt8 &&
              mlp2_blocks.dtype() == torch::kUInt8, "moe_forward: bad index or weight dtype");
#ifdef OSSGPT_BF16_KERNEL
  const bool bf16 = x.dtype() == torch::kBFloat16;
#else
  const bool bf16 = false;
#endif
  x = x.to(torch::kFloat32).contiguous();
  indices = indices.contiguous(); gates = gates.contiguous();
  mlp1_blocks = mlp1_blocks.contiguous(); mlp1_scales = mlp1_scales.contiguous();
  mlp2_blocks = mlp2_blocks.contiguous(); mlp2_scales = mlp2_scales.contiguous();
  const int64_t N = x.size(0), C = x.size(1), k = indices.size(1);
  const int64_t E = mlp1_blocks.size(0), R1 = mlp1_blocks.size(1), I = R1 / 2;
  TORCH_CHECK(C % 32 == 0 && I % 32 == 0 && mlp1_blocks.size(2) == C / 32 &&
              mlp2_blocks.size(1) == C && mlp2_blocks.size(2) == I / 32,
              "moe_forward: weight shapes do not match x");

  // Group the (token, slot) pairs by expert: each expert's rows are contiguous in xs.
  const int64_t* idx = indices.data_ptr<int64_t>();
  const int64_t P = N * k;
  std::vector<int64_t> starts(E + 1, 0);
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(idx[p] >= 0 && idx[p] < E, "moe_forward: expert index out of range");
    ++starts[idx[p] + 1];
  }
  for (int64_t e = 0; e < E; ++e) starts[e + 1] += starts[e];
  mlp1_bias = used_biases(mlp1_bias, starts);
  mlp2_bias = used_biases(mlp2_bias, starts);
  std::vector<int64_t> order(P), fill(starts.begin(), starts.end() - 1);
  for (int64_t p = 0; p < P; ++p) order[fill[idx[p]]++] = p;

  // bf16 with many tokens per expert (prefill): weights dequantized once per panel of rows, then
  // a register-tiled GEMM; few tokens (decode): dequantized in registers, for each tile of tokens.
  int64_t used = 0;
  for (int64_t e = 0; e < E; ++e) used += starts[e + 1] > starts[e];
  const Layout layout = !bf16 ? Layout::F32Pairs
                        : P >= kPanelTokens * used ? Layout::Bf16Plain : Layout::Bf16Quads;
  Operand xs(layout, P, C);
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, P, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) xs.set_row(i, xp + (order[i] / k) * C);
  });

  // mlp1 -> (P, 2I), then the clamped SwiGLU of interleaved (gate, linear) columns -> (P, I).
  auto h1 = expert_matmul(xs, starts, mlp1_blocks, mlp1_scales, mlp1_bias);
  Operand h(layout, P, I);
  const float lim = (float)limit, a = (float)alpha;
  const float* h1p = h1.data_ptr<float>();
  at::parallel_for(0, P, 16, [&](int64_t b, int64_t e) {
    std::vector<float> row(I);
    for (int64_t i = b; i < e; ++i) {
#if defined(__AVX512F__)
      ossgpt::swiglu_row(h1p + i * R1, I, lim, a, row.data());
#else
      for (int64_t c = 0; c < I; ++c) {
        const float gate = std::min(h1p[i * R1 + 2 * c], lim);
        const float lin = std::clamp(h1p[i * R1 + 2 * c + 1], -lim, lim);
        row[c] = gate * (1.f / (1.f + std::exp(-a * gate))) * (lin + 1.f);
      }
#endif
      h.set_row(i, row.data());
    }
  });

  // mlp2 -> (P, C), then each token's gate-weighted sum over its k experts.
  auto y = expert_matmul(h, starts, mlp2_blocks, mlp2_scales, mlp2_bias);
  std::vector<int64_t> where(P);
  for (int64_t i = 0; i < P; ++i) where[order[i]] = i;
  auto out = torch::zeros({N, C}, x.options());
  const float* yp = y.data_ptr<float>();
  const float* gp = gates.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n)
      for (int64_t j = 0; j < k; ++j) {
        const float g = gp[n * k + j];
        const float* src = yp + where[n * k + j] * C;
        for (int64_t c = 0; c < C; ++c) op[n * C + c] += g * src[c];
      }
  });
  return out;
}

// blocks (..., G, 16) u8, scales (..., G) u8 -> bfloat16 (..., G * 32): the plain dequantize,
// threaded, for the plain path (LoRA-wrapped and float experts) that multiplies by whole experts.
torch::Tensor dequantize_bf16(torch::Tensor blocks, torch::Tensor scales) {
  blocks = blocks.contiguous(); scales = scales.contiguous();
  auto sizes = scales.sizes().vec();
  const int64_t G = scales.numel();
  sizes.back() *= 32;
  auto out = torch::empty(sizes, blocks.options().dtype(torch::kBFloat16));
  const uint8_t* b = blocks.data_ptr<uint8_t>();
  const uint8_t* s = scales.data_ptr<uint8_t>();
  auto* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, G, 4096, [&](int64_t g0, int64_t g1) {
    decode_blocks_bf16(b + g0 * 16, s + g0, g1 - g0, o + g0 * 32);
  });
  return out;
}
