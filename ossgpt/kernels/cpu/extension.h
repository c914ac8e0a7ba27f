// What the extension's torch-facing files share: the cores' Parallel on torch's thread pool, and
// raw views of tensors. The cores (the other headers here) never include torch.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>

#include "parallel.h"

namespace ossgpt {

inline Parallel torch_parallel() {
  return {at::get_num_threads(),
          [](int64_t b, int64_t e, int64_t grain, const std::function<void(int64_t, int64_t)>& f) {
            at::parallel_for(b, e, grain, f);
          }};
}

inline const uint16_t* bf16_data(const torch::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}
inline uint16_t* bf16_data(torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

}  // namespace ossgpt
