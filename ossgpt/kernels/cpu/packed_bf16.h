// The 12-bit packed bf16 weights (the format and its plain reference: ossgpt/packed_bf16.py):
// packing, unpacking, and decoding in registers for the decode products (linear.h).
//
// Format of a weight (R, K), K % 64 == 0, per chunk of 64 elements of a row:
//   sm:  64 bytes, sign << 7 | 7 mantissa bits; byte 16 L + 8 h + i holds element 32 h + 8 L + i
//        (the order in which AVX-512's vpunpck{l,h}bw yield them in order);
//   nib: 32 bytes, exponent - base in 1..15 (0: a zero, or a listed element); byte j holds
//        element j (low nibble) and 32 + j (high);
// plus the row's base, and its listed elements (outside the 15-exponent window) as CSR.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "simd.h"

namespace ossgpt::packed {

struct PackedBF16 {
  const uint8_t* sm;     // (R, K)
  const uint8_t* nib;    // (R, K / 2)
  const uint8_t* base;   // (R,)
  const int64_t* ptr;    // (R + 1,) row r's listed elements are [ptr[r], ptr[r + 1])
  const int32_t* col;    // their columns
  const float* val;      // and values
  int64_t K;
};

constexpr int kWindow = 15;          // exponents base + 1 .. base + 15: nibbles 1..15

// Row r's listed elements dotted with x (bf16, element order).
inline float listed_dot(const PackedBF16& w, int64_t r, const uint16_t* x) {
  float sum = 0.f;
  for (int64_t p = w.ptr[r]; p < w.ptr[r + 1]; ++p) sum += bf16_to_float(x[w.col[p]]) * w.val[p];
  return sum;
}

// -- decoding in registers -----------------------------------------------------------------------
//
// A chunk's 64 elements come back in two halves of 32 / W float vectors each, in an order of
// lanes that suits each level's shuffles; `order(p)` says which element lane p of the half's
// vectors (p = 32 h + W i + lane) holds, and the products lay x out the same way. `words` gives
// the bf16 words in element order (unpacking).

#if defined(OSSGPT_AVX512)
// vpermw's table for a row: entry i = (base + i) << 7 (the exponent field), entry 0 = 0 (nothing
// of an element outside the window; its value comes from the list). Repeated at 16..31 because
// vpermw reads 5 index bits and the nibble above leaks into the fifth.
inline __m512i exponent_table(uint8_t base) {
  const __m512i i = _mm512_and_si512(_mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16,
                                                      15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                     _mm512_set1_epi16(15));
  const __m512i e = _mm512_slli_epi16(_mm512_add_epi16(i, _mm512_set1_epi16(base)), 7);
  return _mm512_maskz_mov_epi16(0xFFFEFFFEu, e);
}

// Elements [c, c + 64) of row r (c % 64 == 0) as bf16 words: lo = c..c+31, hi = c+32..c+63.
// vpunpck{l,h}bw of the sm vector with itself yields its bytes in order, each doubled:
// (b << 8 | b) & 0x807F keeps the sign at bit 15 and the mantissa at 0..6, the exponent ORs in.
inline void decode64(const PackedBF16& w, int64_t r, int64_t c, __m512i table, __m512i& lo, __m512i& hi) {
  const __m512i keep = _mm512_set1_epi16((short)0x807F);
  const __m512i nib = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(w.nib + r * (w.K / 2) + c / 2)));
  const __m512i sm = _mm512_loadu_si512(w.sm + r * w.K + c);
  // ternary logic 0xEA: (a & b) | c
  lo = _mm512_ternarylogic_epi32(_mm512_unpacklo_epi8(sm, sm), keep, _mm512_permutexvar_epi16(nib, table), 0xEA);
  hi = _mm512_ternarylogic_epi32(_mm512_unpackhi_epi8(sm, sm), keep,
                                 _mm512_permutexvar_epi16(_mm512_srli_epi16(nib, 4), table), 0xEA);
}

