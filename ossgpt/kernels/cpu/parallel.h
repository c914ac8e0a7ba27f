// What the torch-free cores need from their caller: a parallel loop and scratch memory. The
// extension passes at::parallel_for (torch's thread pool); the native test harness a plain loop.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>

namespace ossgpt {

struct Parallel {
  int threads = 1;
  // f(b, e) over pieces of [begin, end), each at least `grain` long (but the last)
  std::function<void(int64_t begin, int64_t end, int64_t grain,
                     const std::function<void(int64_t, int64_t)>& f)> loop;

  void operator()(int64_t begin, int64_t end, int64_t grain,
                  const std::function<void(int64_t, int64_t)>& f) const {
    if (begin < end) loop(begin, end, grain, f);
  }

  static Parallel serial() {
    return {1, [](int64_t b, int64_t e, int64_t, const std::function<void(int64_t, int64_t)>& f) { f(b, e); }};
  }
};

// n elements of T, not initialised (std::vector would zero what the kernels overwrite anyway:
// a prefill's intermediate activations are tens of MB).
template <class T>
struct Buffer {
  std::unique_ptr<T[]> data;
  explicit Buffer(int64_t n) : data(new T[n > 0 ? n : 1]) {}
  T* get() const { return data.get(); }
};

}  // namespace ossgpt
