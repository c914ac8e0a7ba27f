// MXFP4 weights read in place: decoding and the in-register products of decode (few tokens per
// expert). Layout (ossgpt/mxfp4.py): a weight row of K inputs is K/32 blocks of 16 bytes (two
// E2M1 codes a byte, low nibble = even element) and K/32 E8M0 scale bytes.
//
// Why hand-written: decode is bound by memory traffic, and PyTorch has no MXFP4 matmul, so the
// plain path writes a dequantized bf16 copy of every routed expert (4x the bytes) before
// multiplying. The plain version (ossgpt/model.py, MoE.grouped) is the reference.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "simd.h"

namespace ossgpt::mxfp4 {

constexpr float kFp4[16] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f,
                            -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

// 2**(s - 127) for every E8M0 byte, exactly as ossgpt.mxfp4 (0xFF is NaN); and half of it, for
// the products below, which decode each code as the integer 2 * E2M1.
struct Scales {
  float full[256], half[256];
  Scales() {
    for (int s = 0; s < 256; ++s) full[s] = std::ldexp(1.0f, s - 127), half[s] = std::ldexp(1.0f, s - 128);
    full[255] = half[255] = NAN;
  }
};
inline const Scales& scale_table() {
  static const Scales table;
  return table;
}

// Rows of n blocks -> 32 n bfloat16 in element order, exact as mxfp4.dequantize: an E2M1 value
// times a power of two is a bf16, so truncating the float32 product is exact (zero, subnormal,
// inf and NaN scales included).
inline void dequantize_bf16(const uint8_t* b, const uint8_t* s, int64_t n, uint16_t* out) {
#if defined(OSSGPT_AVX512)
  const __m512 lut = _mm512_loadu_ps(kFp4);
  const __m512i low4 = _mm512_set1_epi32(0x0F), high16 = _mm512_set1_epi32((int)0xFFFF0000u);
  for (int64_t g = 0; g < n; ++g) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(b + g * 16)));
    const __m512 sc = _mm512_set1_ps(scale_table().full[s[g]]);
    const __m512i even = _mm512_castps_si512(
        _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(bytes, low4), lut), sc));
    const __m512i odd = _mm512_castps_si512(
        _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), lut), sc));
    // 32-bit lane j holds elements 2j (low half) and 2j + 1 (high half): the bf16 pair in order
    _mm512_storeu_si512(out + g * 32,
                        _mm512_or_si512(_mm512_srli_epi32(even, 16), _mm512_and_si512(odd, high16)));
  }
#else
  for (int64_t g = 0; g < n; ++g) {
    const float sc = scale_table().full[s[g]];
    for (int j = 0; j < 32; ++j) {
      const float v = kFp4[(b[g * 16 + j / 2] >> (4 * (j % 2))) & 0x0F] * sc;
      uint32_t bits;
      std::memcpy(&bits, &v, sizeof bits);
      out[g * 32 + j] = (uint16_t)(bits >> 16);
    }
  }
#endif
}

// -- the generic products: float32 activations ---------------------------------------------------
//
// x is "pair-split": per block of 32 inputs, its 16 even elements then its 16 odd ones, the order
// in which every level's decode_block yields a block's codes.

constexpr int kBlockVectors = 32 / simd::W;

// One block's 32 codes as the integers 2 * E2M1 (exact in float32) in pair-split order.
inline void decode_block(const uint8_t* b, simd::F v[kBlockVectors]) {
#if defined(OSSGPT_AVX512)
  const __m512 lut = _mm512_setr_ps(0, 1, 2, 3, 4, 6, 8, 12, -0.f, -1, -2, -3, -4, -6, -8, -12);
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)b));
  v[0] = _mm512_permutexvar_ps(bytes, lut);                       // vpermps reads the low 4 bits
  v[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), lut);
#elif defined(OSSGPT_AVX2)
  // vpshufb looks each nibble up in a table of 16 signed bytes, then bytes -> int32 -> float
  const __m128i lut = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
  const __m128i bytes = _mm_loadu_si128((const __m128i*)b), low4 = _mm_set1_epi8(0x0F);
  const __m128i even = _mm_shuffle_epi8(lut, _mm_and_si128(bytes, low4));
  const __m128i odd = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(bytes, 4), low4));
  v[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(even));
  v[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(even, even)));
  v[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(odd));
  v[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(odd, odd)));
