// The vector layer every kernel is written against: a float vector F of W lanes and the few
// operations the kernels need, for the instruction set this file is compiled for. ossgpt
// compiles the kernels once per level (ossgpt/kernels/build.py) with that level's flags:
//   avx2        AVX2 + FMA + F16C          W = 8,  16 registers
//   avx512      AVX-512 F/BW/VL/DQ         W = 16, 32 registers
//   avx512bf16  the same + AVX512_BF16     (adds the vdpbf16ps kernels: OSSGPT_BF16_DOT)
//   neon        aarch64 Advanced SIMD      W = 4,  32 registers
// Nothing here includes torch: the cores build into a native test harness too, which runs the
// NEON level under qemu on x86 machines (tests/native/).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define OSSGPT_AVX512 1
#if defined(__AVX512BF16__)
#define OSSGPT_BF16_DOT 1   // exact bf16 products, float32 sums, 32 pairs an instruction
#endif
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define OSSGPT_AVX2 1
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define OSSGPT_NEON 1
#else
#error "ossgpt's CPU kernels need AVX2 + FMA + F16C, AVX-512 (F/BW/VL/DQ) or aarch64 NEON"
#endif

namespace ossgpt {

// -- scalar bf16 -------------------------------------------------------------------------------

inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even, as torch's .to(torch.bfloat16) (a NaN stays a quiet NaN).
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

namespace simd {

#if defined(OSSGPT_AVX512)
constexpr const char* kLevel =
#if defined(OSSGPT_BF16_DOT)
    "avx512bf16";
#else
    "avx512";
#endif
using F = __m512;
constexpr int W = 16;
constexpr int kRegisters = 32;

inline F zero() { return _mm512_setzero_ps(); }
inline F set1(float v) { return _mm512_set1_ps(v); }
inline F load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, F v) { _mm512_storeu_ps(p, v); }
inline F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
inline F add(F a, F b) { return _mm512_add_ps(a, b); }
inline F sub(F a, F b) { return _mm512_sub_ps(a, b); }
inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
inline F div(F a, F b) { return _mm512_div_ps(a, b); }
inline F min(F a, F b) { return _mm512_min_ps(a, b); }
inline F max(F a, F b) { return _mm512_max_ps(a, b); }
inline float reduce(F v) { return _mm512_reduce_add_ps(v); }
inline F load_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline void store_bf16(uint16_t* p, F v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(r));
}
// even and odd elements of p[0, 2W)
inline void deinterleave(const float* p, F& even, F& odd) {
  alignas(64) static const int32_t e[16] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  alignas(64) static const int32_t o[16] = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  const F a = load(p), b = load(p + W);
  even = _mm512_permutex2var_ps(a, _mm512_load_si512(e), b);
  odd = _mm512_permutex2var_ps(a, _mm512_load_si512(o), b);
}
inline F round_nearest(F v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline F pow2(F n) { return _mm512_scalef_ps(set1(1.f), n); }   // 2**n, n integral in [-126, 127]
inline F keep_if_ge(F v, F x, float bound) {                   // v where x >= bound, else 0
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, set1(bound), _CMP_GE_OQ), v);
}

#elif defined(OSSGPT_AVX2)
constexpr const char* kLevel = "avx2";
using F = __m256;
constexpr int W = 8;
constexpr int kRegisters = 16;