struct RowDecoder {
  __m512i table;
  explicit RowDecoder(uint8_t base) : table(exponent_table(base)) {}

  void words(const PackedBF16& w, int64_t r, int64_t c, uint16_t* row) const {
    __m512i lo, hi;
    decode64(w, r, c, table, lo, hi);
    _mm512_storeu_si512(row + c, lo);
    _mm512_storeu_si512(row + c + 32, hi);
  }

  // half h: elements 32 h + (lanes of 128 bits take 4 words each from the half's 8-word groups)
  void f32(const PackedBF16& w, int64_t r, int64_t c, int h, simd::F out[2]) const {
    __m512i lo, hi;
    decode64(w, r, c, table, lo, hi);
    const __m512i words = h ? hi : lo, zero = _mm512_setzero_si512();
    out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, words));
    out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, words));
  }
};

inline int order(int p) {
  const int h = p / 32, i = p % 32 / 16, j = p % 16;
  return 32 * h + 8 * (j / 4) + 4 * i + j % 4;
}

#elif defined(OSSGPT_AVX2)
// Bytes, then words: vpshufb looks each exponent nibble up in two tables of the bf16 word's
// bytes, hi = sign << 7 | exponent >> 1 and lo = (exponent & 1) << 7 | mantissa, 32 elements an
// instruction, where widening the nibbles to words first and computing (base + n) << 7 there took
// more instructions (Zen 1, one thread, weights in L2: 2.04 multiply-adds a cycle became 2.3).
struct RowDecoder {
  __m256i hi_table, lo_table;   // entry n: the bits of exponent base + n in each byte; 0 for n = 0
  explicit RowDecoder(uint8_t base) {
    const __m256i n = _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                                       0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m256i e = _mm256_add_epi8(n, _mm256_set1_epi8((char)base));      // base + n <= 255
    const __m256i listed = _mm256_cmpeq_epi8(n, _mm256_setzero_si256());
    hi_table = _mm256_andnot_si256(listed, _mm256_and_si256(_mm256_srli_epi16(e, 1), _mm256_set1_epi8(0x7F)));
    lo_table = _mm256_andnot_si256(listed, _mm256_and_si256(_mm256_slli_epi16(e, 7), _mm256_set1_epi8((char)0x80)));
  }

  // half h as bf16 words: a = elements 16 h .. 16 h + 15, b = 32 + 16 h .. 32 + 16 h + 15 (the
  // sm bytes of a 128-bit lane hold 8 of each; nib's 8 bytes for that lane, low nibbles then
  // high, line up with them)
  void half_words(const PackedBF16& w, int64_t r, int64_t c, int h, __m256i& a, __m256i& b) const {
    const __m256i sm = _mm256_loadu_si256((const __m256i*)(w.sm + r * w.K + c + 32 * h));
    const __m128i nib = _mm_loadu_si128((const __m128i*)(w.nib + r * (w.K / 2) + c / 2 + 16 * h));
    const __m128i low = _mm_and_si128(nib, _mm_set1_epi8(15));
    const __m128i high = _mm_and_si128(_mm_srli_epi16(nib, 4), _mm_set1_epi8(15));
    const __m256i n = _mm256_set_m128i(_mm_unpackhi_epi64(low, high), _mm_unpacklo_epi64(low, high));
    const __m256i hi = _mm256_or_si256(_mm256_and_si256(sm, _mm256_set1_epi8((char)0x80)),
                                       _mm256_shuffle_epi8(hi_table, n));
    const __m256i lo = _mm256_or_si256(_mm256_and_si256(sm, _mm256_set1_epi8(0x7F)), _mm256_shuffle_epi8(lo_table, n));
    a = _mm256_unpacklo_epi8(lo, hi);
    b = _mm256_unpackhi_epi8(lo, hi);
  }