#elif defined(OSSGPT_NEON)
  const int8x16_t lut = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
  const uint8x16_t bytes = vld1q_u8(b);
  const int8x16_t codes[2] = {vqtbl1q_s8(lut, vandq_u8(bytes, vdupq_n_u8(0x0F))),
                              vqtbl1q_s8(lut, vshrq_n_u8(bytes, 4))};
  for (int h = 0; h < 2; ++h) {
    const int16x8_t lo = vmovl_s8(vget_low_s8(codes[h])), hi = vmovl_high_s8(codes[h]);
    v[4 * h + 0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
    v[4 * h + 1] = vcvtq_f32_s32(vmovl_high_s16(lo));
    v[4 * h + 2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
    v[4 * h + 3] = vcvtq_f32_s32(vmovl_high_s16(hi));
  }
#endif
}

// Row r's n blocks dequantized to float32 in pair-split order (exact): a panel row for prefill.
inline void dequantize_pairs(const uint8_t* b, const uint8_t* s, int64_t n, float* out) {
  const Scales& sc_table = scale_table();
  for (int64_t g = 0; g < n; ++g) {
    simd::F v[kBlockVectors];
    decode_block(b + g * 16, v);
    const simd::F sc = simd::set1(sc_table.half[s[g]]);
    for (int i = 0; i < kBlockVectors; ++i) simd::store(out + g * 32 + i * simd::W, simd::mul(v[i], sc));
  }
}

// x (K floats) -> pair-split order.
inline void to_pairs(const float* x, int64_t K, float* out) {
  for (int64_t g = 0; g < K; g += 32)
    for (int j = 0; j < 16; ++j) {
      out[g + j] = x[g + 2 * j];
      out[g + 16 + j] = x[g + 2 * j + 1];
    }
}

// y[m * ldy + r] = sum_k W[r, k] x[m, k] + bias[r] for rows [r0, r1) and M tokens of pair-split
// x (rows K apart). Per block, the integer codes meet x (exact products, float32 sums) and the
// block's sum is scaled once.
template <int M>
void rows_matmul(const uint8_t* blocks, const uint8_t* scales, int64_t G, const float* x,
                 float* y, int64_t ldy, const float* bias, int64_t r0, int64_t r1) {
  const int64_t K = G * 32;
  const Scales& sc_table = scale_table();
  // U accumulators per token, blocks taking turns: one token's chain of scaled sums would
  // otherwise wait on the fma's latency
  constexpr int U = M <= 4 ? 2 : 1;
  for (int64_t r = r0; r < r1; ++r) {
    simd::F acc[U][M];
    for (int u = 0; u < U; ++u)
      for (int m = 0; m < M; ++m) acc[u][m] = simd::zero();
    for (int64_t g = 0; g < G; ++g) {
      simd::F v[kBlockVectors];
      decode_block(blocks + (r * G + g) * 16, v);
      const simd::F sc = simd::set1(sc_table.half[scales[r * G + g]]);
      for (int m = 0; m < M; ++m) {
        const float* xm = x + m * K + g * 32;
        simd::F d = simd::mul(v[0], simd::load(xm));
        for (int i = 1; i < kBlockVectors; ++i) d = simd::fmadd(v[i], simd::load(xm + i * simd::W), d);
        acc[g % U][m] = simd::fmadd(d, sc, acc[g % U][m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      simd::F sum = acc[0][m];
      for (int u = 1; u < U; ++u) sum = simd::add(sum, acc[u][m]);
      y[m * ldy + r] = simd::reduce(sum) + bias[r];
    }
  }
}

// rows_matmul for 1..8 tokens, chosen at run time.
inline void tile_matmul(int M, const uint8_t* blocks, const uint8_t* scales, int64_t G, const float* x,
                        float* y, int64_t ldy, const float* bias, int64_t r0, int64_t r1) {
  with_tokens(M, [&](auto m) {
    rows_matmul<decltype(m)::value>(blocks, scales, G, x, y, ldy, bias, r0, r1);
  });
}

// -- bf16 activations as 16-bit integers (neon) ---------------------------------------------------
//
// The float32 products above spend most of their instructions turning codes into floats (on
// AVX2, 21 a block, where 2 cores' memory brings a block in the time of ~5). Here the codes stay
// integers and meet x as int16 in integer multiply-adds (smlal; x86 levels use 9-bit inputs as
// bytes, mxfp4_bytes.h).
// Each block of 32 inputs is held as integers on the scale of its largest element:
// q = x * 2**(15 - e), 2**(e - 1) <= max |x| < 2**e. A bf16 input within 2**7 of the block's
// largest is exact so; smaller ones are rounded to 2**(e - 16), a 2**-15 fraction of the largest
// (bf16 itself rounds each element to 2**-9 of its own size). The integer sums are exact
// (|sum| < 32 * 12 * 2**15 < 2**24), and so is each block's scaling. Used for bf16 models' decode
// (and the SwiGLU's float32 output between their two products, which the plain bf16 path rounds
// to bf16); float32 models keep the float products.

// The largest magnitude of a block of 32 inputs, true where there is one to scale the block by;
// false for a block of zeros (its scale 0) or one holding an inf or a NaN (its scale NaN: every
// sum it meets is NaN, as in the plain path). A NaN is kept where std::max would drop it.
inline bool block_amax(const float* b, float& amax, float& scale) {
  amax = 0.f;
  for (int j = 0; j < 32; ++j) {
    const float a = std::fabs(b[j]);
    amax = a > amax || a != a ? a : amax;
  }
  if (amax > 0.f && std::isfinite(amax)) return true;
  scale = amax == 0.f ? 0.f : NAN;
  return false;
}

// x (K floats) -> int16 in pair-split order, and each block's scale 2**(e - 15)
inline void to_i16_pairs(const float* x, int64_t K, int16_t* q, float* scale) {
  for (int64_t g = 0; g < K / 32; ++g) {
    const float* b = x + g * 32;
    int16_t* out = q + g * 32;
    float amax;
    if (!block_amax(b, amax, scale[g])) {
      std::fill(out, out + 32, int16_t(0));
      continue;
    }
    int e;
    std::frexp(amax, &e);
    const float up = std::ldexp(1.f, 15 - e);
    scale[g] = std::ldexp(1.f, e - 15);
    // |x| * up < 2**15; a float32 input (the SwiGLU's output) may round up to it
    auto to_int = [up](float v) { return (int16_t)std::clamp(std::nearbyint(v * up), -32767.f, 32767.f); };
    for (int j = 0; j < 16; ++j) {
      out[j] = to_int(b[2 * j]);
      out[16 + j] = to_int(b[2 * j + 1]);
    }
  }
}

// One block's codes (as the integers 2 * E2M1) dotted with its 32 int16 inputs (pair-split),
// exactly, as W partial sums in float32.
inline simd::F i16_block_dot(const uint8_t* b, const int16_t* q) {
#if defined(OSSGPT_NEON)
  const int8x16_t lut = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
  const uint8x16_t bytes = vld1q_u8(b);
  const int8x16_t even = vqtbl1q_s8(lut, vandq_u8(bytes, vdupq_n_u8(0x0F)));
  const int8x16_t odd = vqtbl1q_s8(lut, vshrq_n_u8(bytes, 4));
  int32x4_t sum = vmull_s16(vget_low_s16(vmovl_s8(vget_low_s8(even))), vld1_s16(q));
  sum = vmlal_high_s16(sum, vmovl_s8(vget_low_s8(even)), vld1q_s16(q));
  sum = vmlal_s16(sum, vget_low_s16(vmovl_high_s8(even)), vld1_s16(q + 8));
  sum = vmlal_high_s16(sum, vmovl_high_s8(even), vld1q_s16(q + 8));
  sum = vmlal_s16(sum, vget_low_s16(vmovl_s8(vget_low_s8(odd))), vld1_s16(q + 16));
  sum = vmlal_high_s16(sum, vmovl_s8(vget_low_s8(odd)), vld1q_s16(q + 16));
  sum = vmlal_s16(sum, vget_low_s16(vmovl_high_s8(odd)), vld1_s16(q + 24));
  sum = vmlal_high_s16(sum, vmovl_high_s8(odd), vld1q_s16(q + 24));
  return vcvtq_f32_s32(sum);
#endif
}

// rows_matmul for int16 x (pair-split rows of K, and K / 32 scales a row).
template <int M>
void rows_matmul_i16(const uint8_t* blocks, const uint8_t* scales, int64_t G, const int16_t* q,
                     const float* qscale, float* y, int64_t ldy, const float* bias, int64_t r0, int64_t r1) {
  const int64_t K = G * 32;
  const Scales& sc_table = scale_table();
  constexpr int U = M <= 4 ? 2 : 1;
  for (int64_t r = r0; r < r1; ++r) {
    simd::F acc[U][M];
    for (int u = 0; u < U; ++u)
      for (int m = 0; m < M; ++m) acc[u][m] = simd::zero();
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* b = blocks + (r * G + g) * 16;
      const float ws = sc_table.half[scales[r * G + g]];
      for (int m = 0; m < M; ++m)
        acc[g % U][m] = simd::fmadd(i16_block_dot(b, q + m * K + g * 32), simd::set1(ws * qscale[m * G + g]),
                                    acc[g % U][m]);
    }
    for (int m = 0; m < M; ++m) {
      simd::F sum = acc[0][m];
      for (int u = 1; u < U; ++u) sum = simd::add(sum, acc[u][m]);
      y[m * ldy + r] = simd::reduce(sum) + bias[r];
    }
  }
}

inline void tile_matmul_i16(int M, const uint8_t* blocks, const uint8_t* scales, int64_t G, const int16_t* q,
                            const float* qscale, float* y, int64_t ldy, const float* bias, int64_t r0, int64_t r1) {
  with_tokens(M, [&](auto m) {
    rows_matmul_i16<decltype(m)::value>(blocks, scales, G, q, qscale, y, ldy, bias, r0, r1);
  });
}

#if defined(OSSGPT_BF16_DOT)
// -- bf16 activations with vdpbf16ps (the avx512bf16 level) --------------------------------------
//
// Weights become bf16 in registers (exact) and vdpbf16ps multiplies 32 pairs per instruction.
// Blocks go four at a time (64 bytes, one 128-bit lane each). Shuffles limit this loop, so each
// 16-bit word's four nibbles are shifted into place and looked up in a word table by vpermw
// (4 shuffles per quad; byte tables and unpacks took 8: 14 GB/s a core against 17, one token,
// weights in L2): vector i holds, in word j, element 4 (j % 8) + i of block j / 8. x is laid out
// the same way (to_quads); a last partial quad is loaded masked (zeros).

// Lanes of a quad's scale vector: 4 fp32 lanes per block (vdpbf16ps sums pairs of 16-bit lanes).
alignas(64) inline const int32_t kQuadLanes[4][16] = {
    {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3},
    {4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7},
    {8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11},
    {12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15}};

// 2**(s - 127) of n <= 16 E8M0 bytes as floats, exact: the byte is the float's exponent field,
// except 0 (the subnormal 2**-127) and 0xFF (NaN).
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

// x (K floats) -> bf16 in the quad order (Kp = quads(K / 32) * 128 words, the padding zero).
inline void to_quads(const float* x, int64_t K, uint16_t* out) {
  const int64_t Kp = quads(K / 32) * 128;
  std::memset(out, 0, Kp * 2);
  for (int64_t g = 0; g < K / 32; ++g) {
    const int64_t quad = g / 4, L = g % 4;
    uint16_t block[32];
    _mm256_storeu_si256((__m256i*)block, (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + g * 32)));
    _mm256_storeu_si256((__m256i*)(block + 16), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + g * 32 + 16)));
    for (int i = 0; i < 4; ++i)
      for (int t = 0; t < 8; ++t) out[quad * 128 + i * 32 + L * 8 + t] = block[4 * t + i];
  }
}

// The register tiling of rows_matmul_bf16: rows [r0, r1) in tiles of kTileRows rows (then single
// rows), each with zeroed accumulators acc[R][M] that `step(acc, r)` fills; then
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

inline void tile_matmul_bf16(int M, const uint8_t* blocks, const uint8_t* scales, int64_t G,
                             const uint16_t* x, float* y, int64_t ldy, const float* bias, int64_t r0,
                             int64_t r1) {
  with_tokens(M, [&](auto m) {
    rows_matmul_bf16<decltype(m)::value>(blocks, scales, G, x, y, ldy, bias, r0, r1);
  });
}

#endif

}  // namespace ossgpt::mxfp4
