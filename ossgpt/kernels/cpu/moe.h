// The MXFP4 mixture of experts for the CPU: each routed expert's weights are read once, in their
// packed form, never materialised whole. With few tokens per expert (decode) they are
// dequantized in registers (mxfp4.h); with many (prefill) a few rows at a time into a panel that
// stays in cache while a register-tiled GEMM (gemm.h; gemm_i16.h for bf16 models on avx2 and
// avx512) passes every token over it.
// The plain version in ossgpt/model.py (MoE.grouped) is the reference (tests/test_kernels.py).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "gemm.h"
#include "gemm_i16.h"
#include "mxfp4.h"
#include "mxfp4_bytes.h"
#include "parallel.h"
#include "simd.h"

namespace ossgpt::moe {

constexpr int kMaxTokens = 8;     // token rows per tile of the in-register products
constexpr int kPanelPairs = 4;    // tokens per routed expert from which panels pay (measured, bf16)

// gpt-oss's clamped SwiGLU (model.swiglu) of one row of 2 I interleaved (gate, linear) columns
// -> I floats; I % W == 0.
inline void swiglu_row(const float* h, int64_t I, float limit, float alpha, float* out) {
  const simd::F lim = simd::set1(limit), neg_lim = simd::set1(-limit), one = simd::set1(1.f),
                neg_alpha = simd::set1(-alpha);
  for (int64_t c = 0; c < I; c += simd::W) {
    simd::F gate, lin;
    simd::deinterleave(h + 2 * c, gate, lin);
    gate = simd::min(gate, lim);
    lin = simd::max(simd::min(lin, lim), neg_lim);
    const simd::F sig = simd::div(one, simd::add(one, simd::exp(simd::mul(neg_alpha, gate))));
    simd::store(out + c, simd::mul(simd::mul(gate, sig), simd::add(lin, one)));
  }
}

// How activations are laid out for the products: one row of K inputs per (token, expert) pair.
//   F32Pairs:  float32, per block of 32 the even elements then the odd ones (mxfp4::rows_matmul,
//              and the float32 panels, dequantized in the same order);
//   Bf16Quads: bf16 in the order of mxfp4::rows_matmul_bf16's registers, padded to whole quads;
//   Bf16Plain: bf16 in element order, for the bf16 panels;
//   I16Pairs:  int16 in pair-split order with a scale a block (mxfp4::rows_matmul_i16; neon);
//   I9Bytes:   9-bit integers as a magnitude and a sign byte, with a scale a block
//              (mxfp4::rows_matmul_i9_bytes; avx2 and avx512);
//   I16Groups: the same integers as int16 in groups of 8 blocks, with a scale a block, padded to
//              whole groups (gemm_i16.h: prefill's panels on avx2 and avx512).
enum class Layout { F32Pairs, Bf16Quads, Bf16Plain, I16Pairs, I9Bytes, I16Groups };

struct Operand {
  Layout layout;
  int64_t K, stride;   // inputs per row; elements per stored row (bytes for I9Bytes)
  int64_t scales;      // the integer layouts' block scales a row
  Buffer<float> f32;       // F32Pairs rows, or the integer layouts' block scales
  Buffer<uint16_t> bf16;   // Bf16* rows
  Buffer<int16_t> i16;     // I16Pairs and I16Groups rows
  Buffer<uint8_t> bytes;   // I9Bytes rows

  Operand(Layout layout_, int64_t P, int64_t K_)
      : layout(layout_), K(K_), stride(row_length(layout_, K_)), scales(scale_count(layout_, K_)),
        f32(layout_ == Layout::F32Pairs ? P * K_ : P * scales),
        bf16(layout_ == Layout::Bf16Quads || layout_ == Layout::Bf16Plain ? P * stride : 0),
        i16(layout_ == Layout::I16Pairs || layout_ == Layout::I16Groups ? P * stride : 0),
        bytes(layout_ == Layout::I9Bytes ? P * stride : 0) {}

  static bool integer(Layout layout) {
    return layout == Layout::I16Pairs || layout == Layout::I9Bytes || layout == Layout::I16Groups;
  }

  static int64_t row_length([[maybe_unused]] Layout layout, int64_t K) {
#if defined(OSSGPT_BF16_DOT)
    if (layout == Layout::Bf16Quads) return mxfp4::quads(K / 32) * 128;
#endif
#if defined(OSSGPT_AVX2) || defined(OSSGPT_AVX512)
    if (layout == Layout::I16Groups) return gemm_i16::groups(K / 32) * gemm_i16::kGroupValues;
    if (layout == Layout::I9Bytes) return mxfp4::i9_pairs(K / 32) * mxfp4::kPairBytes;   // bytes
#endif
    return K;
  }

