// The 12-bit packed bf16 format's conversions, threaded (the format and the plain reference they
// are tested against bit for bit: ossgpt/packed_bf16.py). Packing a 20b model's dense weights
// (2.4 GB) takes about 3 s on 2 cores, where the Python reference would take minutes.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include "packed_bf16.h"

namespace {
constexpr int kWindow = 15;          // exponents base + 1 .. base + 15: nibbles 1..15
constexpr int64_t kRowsPerTask = 64;

inline int exponent(uint16_t v) { return (v >> 7) & 0xFF; }
inline bool is_zero(uint16_t v) { return (v & 0x7FFF) == 0; }
inline bool in_window(uint16_t v, int base) { return exponent(v) > base && exponent(v) <= base + kWindow; }

// The base whose window holds the most of the row's nonzero elements (the lowest such base).
int best_base(const uint16_t* row, int64_t K) {
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
}  // namespace

// weight (R, K) bf16, K % 64 == 0; writes sm (R, K), nib (R, K / 2) and base (R,), uint8, which
// the caller allocates (in huge pages, for decode's streaming reads) -> [ptr, col, val].
std::vector<torch::Tensor> pack_bf16(torch::Tensor weight, torch::Tensor sm, torch::Tensor nib,
                                     torch::Tensor base) {
  TORCH_CHECK(weight.dtype() == torch::kBFloat16 && weight.dim() == 2 && weight.size(1) % 64 == 0,
              "pack_bf16: needs a 2-d bf16 weight with a multiple of 64 columns");
  weight = weight.contiguous();
  const int64_t R = weight.size(0), K = weight.size(1);
  TORCH_CHECK(sm.is_contiguous() && nib.is_contiguous() && base.is_contiguous() &&
              sm.numel() == R * K && nib.numel() == R * K / 2 && base.numel() == R &&
              sm.dtype() == torch::kUInt8 && nib.dtype() == torch::kUInt8 && base.dtype() == torch::kUInt8,
              "pack_bf16: output tensors do not match the weight");
  const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  uint8_t* bp = base.data_ptr<uint8_t>();
  auto counts = torch::zeros({R + 1}, torch::kInt64);
  int64_t* cp = counts.data_ptr<int64_t>();
  at::parallel_for(0, R, kRowsPerTask, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint16_t* row = w + r * K;
      const int b = best_base(row, K);
      bp[r] = (uint8_t)b;
      for (int64_t k = 0; k < K; ++k) cp[r + 1] += !is_zero(row[k]) && !in_window(row[k], b);
    }
  });
  auto ptr = counts.cumsum(0);
  const int64_t listed = ptr[R].item<int64_t>();
  auto col = torch::empty({listed}, torch::kInt32);
  auto val = torch::empty({listed}, torch::kFloat32);
  const int64_t* pp = ptr.data_ptr<int64_t>();
  int32_t* colp = col.data_ptr<int32_t>();
  float* valp = val.data_ptr<float>();
  uint8_t* smp = sm.data_ptr<uint8_t>();
  uint8_t* nibp = nib.data_ptr<uint8_t>();
  at::parallel_for(0, R, kRowsPerTask, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint16_t* row = w + r * K;
      const int b = bp[r];
      int64_t q = pp[r];
      for (int64_t c = 0; c < K; c += 64) {
        uint8_t s[64], n[64];
        for (int j = 0; j < 64; ++j) {
          const uint16_t v = row[c + j];
          s[j] = (uint8_t)(((v >> 8) & 0x80) | (v & 0x7F));
          n[j] = 0;
          if (in_window(v, b)) {
            n[j] = (uint8_t)(exponent(v) - b);
          } else if (!is_zero(v)) {     // listed: nothing in the packed bits
            s[j] = 0;
            colp[q] = (int32_t)(c + j);
            valp[q++] = ossgpt::bf16_to_float(v);
          }
        }
        // sm byte 16 L + 8 h + i holds element 32 h + 8 L + i (see decode64)
        uint8_t* sr = smp + r * K + c;
        for (int L = 0; L < 4; ++L)
          for (int h = 0; h < 2; ++h)
            for (int i = 0; i < 8; ++i) sr[16 * L + 8 * h + i] = s[32 * h + 8 * L + i];
        uint8_t* nr = nibp + r * (K / 2) + c / 2;
        for (int j = 0; j < 32; ++j) nr[j] = (uint8_t)(n[j] | n[j + 32] << 4);
      }
    }
  });
  return {ptr, col, val};
}

// The packed parts -> the bf16 weight (R, K), bit for bit.
torch::Tensor unpack_bf16(torch::Tensor sm, torch::Tensor nib, torch::Tensor base, torch::Tensor ptr,
                          torch::Tensor col, torch::Tensor val) {
  TORCH_CHECK(sm.dim() == 2 && sm.size(1) % 64 == 0 && sm.is_contiguous() && nib.is_contiguous(),
              "unpack_bf16: bad packed parts");
  const int64_t R = sm.size(0), K = sm.size(1);
  const ossgpt::PackedBF16 w{sm.data_ptr<uint8_t>(), nib.data_ptr<uint8_t>(), base.data_ptr<uint8_t>(),
                             ptr.data_ptr<int64_t>(), col.data_ptr<int32_t>(), val.data_ptr<float>(), K};
  auto out = torch::empty({R, K}, torch::kBFloat16);
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, R, kRowsPerTask, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const __m512i table = ossgpt::exponent_table(w.base[r]);
      uint16_t* row = op + r * K;
      for (int64_t c = 0; c < K; c += 64) {
        __m512i lo, hi;
        ossgpt::decode64(w, r, c, table, lo, hi);
        _mm512_storeu_si512(row + c, lo);
        _mm512_storeu_si512(row + c + 32, hi);
      }
      for (int64_t p = w.ptr[r]; p < w.ptr[r + 1]; ++p) {
        uint32_t bits;
        std::memcpy(&bits, &w.val[p], 4);
        row[w.col[p]] = (uint16_t)(bits >> 16);
      }
    }
  });
  return out;
}
#endif
