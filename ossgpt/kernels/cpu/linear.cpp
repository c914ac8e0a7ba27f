// The extension's bf16 functions: decode's products (dense or 12-bit packed weights), the fused
// attention inputs, and the packed format's conversions (the cores: linear.h, packed_bf16.h).

#include <vector>

#include "extension.h"
#include "linear.h"

namespace {
// A weight (R, K) as Python passes it: [dense bf16] or the six parts of ossgpt.packed_bf16.
ossgpt::linear::Weight weight(std::vector<torch::Tensor>& parts) {
  ossgpt::linear::Weight w;
  if (parts.size() == 1) {
    parts[0] = parts[0].contiguous();
    TORCH_CHECK(parts[0].dtype() == torch::kBFloat16 && parts[0].dim() == 2, "weight: needs bf16 (R, K)");
    w.R = parts[0].size(0), w.K = parts[0].size(1);
    w.dense = ossgpt::bf16_data(parts[0]);
    return w;
  }
  TORCH_CHECK(parts.size() == 6 && parts[0].dim() == 2 && parts[0].size(1) % 64 == 0 &&
              parts[0].is_contiguous() && parts[1].is_contiguous(), "weight: bad packed parts");
  w.R = parts[0].size(0), w.K = parts[0].size(1);
  w.packed = {parts[0].data_ptr<uint8_t>(), parts[1].data_ptr<uint8_t>(), parts[2].data_ptr<uint8_t>(),
              parts[3].data_ptr<int64_t>(), parts[4].data_ptr<int32_t>(), parts[5].data_ptr<float>(), w.K};
  return w;
}
}  // namespace

// x (N, K) bf16, weight [(R, K) bf16] or packed parts, K % 32 == 0, bias (R,) bf16 or None
// -> x @ weight.T + bias as bf16 (N, R). N <= 8 (decode) on avx512bf16, any N on the others.
torch::Tensor linear_bf16(torch::Tensor x, std::vector<torch::Tensor> weight_parts, c10::optional<torch::Tensor> bias) {
  const auto w = weight(weight_parts);
  TORCH_CHECK(x.dtype() == torch::kBFloat16 && x.dim() == 2 && w.K == x.size(1) && x.size(1) % 32 == 0,
              "linear_bf16: needs bf16 x (K % 32 == 0) and a matching weight");
  x = x.contiguous();
  torch::Tensor b;
  if (bias.has_value()) {
    b = bias->to(torch::kBFloat16).contiguous();
    TORCH_CHECK(b.numel() == w.R, "linear_bf16: bias does not match weight");
  }
  auto out = torch::empty({x.size(0), w.R}, x.options());
  ossgpt::linear::forward(ossgpt::bf16_data(x), x.size(0), w, b.defined() ? ossgpt::bf16_data(b) : nullptr,
                          ossgpt::bf16_data(out), ossgpt::torch_parallel());
  return out;
}

// x (N, C) bf16; norm_weight (C,); weights (Rj, C) as linear_bf16's and biases (Rj,) for q, k, v;
// cos, sin (N, D/2) float32; the first `rope_heads` heads of D columns are rotated
// -> (N, Rq + Rk + Rv) bf16.
torch::Tensor qkv_rope_bf16(torch::Tensor x, torch::Tensor norm_weight, double eps,
                            std::vector<std::vector<torch::Tensor>> weights, std::vector<torch::Tensor> biases,
                            torch::Tensor cos, torch::Tensor sin, int64_t rope_heads) {
  TORCH_CHECK(x.dtype() == torch::kBFloat16 && x.dim() == 2 && x.size(0) <= 8 && x.size(1) % 32 == 0 &&
              weights.size() == 3 && biases.size() == 3 && cos.dtype() == torch::kFloat32 &&
              sin.dtype() == torch::kFloat32, "qkv_rope_bf16: bad arguments");
  x = x.contiguous(); cos = cos.contiguous(); sin = sin.contiguous();
  const auto nw = norm_weight.to(torch::kFloat32).contiguous();
  const int64_t N = x.size(0), C = x.size(1), D = 2 * cos.size(-1);
  TORCH_CHECK(cos.size(0) == N && sin.sizes() == cos.sizes(), "qkv_rope_bf16: rotary shapes do not match");
  ossgpt::linear::Weight w[3];
  const uint16_t* b[3];
  int64_t R = 0;
  for (int j = 0; j < 3; ++j) {
    w[j] = weight(weights[j]);
    biases[j] = biases[j].to(torch::kBFloat16).contiguous();
    TORCH_CHECK(biases[j].numel() == w[j].R, "qkv_rope_bf16: a bias does not match its weight");
    b[j] = ossgpt::bf16_data(biases[j]);
    R += w[j].R;
  }
  auto out = torch::empty({N, R}, x.options());
  ossgpt::linear::qkv_rope(ossgpt::bf16_data(x), N, C, nw.data_ptr<float>(), (float)eps, w, b, cos.data_ptr<float>(),
                           sin.data_ptr<float>(), D, rope_heads, ossgpt::bf16_data(out), ossgpt::torch_parallel());
  return out;
}