  static int64_t scale_count(Layout layout, int64_t K) {
    if (!integer(layout)) return 0;
#if defined(OSSGPT_AVX2) || defined(OSSGPT_AVX512)
    if (layout == Layout::I9Bytes) return 2 * mxfp4::i9_pairs(K / 32);
#endif
    return row_length(layout, K) / 32;   // a scale a block, padding included
  }

  const float* f32_row(int64_t i) const { return f32.get() + i * stride; }
  const uint16_t* bf16_row(int64_t i) const { return bf16.get() + i * stride; }
  const int16_t* i16_row(int64_t i) const { return i16.get() + i * stride; }
  const uint8_t* bytes_row(int64_t i) const { return bytes.get() + i * stride; }
  const float* block_scales(int64_t i) const { return f32.get() + i * scales; }

  // Write row i from K floats, reordered so each packed code meets its input.
  void set_row(int64_t i, const float* src) {
    switch (layout) {
      case Layout::F32Pairs: return mxfp4::to_pairs(src, K, f32.get() + i * stride);
      case Layout::Bf16Plain:
        for (int64_t c = 0; c < K; c += simd::W) simd::store_bf16(bf16.get() + i * stride + c, simd::load(src + c));
        return;
      case Layout::Bf16Quads:
#if defined(OSSGPT_BF16_DOT)
        return mxfp4::to_quads(src, K, bf16.get() + i * stride);
#endif
        throw std::logic_error("moe: bf16 layouts need the avx512bf16 level");
      case Layout::I16Pairs:
        return mxfp4::to_i16_pairs(src, K, i16.get() + i * stride, f32.get() + i * scales);
      case Layout::I9Bytes:
#if defined(OSSGPT_AVX2) || defined(OSSGPT_AVX512)
        return mxfp4::to_i9_bytes(src, K, bytes.get() + i * stride, f32.get() + i * scales);
#endif
        throw std::logic_error("moe: 9-bit inputs need an x86 level");
      case Layout::I16Groups:
#if defined(OSSGPT_AVX2) || defined(OSSGPT_AVX512)
        return gemm_i16::to_groups(src, K, i16.get() + i * stride, f32.get() + i * scales);
#endif
        throw std::logic_error("moe: int16 groups need an x86 level");
    }
  }
};

// An expert matrix (E, R, K) in MXFP4: blocks (E, R, G, 16), scales (E, R, G), G = K / 32, and
// its bias (E, R) as float32 or bf16.
struct ExpertMatrix {
  const uint8_t* blocks;
  const uint8_t* scales;
  const float* bias_f32;
  const uint16_t* bias_bf16;
  int64_t R, G;
};

// One job: rows [r0, r1) of one expert's matrix, for all the tokens routed to it (in tiles of
// kMaxTokens, so the rows' packed weights stay in cache while each tile reads them).
struct Job {
  int64_t expert, r0, r1;
};

// Each used expert's rows in ranges sized so there are several jobs per thread, and small enough
// (256 KiB of weights, `row_bytes` each as the kernel holds them) to stay in a core's L2 cache
// while the token tiles pass over them; a multiple of `grain` rows (the register tiles' rows).
inline std::vector<Job> make_jobs(const std::vector<int64_t>& starts, int64_t R, int64_t row_bytes,
                                  int threads, int64_t grain = 4) {
  const int64_t n_experts = (int64_t)starts.size() - 1;
  int64_t used = 0;
  for (int64_t e = 0; e < n_experts; ++e) used += starts[e + 1] > starts[e];
  const int64_t want = 8 * threads;
  int64_t chunk = std::max<int64_t>(grain, R * used / std::max<int64_t>(want, 1));
  chunk = std::min<int64_t>(chunk, std::max<int64_t>(grain, (256 << 10) / row_bytes));
  chunk = std::min<int64_t>(R, (chunk + grain - 1) / grain * grain);
  std::vector<Job> jobs;
  for (int64_t e = 0; e < n_experts; ++e)
    if (starts[e + 1] > starts[e])
      for (int64_t r = 0; r < R; r += chunk) jobs.push_back({e, r, std::min(R, r + chunk)});
  return jobs;
}

// The biases of the experts in use as float32, one row each (row[e] says which; converting a bf16
// model's whole (E, R) bias on every call cost more than a decode step's other work).
struct UsedBiases {
  std::vector<int64_t> row;
  Buffer<float> data;