  void words(const PackedBF16& w, int64_t r, int64_t c, uint16_t* row) const {
    for (int h = 0; h < 2; ++h) {
      __m256i a, b;
      half_words(w, r, c, h, a, b);
      _mm256_storeu_si256((__m256i*)(row + c + 16 * h), a);
      _mm256_storeu_si256((__m256i*)(row + c + 32 + 16 * h), b);
    }
  }

  void f32(const PackedBF16& w, int64_t r, int64_t c, int h, simd::F out[4]) const {
    __m256i a, b;
    half_words(w, r, c, h, a, b);
    const __m256i zero = _mm256_setzero_si256();
    out[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, a));
    out[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, a));
    out[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, b));
    out[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, b));
  }
};

inline int order(int p) {
  const int h = p / 32, i = p % 32 / 8, j = p % 8;
  return (i / 2 ? 32 : 0) + 16 * h + 8 * (j / 4) + 4 * (i % 2) + j % 4;
}

#elif defined(OSSGPT_NEON)
struct RowDecoder {
  uint8x16_t base;
  explicit RowDecoder(uint8_t b) : base(vdupq_n_u8(b)) {}

  // group L of the chunk as bf16 words: [0] = elements 8 L .. 8 L + 7, [1] = 32 + 8 L .. + 7
  // (sm's 16 bytes of group L hold both, in that order; nib's bytes 8 L .. 8 L + 7 their
  // exponents, low and high nibbles)
  uint8x16x2_t group_words(const PackedBF16& w, int64_t r, int64_t c, int L) const {
    const uint8x16_t sm = vld1q_u8(w.sm + r * w.K + c + 16 * L);
    const uint8x8_t nib = vld1_u8(w.nib + r * (w.K / 2) + c / 2 + 8 * L);
    const uint8x16_t n = vcombine_u8(vand_u8(nib, vdup_n_u8(15)), vshr_n_u8(nib, 4));
    const uint8x16_t e = vandq_u8(vaddq_u8(n, base), vtstq_u8(n, n));   // base + n <= 255
    const uint8x16_t hi = vorrq_u8(vandq_u8(sm, vdupq_n_u8(0x80)), vshrq_n_u8(e, 1));
    const uint8x16_t lo = vorrq_u8(vshlq_n_u8(e, 7), vandq_u8(sm, vdupq_n_u8(0x7F)));
    return vzipq_u8(lo, hi);     // little-endian words: low byte first
  }

  void words(const PackedBF16& w, int64_t r, int64_t c, uint16_t* row) const {
    for (int L = 0; L < 4; ++L) {
      const uint8x16x2_t g = group_words(w, r, c, L);
      vst1q_u16(row + c + 8 * L, vreinterpretq_u16_u8(g.val[0]));
      vst1q_u16(row + c + 32 + 8 * L, vreinterpretq_u16_u8(g.val[1]));
    }
  }

  void f32(const PackedBF16& w, int64_t r, int64_t c, int h, simd::F out[8]) const {
    for (int q = 0; q < 2; ++q) {
      const uint8x16x2_t g = group_words(w, r, c, 2 * h + q);
      for (int s = 0; s < 2; ++s) {
        const uint16x8_t words = vreinterpretq_u16_u8(g.val[s]);
        out[4 * q + 2 * s] = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(words), 16));
        out[4 * q + 2 * s + 1] = vreinterpretq_f32_u32(vshll_high_n_u16(words, 16));
      }
    }
  }
};

inline int order(int p) {
  const int h = p / 32, i = p % 32 / 4, j = p % 4;
  const int L = 2 * h + i / 4, s = i % 4;
  return (s / 2 ? 32 : 0) + 8 * L + 4 * (s % 2) + j;
}
#endif

// -- packing and unpacking -----------------------------------------------------------------------

inline int exponent(uint16_t v) { return (v >> 7) & 0xFF; }
inline bool is_zero(uint16_t v) { return (v & 0x7FFF) == 0; }
inline bool in_window(uint16_t v, int base) { return exponent(v) > base && exponent(v) <= base + kWindow; }

