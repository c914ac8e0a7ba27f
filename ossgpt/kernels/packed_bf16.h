// Reading the 12-bit packed bf16 weights (the format and its plain reference: ossgpt/packed_bf16.py).
// A row's elements come back 64 at a time as two vectors of bf16 words, ready for vdpbf16ps:
// 6 shuffle or logic instructions for 96 bytes, where the memory bus takes longer to bring them.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace ossgpt {

struct PackedBF16 {
  const uint8_t* sm;     // (R, K) sign << 7 | mantissa, in the order of `decode64`
  const uint8_t* nib;    // (R, K / 2) exponent - base (1..15), 0 for a zero or a listed element
  const uint8_t* base;   // (R,)
  const int64_t* ptr;    // (R + 1,) row r's listed elements are [ptr[r], ptr[r + 1])
  const int32_t* col;    // their columns
  const float* val;      // and values
  int64_t K;
};

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
// The nibble byte j holds elements j (low) and 32 + j (high) of the 64; the sm bytes are stored
// so that vpunpck{l,h}bw of the vector with itself yields them in order, each byte doubled:
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

// Rows [r, r + n) brought into L2 a few cache lines per step(), spread over `steps` calls, while
// the rows before them are computed. A tile of several rows computes from cache at about twice
// the speed the hardware prefetchers alone fed it, streaming its rows' interleaved sm and nib
// from memory (figures at linear_cpu.cpp's packed_tile).
struct RowPrefetch {
  const char *sm, *nib;
  int64_t sm_lines, lines, per_step, line = 0;

  RowPrefetch(const PackedBF16& w, int64_t r, int64_t n, int64_t steps)
      : sm((const char*)(w.sm + r * w.K)), nib((const char*)(w.nib + r * (w.K / 2))),
        sm_lines(n * w.K / 64), lines(n * w.K * 3 / 128),
        per_step(steps > 0 ? (lines + steps - 1) / steps : 0) {}

  void step() {
    for (int64_t end = std::min(lines, line + per_step); line < end; ++line)
      _mm_prefetch(line < sm_lines ? sm + 64 * line : nib + 64 * (line - sm_lines), _MM_HINT_T1);
  }
};

inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Row r's listed elements (outside its exponent window) dotted with x.
inline float listed_dot(const PackedBF16& w, int64_t r, const uint16_t* x) {
  float sum = 0.f;
  for (int64_t p = w.ptr[r]; p < w.ptr[r + 1]; ++p) sum += bf16_to_float(x[w.col[p]]) * w.val[p];
  return sum;
}

}  // namespace ossgpt