  UsedBiases(const ExpertMatrix& w, const std::vector<int64_t>& starts)
      : row(starts.size() - 1, -1), data(0) {
    int64_t used = 0;
    for (size_t e = 0; e + 1 < starts.size(); ++e)
      if (starts[e + 1] > starts[e]) row[e] = used++;
    data = Buffer<float>(used * w.R);
    for (size_t e = 0; e < row.size(); ++e)
      if (row[e] >= 0)
        for (int64_t r = 0; r < w.R; ++r)
          data.get()[row[e] * w.R + r] = w.bias_f32 ? w.bias_f32[e * w.R + r] : bf16_to_float(w.bias_bf16[e * w.R + r]);
  }

  const float* of(int64_t expert, int64_t R) const { return data.get() + row[expert] * R; }
};

// y (P, R) = x @ W_e.T + b_e, each row of x multiplied by the expert its (token, slot) pair
// routes to; `starts` delimits each expert's rows of x.
inline void expert_matmul(const Operand& x, bool panels, const std::vector<int64_t>& starts,
                          const ExpertMatrix& w, float* y, const Parallel& parallel) {
  const int64_t R = w.R, G = w.G, K = G * 32;
  const bool bf16 = x.layout == Layout::Bf16Quads || x.layout == Layout::Bf16Plain;
  const bool groups = x.layout == Layout::I16Groups;   // int16 panels (+ a float scale a block)
  // int16 panels: rows a multiple of 12, whole 3- and 4-row tiles (a last single row ran at a
  // third of the speed)
  const auto jobs = make_jobs(starts, R, !panels ? G * 17 : groups ? x.stride * 2 + x.scales * 4 : K * (bf16 ? 2 : 4),
                              parallel.threads, groups ? 12 : 4);
  const UsedBiases bias(w, starts);
  // Panels: each thread takes the next job from a shared counter, not a fixed share of them:
  // experts have unequal numbers of tokens, so equal numbers of jobs are unequal work. Decode:
  // equal shares of consecutive jobs, each thread's weights then one stream in memory order.
  const int64_t n_jobs = (int64_t)jobs.size();
  std::atomic<int64_t> next{0};
  parallel(0, panels ? parallel.threads : n_jobs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> panel;
    std::vector<uint16_t> panel_bf16;
    std::vector<int16_t> panel_i16;
    auto take = [&, i = begin]() mutable { return panels ? next++ : i < end ? i++ : n_jobs; };
    for (int64_t j; (j = take()) < n_jobs;) {
      const Job& job = jobs[j];
      const uint8_t* wb = w.blocks + job.expert * R * G * 16;
      const uint8_t* ws = w.scales + job.expert * R * G;
      const float* b = bias.of(job.expert, R);
      const int64_t t0 = starts[job.expert], t_end = starts[job.expert + 1], rows = job.r1 - job.r0;
      if (panels && bf16) {   // many tokens: dequantize the rows once into a panel, then a GEMM
#if defined(OSSGPT_BF16_DOT)
        panel_bf16.resize(rows * K);
        mxfp4::dequantize_bf16(wb + job.r0 * G * 16, ws + job.r0 * G, rows * G, panel_bf16.data());
        gemm_bf16<4, 6>(panel_bf16.data(), K, rows, x.bf16_row(t0), x.stride, t_end - t0, K,
                        y + t0 * R + job.r0, R, b + job.r0);
#endif
        continue;
      }
      if (panels && groups) {   // int16 codes and int16 inputs (gemm_i16.h)
#if defined(OSSGPT_AVX2) || defined(OSSGPT_AVX512)
        const int64_t L = x.stride, S = x.scales;
        panel_i16.resize(rows * L);
        panel.resize(rows * S);
        for (int64_t r = 0; r < rows; ++r)
          gemm_i16::decode_row(wb + (job.r0 + r) * G * 16, ws + (job.r0 + r) * G, G, panel_i16.data() + r * L,
                               panel.data() + r * S);
        gemm_i16::gemm(panel_i16.data(), L, panel.data(), S, rows, x.i16_row(t0), L, x.block_scales(t0), S,
                       t_end - t0, L / gemm_i16::kGroupValues, y + t0 * R + job.r0, R, b + job.r0);
#endif
        continue;
      }
      if (panels) {
        panel.resize(rows * K);
        for (int64_t r = 0; r < rows; ++r)
          mxfp4::dequantize_pairs(wb + (job.r0 + r) * G * 16, ws + (job.r0 + r) * G, G, panel.data() + r * K);
        gemm<kPanelRows, kPanelTokens>(panel.data(), K, rows, x.f32_row(t0), x.stride, t_end - t0, K,
                                       y + t0 * R + job.r0, R, b + job.r0);
        continue;
      }
      for (int64_t t = t0; t < t_end; t += kMaxTokens) {
        const int n = (int)std::min<int64_t>(kMaxTokens, t_end - t);
#if defined(OSSGPT_BF16_DOT)
        if (bf16) {
          mxfp4::tile_matmul_bf16(n, wb, ws, G, x.bf16_row(t), y + t * R, R, b, job.r0, job.r1);
          continue;
        }
#endif
        if (x.layout == Layout::I16Pairs) {
          mxfp4::tile_matmul_i16(n, wb, ws, G, x.i16_row(t), x.block_scales(t), y + t * R, R, b, job.r0, job.r1);
          continue;
        }
#if defined(OSSGPT_AVX2) || defined(OSSGPT_AVX512)
        if (x.layout == Layout::I9Bytes) {
          mxfp4::tile_matmul_i9_bytes(n, wb, ws, G, x.bytes_row(t), x.block_scales(t), y + t * R, R, b, job.r0,
                                      job.r1);
          continue;
        }
#endif
        mxfp4::tile_matmul(n, wb, ws, G, x.f32_row(t), y + t * R, R, b, job.r0, job.r1);
      }
    }
  });
}