// weight (R, K) bf16, K % 64 == 0; writes sm (R, K), nib (R, K / 2) and base (R,), uint8, which
// the caller allocates (in huge pages, for decode's streaming reads) -> [ptr, col, val].
// Packing a 20b model's dense weights (2.4 GB) takes about 3 s on 2 cores, where the Python
// reference would take minutes.
std::vector<torch::Tensor> pack_bf16(torch::Tensor weight, torch::Tensor sm, torch::Tensor nib, torch::Tensor base) {
  TORCH_CHECK(weight.dtype() == torch::kBFloat16 && weight.dim() == 2 && weight.size(1) % 64 == 0,
              "pack_bf16: needs a 2-d bf16 weight with a multiple of 64 columns");
  weight = weight.contiguous();
  const int64_t R = weight.size(0), K = weight.size(1);
  TORCH_CHECK(sm.is_contiguous() && nib.is_contiguous() && base.is_contiguous() && sm.numel() == R * K &&
              nib.numel() == R * K / 2 && base.numel() == R && sm.dtype() == torch::kUInt8 &&
              nib.dtype() == torch::kUInt8 && base.dtype() == torch::kUInt8,
              "pack_bf16: output tensors do not match the weight");
  constexpr int64_t kRowsPerTask = 64;
  const uint16_t* w = ossgpt::bf16_data(weight);
  uint8_t* bp = base.data_ptr<uint8_t>();
  auto counts = torch::zeros({R + 1}, torch::kInt64);
  int64_t* cp = counts.data_ptr<int64_t>();
  at::parallel_for(0, R, kRowsPerTask, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      bp[r] = (uint8_t)ossgpt::packed::best_base(w + r * K, K);
      cp[r + 1] = ossgpt::packed::listed_count(w + r * K, K, bp[r]);
    }
  });
  auto ptr = counts.cumsum(0);
  const int64_t listed = ptr[R].item<int64_t>();
  auto col = torch::empty({listed}, torch::kInt32);
  auto val = torch::empty({listed}, torch::kFloat32);
  const int64_t* pp = ptr.data_ptr<int64_t>();
  at::parallel_for(0, R, kRowsPerTask, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      ossgpt::packed::pack_row(w + r * K, K, bp[r], sm.data_ptr<uint8_t>() + r * K, nib.data_ptr<uint8_t>() + r * K / 2,
                               col.data_ptr<int32_t>(), val.data_ptr<float>(), pp[r]);
  });
  return {ptr, col, val};
}

// The packed parts -> the bf16 weight (R, K), bit for bit.
torch::Tensor unpack_bf16(torch::Tensor sm, torch::Tensor nib, torch::Tensor base, torch::Tensor ptr,
                          torch::Tensor col, torch::Tensor val) {
  TORCH_CHECK(sm.dim() == 2 && sm.size(1) % 64 == 0 && sm.is_contiguous() && nib.is_contiguous(),
              "unpack_bf16: bad packed parts");
  const int64_t R = sm.size(0), K = sm.size(1);
  const ossgpt::packed::PackedBF16 w{sm.data_ptr<uint8_t>(), nib.data_ptr<uint8_t>(), base.data_ptr<uint8_t>(),
                                     ptr.data_ptr<int64_t>(), col.data_ptr<int32_t>(), val.data_ptr<float>(), K};
  auto out = torch::empty({R, K}, torch::kBFloat16);
  uint16_t* op = ossgpt::bf16_data(out);
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) ossgpt::packed::unpack_row(w, r, op + r * K);
  });
  return out;
}