// The base whose window holds the most of the row's nonzero elements (the lowest such base).
inline int best_base(const uint16_t* row, int64_t K) {
  int64_t hist[256] = {0};
  for (int64_t k = 0; k < K; ++k)
    if (!is_zero(row[k])) hist[exponent(row[k])]++;
  int64_t n = 0;
  for (int e = 1; e <= kWindow; ++e) n += hist[e];
  int best = 0;
  int64_t most = n;
  for (int b = 1; b + kWindow <= 255; ++b) {
    n += hist[b + kWindow] - hist[b];
    if (n > most) most = n, best = b;
  }
  return best;
}

// How many of a row's elements the list takes, for its base.
inline int64_t listed_count(const uint16_t* row, int64_t K, int base) {
  int64_t n = 0;
  for (int64_t k = 0; k < K; ++k) n += !is_zero(row[k]) && !in_window(row[k], base);
  return n;
}

// One row into sm, nib and its listed elements (col, val) from position q on.
inline void pack_row(const uint16_t* row, int64_t K, int base, uint8_t* sm, uint8_t* nib, int32_t* col,
                     float* val, int64_t q) {
  for (int64_t c = 0; c < K; c += 64) {
    uint8_t s[64], n[64];
    for (int j = 0; j < 64; ++j) {
      const uint16_t v = row[c + j];
      s[j] = (uint8_t)(((v >> 8) & 0x80) | (v & 0x7F));
      n[j] = 0;
      if (in_window(v, base)) {
        n[j] = (uint8_t)(exponent(v) - base);
      } else if (!is_zero(v)) {     // listed: nothing in the packed bits
        s[j] = 0;
        col[q] = (int32_t)(c + j);
        val[q++] = bf16_to_float(v);
      }
    }
    for (int L = 0; L < 4; ++L)
      for (int h = 0; h < 2; ++h)
        for (int i = 0; i < 8; ++i) sm[c + 16 * L + 8 * h + i] = s[32 * h + 8 * L + i];
    for (int j = 0; j < 32; ++j) nib[c / 2 + j] = (uint8_t)(n[j] | n[j + 32] << 4);
  }
}

// Row r back to bf16, bit for bit.
inline void unpack_row(const PackedBF16& w, int64_t r, uint16_t* row) {
  const RowDecoder decoder(w.base[r]);
  for (int64_t c = 0; c < w.K; c += 64) decoder.words(w, r, c, row);
  for (int64_t p = w.ptr[r]; p < w.ptr[r + 1]; ++p) {
    uint32_t bits;
    std::memcpy(&bits, &w.val[p], 4);
    row[w.col[p]] = (uint16_t)(bits >> 16);
  }
}

// -- read ahead, for the tiled products ----------------------------------------------------------

// Rows [r, r + n) brought into L2 a few cache lines per step(), spread over `steps` calls, while
// the rows before them are computed. A tile of several rows computes from cache at about twice
// the speed the hardware prefetchers alone fed it, streaming its rows' interleaved sm and nib
// from memory (figures at linear.h's packed_tile).
struct RowPrefetch {
  const char *sm, *nib;
  int64_t sm_lines, lines, per_step, line = 0;

  RowPrefetch(const PackedBF16& w, int64_t r, int64_t n, int64_t steps)
      : sm((const char*)(w.sm + r * w.K)), nib((const char*)(w.nib + r * (w.K / 2))),
        sm_lines(n * w.K / 64), lines(n * w.K * 3 / 128),
        per_step(steps > 0 ? (lines + steps - 1) / steps : 0) {}

  void step() {
    for (int64_t end = std::min(lines, line + per_step); line < end; ++line)
      __builtin_prefetch(line < sm_lines ? sm + 64 * line : nib + 64 * (line - sm_lines), 0, 2);
  }
};

}  // namespace ossgpt::packed
