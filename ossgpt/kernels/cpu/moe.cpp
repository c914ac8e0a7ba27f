// The extension's MXFP4 functions: the fused mixture of experts and the threaded dequantizer
// (the cores: moe.h, mxfp4.h).

#include "extension.h"
#include "moe.h"

namespace {
ossgpt::moe::ExpertMatrix matrix(const torch::Tensor& blocks, const torch::Tensor& scales, torch::Tensor& bias) {
  if (bias.dtype() != torch::kFloat32 && bias.dtype() != torch::kBFloat16) bias = bias.to(torch::kFloat32);
  bias = bias.contiguous();
  const bool bf16 = bias.dtype() == torch::kBFloat16;
  return {blocks.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(), bf16 ? nullptr : bias.data_ptr<float>(),
          bf16 ? ossgpt::bf16_data(bias) : nullptr, blocks.size(1), blocks.size(2)};
}
}  // namespace

// x (N, C) float32 or bfloat16 (then the bf16 products run where the level has them: exact
// products, float32 sums); indices (N, k) int64; gates (N, k) float32; mlp1 (E, 2I, C/32, 16) u8
// + (E, 2I, C/32) u8 + bias (E, 2I) of any float dtype; mlp2 (E, C, I/32, 16) + (E, C, I/32) +
// (E, C). Returns sum_j gates[n, j] * expert_{indices[n, j]}(x[n]) as (N, C) float32.
torch::Tensor moe_forward(torch::Tensor x, torch::Tensor indices, torch::Tensor gates,
                          torch::Tensor mlp1_blocks, torch::Tensor mlp1_scales, torch::Tensor mlp1_bias,
                          torch::Tensor mlp2_blocks, torch::Tensor mlp2_scales, torch::Tensor mlp2_bias,
                          double limit, double alpha) {
  TORCH_CHECK(gates.dtype() == torch::kFloat32, "moe_forward: gates must be float32");
  TORCH_CHECK(indices.dtype() == torch::kInt64 && mlp1_blocks.dtype() == torch::kUInt8 &&
              mlp2_blocks.dtype() == torch::kUInt8, "moe_forward: bad index or weight dtype");
  const bool bf16 = x.dtype() == torch::kBFloat16;
  x = x.to(torch::kFloat32).contiguous();
  indices = indices.contiguous(); gates = gates.contiguous();
  mlp1_blocks = mlp1_blocks.contiguous(); mlp1_scales = mlp1_scales.contiguous();
  mlp2_blocks = mlp2_blocks.contiguous(); mlp2_scales = mlp2_scales.contiguous();
  const int64_t N = x.size(0), C = x.size(1), k = indices.size(1);
  const int64_t E = mlp1_blocks.size(0), I = mlp1_blocks.size(1) / 2;
  TORCH_CHECK(C % 32 == 0 && I % 32 == 0 && mlp1_blocks.size(2) == C / 32 && mlp2_blocks.size(1) == C &&
              mlp2_blocks.size(2) == I / 32 && indices.size(0) == N && gates.sizes() == indices.sizes(),
              "moe_forward: weight shapes do not match x");
  auto out = torch::empty({N, C}, x.options());
  ossgpt::moe::forward(x.data_ptr<float>(), bf16, indices.data_ptr<int64_t>(), gates.data_ptr<float>(), N, k, C, E,
                       matrix(mlp1_blocks, mlp1_scales, mlp1_bias), matrix(mlp2_blocks, mlp2_scales, mlp2_bias),
                       (float)limit, (float)alpha, out.data_ptr<float>(), ossgpt::torch_parallel());
  return out;
}

// blocks (..., G, 16) u8, scales (..., G) u8 -> bfloat16 (..., G * 32): the plain dequantize,
// threaded, for the plain path (LoRA-wrapped and float experts) that multiplies by whole experts.
torch::Tensor dequantize_bf16(torch::Tensor blocks, torch::Tensor scales) {
  blocks = blocks.contiguous(); scales = scales.contiguous();
  TORCH_CHECK(blocks.numel() == scales.numel() * 16, "dequantize_bf16: blocks and scales do not match");
  auto sizes = scales.sizes().vec();
  const int64_t G = scales.numel();
  sizes.back() *= 32;
  auto out = torch::empty(sizes, blocks.options().dtype(torch::kBFloat16));
  const uint8_t* b = blocks.data_ptr<uint8_t>();
  const uint8_t* s = scales.data_ptr<uint8_t>();
  uint16_t* o = ossgpt::bf16_data(out);
  at::parallel_for(0, G, 4096, [&](int64_t g0, int64_t g1) {
    ossgpt::mxfp4::dequantize_bf16(b + g0 * 16, s + g0, g1 - g0, o + g0 * 32);
  });
  return out;
}