// out (N, C) = sum_j gates[n, j] * expert_{indices[n, j]}(x[n]), x (N, C) float32 holding bf16
// values where `bf16` (then the bf16 products run where the level has them: exact products,
// float32 sums), indices (N, k), mlp1 (E, 2I, C) with interleaved (gate, linear) rows, mlp2
// (E, C, I). Throws std::invalid_argument on an index out of range.
inline void forward(const float* x, bool bf16, const int64_t* indices, const float* gates, int64_t N,
                    int64_t k, int64_t C, int64_t E, const ExpertMatrix& mlp1, const ExpertMatrix& mlp2,
                    float limit, float alpha, float* out, const Parallel& parallel) {
  const int64_t I = mlp1.R / 2, P = N * k;
  // Group the (token, slot) pairs by expert: each expert's rows are contiguous in xs.
  std::vector<int64_t> starts(E + 1, 0);
  for (int64_t p = 0; p < P; ++p) {
    if (indices[p] < 0 || indices[p] >= E) throw std::invalid_argument("moe_forward: expert index out of range");
    ++starts[indices[p] + 1];
  }
  for (int64_t e = 0; e < E; ++e) starts[e + 1] += starts[e];
  std::vector<int64_t> order(P), fill(starts.begin(), starts.end() - 1);
  for (int64_t p = 0; p < P; ++p) order[fill[indices[p]]++] = p;

  // Many tokens per expert (prefill): weights dequantized once per panel of rows, then a
  // register-tiled GEMM; few (decode): dequantized in registers, for each tile of tokens.
  int64_t used = 0;
  for (int64_t e = 0; e < E; ++e) used += starts[e + 1] > starts[e];
  const bool panels = P >= kPanelPairs * used;
#if defined(OSSGPT_BF16_DOT)
  const Layout layout = !bf16 ? Layout::F32Pairs : panels ? Layout::Bf16Plain : Layout::Bf16Quads;
#elif defined(OSSGPT_NEON)
  const Layout layout = bf16 && !panels ? Layout::I16Pairs : Layout::F32Pairs;
#else
  const Layout layout = !bf16 ? Layout::F32Pairs : panels ? Layout::I16Groups : Layout::I9Bytes;
#endif
  Operand xs(layout, P, C);
  parallel(0, P, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) xs.set_row(i, x + (order[i] / k) * C);
  });

  // mlp1 -> (P, 2I), then the clamped SwiGLU of interleaved (gate, linear) columns -> (P, I).
  Buffer<float> h1(P * 2 * I);
  expert_matmul(xs, panels, starts, mlp1, h1.get(), parallel);
  Operand h(layout, P, I);
  parallel(0, P, 16, [&](int64_t b, int64_t e) {
    std::vector<float> row(I);
    for (int64_t i = b; i < e; ++i) {
      swiglu_row(h1.get() + i * 2 * I, I, limit, alpha, row.data());
      h.set_row(i, row.data());
    }
  });

  // mlp2 -> (P, C), then each token's gate-weighted sum over its k experts.
  Buffer<float> y(P * C);
  expert_matmul(h, panels, starts, mlp2, y.get(), parallel);
  std::vector<int64_t> where(P);
  for (int64_t i = 0; i < P; ++i) where[order[i]] = i;
  parallel(0, N, 1, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      float* o = out + n * C;
      std::fill(o, o + C, 0.f);
      for (int64_t j = 0; j < k; ++j) {
        const float g = gates[n * k + j];
        const float* src = y.get() + where[n * k + j] * C;
        for (int64_t c = 0; c < C; ++c) o[c] += g * src[c];
      }
    }
  });
}

}  // namespace ossgpt::moe
