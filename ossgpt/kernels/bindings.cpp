// The extension's Python functions (ossgpt/kernels/__init__.py wraps them).

#include <torch/extension.h>

#include <vector>

torch::Tensor moe_forward(torch::Tensor x, torch::Tensor indices, torch::Tensor gates,
                          torch::Tensor mlp1_blocks, torch::Tensor mlp1_scales, torch::Tensor mlp1_bias,
                          torch::Tensor mlp2_blocks, torch::Tensor mlp2_scales, torch::Tensor mlp2_bias,
                          double limit, double alpha);                           // mxfp4_cpu.cpp
torch::Tensor dequantize_bf16(torch::Tensor blocks, torch::Tensor scales);      // mxfp4_cpu.cpp
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
torch::Tensor linear_bf16(torch::Tensor x, std::vector<torch::Tensor> weight, c10::optional<torch::Tensor> bias);
torch::Tensor qkv_rope_bf16(torch::Tensor x, torch::Tensor norm_weight, double eps,
                            std::vector<std::vector<torch::Tensor>> weights, std::vector<torch::Tensor> biases,
                            torch::Tensor cos, torch::Tensor sin, int64_t rope_heads);  // linear_cpu.cpp
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor sinks,
                               torch::Tensor mask, double scale);                // attention_cpu.cpp
std::vector<torch::Tensor> pack_bf16(torch::Tensor weight, torch::Tensor sm, torch::Tensor nib,
                                     torch::Tensor base);                        // packed_bf16_cpu.cpp
torch::Tensor unpack_bf16(torch::Tensor sm, torch::Tensor nib, torch::Tensor base, torch::Tensor ptr,
                          torch::Tensor col, torch::Tensor val);                 // packed_bf16_cpu.cpp
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("moe_forward", &moe_forward, "fused MXFP4 mixture of experts (CPU)");
  m.def("dequantize_bf16", &dequantize_bf16, "MXFP4 -> bfloat16 (CPU, threaded)");
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  m.def("linear_bf16", &linear_bf16, "bf16 matrix-vector products for decode (CPU)");
  m.def("qkv_rope_bf16", &qkv_rope_bf16, "norm, q/k/v products and rotary embedding for decode (CPU)");
  m.def("decode_attention", &decode_attention, "attention with sinks for one new token (CPU)");
  m.def("pack_bf16", &pack_bf16, "bf16 weight -> 12-bit packed parts (CPU, threaded)");
  m.def("unpack_bf16", &unpack_bf16, "12-bit packed parts -> bf16 weight (CPU, threaded)");
#endif
}
