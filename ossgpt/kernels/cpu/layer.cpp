// Decode's layer halves in one call each: the same operations, in the same order, as
// ossgpt/model.py's MoE.forward and the end of Attention.forward take on the kernel path, so the
// same bits. Why: at batch 1 a layer's weights take ~5 ms on a slow CPU, and the ~25 small torch
// calls around its kernels, each a Python round trip, took another ~0.5 ms.

#include <vector>

#include "extension.h"

torch::Tensor moe_forward(torch::Tensor x, torch::Tensor indices, torch::Tensor gates,
                          torch::Tensor mlp1_blocks, torch::Tensor mlp1_scales, torch::Tensor mlp1_bias,
                          torch::Tensor mlp2_blocks, torch::Tensor mlp2_scales, torch::Tensor mlp2_bias,
                          double limit, double alpha);                           // moe.cpp
torch::Tensor linear_bf16(torch::Tensor x, std::vector<torch::Tensor> weight, c10::optional<torch::Tensor> bias);
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor sinks,
                               torch::Tensor mask, double scale);                // bindings.cpp

// x (..., C) bf16, the residual stream -> x + MoE(RMSNorm(x)): the router's top k of its logits,
// their softmax the gates, the fused MXFP4 experts. router_weight as linear_bf16's.
torch::Tensor moe_layer_bf16(torch::Tensor x, torch::Tensor norm_weight, double eps,
                             std::vector<torch::Tensor> router_weight, c10::optional<torch::Tensor> router_bias,
                             int64_t k, torch::Tensor mlp1_blocks, torch::Tensor mlp1_scales,
                             torch::Tensor mlp1_bias, torch::Tensor mlp2_blocks, torch::Tensor mlp2_scales,
                             torch::Tensor mlp2_bias, double limit, double alpha) {
  TORCH_CHECK(x.dtype() == torch::kBFloat16, "moe_layer_bf16: needs bf16 x");
  auto t = x.reshape({-1, x.size(-1)}).to(torch::kFloat32);               // model.RMSNorm
  t = t * torch::rsqrt(t.pow(2).mean(-1, true) + eps);
  t = (t * norm_weight.to(torch::kFloat32)).to(x.dtype());
  auto [values, indices] = torch::topk(linear_bf16(t, router_weight, router_bias), k, -1, true, true);
  auto gates = torch::softmax(values.to(torch::kFloat32), -1);
  auto out = moe_forward(t, indices, gates, mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales,
                         mlp2_bias, limit, alpha);
  return x + out.to(x.dtype()).view(x.sizes());
}

// x (B, 1, C) bf16, the residual stream; q (B, 1, H, D); k, v (B, S, K, D) with their positions k_pos
// (B, S) int64 (negative: padding or an empty slot); q_pos (B,) the new tokens' positions;
// window < 0 for full attention -> x + o_proj(attention) (B, 1, C) bf16, the mask made here as
// model.attention_mask makes it.
torch::Tensor attention_output_bf16(torch::Tensor x, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                    torch::Tensor sinks, torch::Tensor q_pos, torch::Tensor k_pos,
                                    int64_t window, double scale, std::vector<torch::Tensor> o_weight,
                                    c10::optional<torch::Tensor> o_bias) {
  const int64_t B = k.size(0), S = k.size(1);
  TORCH_CHECK(q_pos.numel() == B && k_pos.size(0) == B && k_pos.size(1) == S,
              "attention_output_bf16: positions do not match k");
  q_pos = q_pos.to(torch::kInt64).contiguous(); k_pos = k_pos.to(torch::kInt64).contiguous();
  auto mask = torch::empty({B, S}, torch::kBool);
  const int64_t* qp = q_pos.data_ptr<int64_t>();
  const int64_t* kp = k_pos.data_ptr<int64_t>();
  bool* m = mask.data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) {
      const int64_t key = kp[b * S + s], query = qp[b];
      m[b * S + s] = key >= 0 && key <= query && (window < 0 || query - key < window);
    }
  auto out = decode_attention(q.view({B, q.size(2), q.size(3)}), k, v, sinks.to(torch::kFloat32), mask, scale);
  return x + linear_bf16(out.view({B, -1}), o_weight, o_bias).view(x.sizes());
}
