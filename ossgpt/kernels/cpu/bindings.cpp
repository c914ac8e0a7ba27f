// The extension: its Python functions (ossgpt/kernels/__init__.py wraps them), and decode
// attention's torch side (the core: attention.h). Compiled once per instruction-set level
// (ossgpt/kernels/build.py); `level()` says which.

#include <vector>

#include "attention.h"
#include "extension.h"

torch::Tensor moe_forward(torch::Tensor x, torch::Tensor indices, torch::Tensor gates,
                          torch::Tensor mlp1_blocks, torch::Tensor mlp1_scales, torch::Tensor mlp1_bias,
                          torch::Tensor mlp2_blocks, torch::Tensor mlp2_scales, torch::Tensor mlp2_bias,
                          double limit, double alpha);                           // moe.cpp
torch::Tensor dequantize_bf16(torch::Tensor blocks, torch::Tensor scales);      // moe.cpp
torch::Tensor linear_bf16(torch::Tensor x, std::vector<torch::Tensor> weight, c10::optional<torch::Tensor> bias);
torch::Tensor qkv_rope_bf16(torch::Tensor x, torch::Tensor norm_weight, double eps,
                            std::vector<std::vector<torch::Tensor>> weights, std::vector<torch::Tensor> biases,
                            torch::Tensor cos, torch::Tensor sin, int64_t rope_heads);  // linear.cpp
torch::Tensor moe_layer_bf16(torch::Tensor x, torch::Tensor norm_weight, double eps,
                             std::vector<torch::Tensor> router_weight, c10::optional<torch::Tensor> router_bias,
                             int64_t k, torch::Tensor mlp1_blocks, torch::Tensor mlp1_scales,
                             torch::Tensor mlp1_bias, torch::Tensor mlp2_blocks, torch::Tensor mlp2_scales,
                             torch::Tensor mlp2_bias, double limit, double alpha);  // layer.cpp
torch::Tensor attention_output_bf16(torch::Tensor x, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                    torch::Tensor sinks, torch::Tensor q_pos, torch::Tensor k_pos,
                                    int64_t window, double scale, std::vector<torch::Tensor> o_weight,
                                    c10::optional<torch::Tensor> o_bias);  // layer.cpp
std::vector<torch::Tensor> pack_bf16(torch::Tensor weight, torch::Tensor sm, torch::Tensor nib,
                                     torch::Tensor base);                        // linear.cpp
torch::Tensor unpack_bf16(torch::Tensor sm, torch::Tensor nib, torch::Tensor base, torch::Tensor ptr,
                          torch::Tensor col, torch::Tensor val);                 // linear.cpp

// q (B, H, D) bf16; k, v (B, S, K, D) bf16 (a cache's view: strided over B and S, each row of
// D contiguous); sinks (H,) float32; mask (B, S) bool, true where the query may attend the key.
// -> (B, H, D) bf16. D % 16 == 0, D <= 128, H / K <= 8.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor sinks,
                               torch::Tensor mask, double scale) {
  TORCH_CHECK(q.dtype() == torch::kBFloat16 && k.dtype() == torch::kBFloat16 &&
              v.dtype() == torch::kBFloat16 && sinks.dtype() == torch::kFloat32 &&
              mask.dtype() == torch::kBool, "decode_attention: bad dtypes");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), S = k.size(1), K = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D && H % K == 0 &&
              H / K <= 8 && D % 16 == 0 && D <= 128 && mask.size(0) == B && mask.size(1) == S,
              "decode_attention: bad shapes");
  q = q.contiguous(); sinks = sinks.contiguous(); mask = mask.contiguous();
  if (k.stride(3) != 1 || k.stride(2) != D) k = k.contiguous();
  if (v.stride(3) != 1 || v.stride(2) != D || v.strides() != k.strides()) { k = k.contiguous(); v = v.contiguous(); }
  auto out = torch::empty({B, H, D}, q.options());
  ossgpt::attention::forward(ossgpt::bf16_data(q), ossgpt::bf16_data(k), ossgpt::bf16_data(v), k.stride(0),
                             k.stride(1), sinks.data_ptr<float>(), mask.data_ptr<bool>(), B, H, K, S, D,
                             (float)scale, ossgpt::bf16_data(out), ossgpt::torch_parallel());
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("level", [] { return std::string(ossgpt::simd::kLevel); }, "the instruction-set level compiled for");
#if defined(OSSGPT_BF16_DOT)
  m.attr("many_rows") = false;   // linear_bf16 takes up to 8 rows: oneDNN's bf16 matmul the rest
  m.attr("expert_decode_inputs") = "bf16";    // how a bf16 model's experts meet x in decode
  m.attr("expert_prefill_inputs") = "bf16";   // ... and in prefill (the panels)
#else
  m.attr("many_rows") = true;    // linear_bf16 takes any number of rows
#if defined(OSSGPT_NEON)
  m.attr("expert_decode_inputs") = "int16";      // a scale a block of 32 (mxfp4.h, rows_matmul_i16)
  m.attr("expert_prefill_inputs") = "float32";   // float32 panels: exact products
#else
  m.attr("expert_decode_inputs") = "int9";       // a scale a block of 32 (mxfp4_bytes.h)
  m.attr("expert_prefill_inputs") = "int9";      // the same integers as decode's (gemm_i16.h)
#endif
#endif
  m.def("moe_forward", &moe_forward, "fused MXFP4 mixture of experts (CPU)");
  m.def("dequantize_bf16", &dequantize_bf16, "MXFP4 -> bfloat16 (CPU, threaded)");
  m.def("linear_bf16", &linear_bf16, "bf16 matrix-vector products for decode (CPU)");
  m.def("qkv_rope_bf16", &qkv_rope_bf16, "norm, q/k/v products and rotary embedding for decode (CPU)");
  m.def("decode_attention", &decode_attention, "attention with sinks for one new token (CPU)");
  m.def("moe_layer_bf16", &moe_layer_bf16, "decode's norm, routing, experts and residual in one call (CPU)");
  m.def("attention_output_bf16", &attention_output_bf16,
        "decode's attention, output projection and residual in one call (CPU)");
  m.def("pack_bf16", &pack_bf16, "bf16 weight -> 12-bit packed parts (CPU, threaded)");
  m.def("unpack_bf16", &unpack_bf16, "12-bit packed parts -> bf16 weight (CPU, threaded)");
}