inline F zero() { return _mm256_setzero_ps(); }
inline F set1(float v) { return _mm256_set1_ps(v); }
inline F load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, F v) { _mm256_storeu_ps(p, v); }
inline F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
inline F add(F a, F b) { return _mm256_add_ps(a, b); }
inline F sub(F a, F b) { return _mm256_sub_ps(a, b); }
inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
inline F div(F a, F b) { return _mm256_div_ps(a, b); }
inline F min(F a, F b) { return _mm256_min_ps(a, b); }
inline F max(F a, F b) { return _mm256_max_ps(a, b); }
inline float reduce(F v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline F load_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline void store_bf16(uint16_t* p, F v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  _mm_storeu_si128((__m128i*)p, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
inline void deinterleave(const float* p, F& even, F& odd) {
  const F a = load(p), b = load(p + W);
  // in-lane shuffles give (a0 a2 b0 b2 | a4 a6 b4 b6); the 64-bit permute puts a's before b's
  even = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
  odd = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
}
inline F round_nearest(F v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline F pow2(F n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline F keep_if_ge(F v, F x, float bound) { return _mm256_and_ps(v, _mm256_cmp_ps(x, set1(bound), _CMP_GE_OQ)); }

#elif defined(OSSGPT_NEON)
constexpr const char* kLevel = "neon";
using F = float32x4_t;
constexpr int W = 4;
constexpr int kRegisters = 32;

inline F zero() { return vdupq_n_f32(0.f); }
inline F set1(float v) { return vdupq_n_f32(v); }
inline F load(const float* p) { return vld1q_f32(p); }
inline void store(float* p, F v) { vst1q_f32(p, v); }
inline F fmadd(F a, F b, F c) { return vfmaq_f32(c, a, b); }
inline F add(F a, F b) { return vaddq_f32(a, b); }
inline F sub(F a, F b) { return vsubq_f32(a, b); }
inline F mul(F a, F b) { return vmulq_f32(a, b); }
inline F div(F a, F b) { return vdivq_f32(a, b); }
inline F min(F a, F b) { return vminq_f32(a, b); }
inline F max(F a, F b) { return vmaxq_f32(a, b); }
inline float reduce(F v) { return vaddvq_f32(v); }
inline F load_bf16(const uint16_t* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
inline void store_bf16(uint16_t* p, F v) {
  const uint32x4_t bits = vreinterpretq_u32_f32(v);
  const uint32x4_t odd = vandq_u32(vshrq_n_u32(bits, 16), vdupq_n_u32(1));
  uint32x4_t r = vshrq_n_u32(vaddq_u32(bits, vaddq_u32(odd, vdupq_n_u32(0x7FFF))), 16);
  r = vbslq_u32(vceqq_f32(v, v), r, vdupq_n_u32(0x7FC0));    // v != v: NaN
  vst1_u16(p, vmovn_u32(r));
}
inline void deinterleave(const float* p, F& even, F& odd) {
  const float32x4x2_t pair = vld2q_f32(p);
  even = pair.val[0];
  odd = pair.val[1];
}
inline F round_nearest(F v) { return vrndnq_f32(v); }
inline F pow2(F n) {
  return vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127)), 23));
}
inline F keep_if_ge(F v, F x, float bound) {
  return vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(v), vcgeq_f32(x, set1(bound))));
}
#endif

// exp of W floats. Cephes' expf: exp(x) = 2**n e**r, |r| <= ln(2) / 2, a degree-6 polynomial for
// e**r; within 2 ulp of expf. Below -87.33 (where expf turns subnormal) the result is 0, -inf
// included; above 88.38 it is the value at 88.38 (expf overflows at 88.72).
inline F exp(F x) {
  const F clamped = max(min(x, set1(88.3762626647949f)), set1(-87.3365447505531f));
  const F n = round_nearest(mul(clamped, set1(1.44269504088896341f)));
  F r = fmadd(n, set1(-0.693359375f), clamped);
  r = fmadd(n, set1(2.12194440e-4f), r);
  F p = set1(1.9875691500e-4f);
  p = fmadd(p, r, set1(1.3981999507e-3f));
  p = fmadd(p, r, set1(8.3334519073e-3f));
  p = fmadd(p, r, set1(4.1665795894e-2f));
  p = fmadd(p, r, set1(1.6666665459e-1f));
  p = fmadd(p, r, set1(5.0000001201e-1f));
  p = fmadd(p, mul(r, r), add(r, set1(1.f)));
  return keep_if_ge(mul(p, pow2(n)), x, -87.3365447505531f);
}

}  // namespace simd

// f(std::integral_constant<int, n>) for a run-time token count n in 1..8 (more: 8): a tile keeps
// its accumulators in registers only for a count known when it is compiled.
template <class F>
inline void with_tokens(int n, F f) {
  switch (n) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

}  // namespace ossgpt
