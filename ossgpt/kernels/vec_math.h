// Vector math for the kernels: exp for 16 floats at once (glibc's expf is scalar, and a decode
// step takes a few hundred thousand of them, in softmaxes and the experts' SwiGLU).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace ossgpt {

// Cephes' expf: exp(x) = 2**n * e**r with |r| <= ln(2) / 2 and a degree-6 polynomial for e**r;
// within 2 ulp of expf. Below -104 the result is 0 (expf underflows there too), -inf included.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.72f)), _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// gpt-oss's clamped SwiGLU (model.swiglu) of one row of 2 I interleaved (gate, linear) columns
// -> I floats; I % 16 == 0.
inline void swiglu_row(const float* h, int64_t I, float limit, float alpha, float* out) {
  alignas(64) static const int32_t even[16] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  alignas(64) static const int32_t odd[16] = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  const __m512i ie = _mm512_load_si512(even), io = _mm512_load_si512(odd);
  const __m512 lim = _mm512_set1_ps(limit), one = _mm512_set1_ps(1.f), neg_alpha = _mm512_set1_ps(-alpha);
  for (int64_t c = 0; c < I; c += 16) {
    const __m512 a = _mm512_loadu_ps(h + 2 * c), b = _mm512_loadu_ps(h + 2 * c + 16);
    const __m512 gate = _mm512_min_ps(_mm512_permutex2var_ps(a, ie, b), lim);
    const __m512 lin = _mm512_max_ps(_mm512_min_ps(_mm512_permutex2var_ps(a, io, b), lim),
                                     _mm512_sub_ps(_mm512_setzero_ps(), lim));
    const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_mul_ps(neg_alpha, gate))));
    _mm512_storeu_ps(out + c, _mm512_mul_ps(_mm512_mul_ps(gate, sig), _mm512_add_ps(lin, one)));
  }
}

}  // namespace ossgpt
