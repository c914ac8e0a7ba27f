// A torch-free driver of the CPU kernel cores (ossgpt/kernels/cpu/*.h), so that levels this
// machine cannot load as a torch extension still run against the plain reference: aarch64 NEON
// under qemu-user on x86 machines. tests/test_kernels_native.py builds it per level, writes each
// case's inputs, runs it, and compares what it writes with the plain PyTorch path.
//
//   harness IN OUT      IN: an op name and named arrays; OUT: the result arrays
// File format (little-endian): "OSSK", u32 count, then per array: u32 name length, name,
// u8 dtype (f float32, h bf16 bits, b uint8, l int64, i int32, ? bool), u32 ndim, int64 shape[ndim],
// the data. The op name is the array "op" (uint8 bytes).

#include <cstdio>
#include <cstring>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention.h"
#include "linear.h"
#include "moe.h"
#include "mxfp4.h"
#include "packed_bf16.h"

namespace {

struct Array {
  char dtype = 'f';
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
  template <class T> T* as() { return reinterpret_cast<T*>(bytes.data()); }
  template <class T> const T* as() const { return reinterpret_cast<const T*>(bytes.data()); }
};

int element_size(char dtype) {
  switch (dtype) {
    case 'f': case 'i': return 4;
    case 'h': return 2;
    case 'l': return 8;
    default: return 1;
  }
}

template <class T>
void read_into(FILE* f, T* p, size_t n) {
  if (fread(p, sizeof(T), n, f) != n) throw std::runtime_error("harness: truncated input");
}

std::map<std::string, Array> read_arrays(const char* path) {
  FILE* f = fopen(path, "rb");
  if (!f) throw std::runtime_error(std::string("harness: cannot open ") + path);
  char magic[4];
  uint32_t count;
  read_into(f, magic, 4);
  if (std::memcmp(magic, "OSSK", 4)) throw std::runtime_error("harness: not a case file");
  read_into(f, &count, 1);
  std::map<std::string, Array> out;
  for (uint32_t i = 0; i < count; ++i) {
    uint32_t len, ndim;
    read_into(f, &len, 1);
    std::string name(len, '\0');
    read_into(f, name.data(), len);
    Array a;
    read_into(f, &a.dtype, 1);
    read_into(f, &ndim, 1);
    a.shape.resize(ndim);
    read_into(f, a.shape.data(), ndim);
    a.bytes.resize(a.numel() * element_size(a.dtype));
    read_into(f, a.bytes.data(), a.bytes.size());
    out[name] = std::move(a);
  }
  fclose(f);
  return out;
}

void write_arrays(const char* path, const std::map<std::string, Array>& arrays) {
  FILE* f = fopen(path, "wb");
  if (!f) throw std::runtime_error(std::string("harness: cannot write ") + path);
  const uint32_t count = (uint32_t)arrays.size();
  fwrite("OSSK", 1, 4, f);
  fwrite(&count, 4, 1, f);
  for (const auto& [name, a] : arrays) {
    const uint32_t len = (uint32_t)name.size(), ndim = (uint32_t)a.shape.size();
    fwrite(&len, 4, 1, f);
    fwrite(name.data(), 1, len, f);
    fwrite(&a.dtype, 1, 1, f);
    fwrite(&ndim, 4, 1, f);
    fwrite(a.shape.data(), 8, ndim, f);
    fwrite(a.bytes.data(), 1, a.bytes.size(), f);
  }
  fclose(f);
}

Array empty(char dtype, std::vector<int64_t> shape) {
  Array a;
  a.dtype = dtype;
  a.shape = std::move(shape);
  a.bytes.resize(a.numel() * element_size(dtype));
  return a;
}

struct Case {
  std::map<std::string, Array> in;

  Array& operator[](const std::string& name) {
    auto it = in.find(name);
    if (it == in.end()) throw std::runtime_error("harness: missing array " + name);
    return it->second;
  }
  bool has(const std::string& name) const { return in.count(name) > 0; }
  float scalar(const std::string& name) { return (*this)[name].as<float>()[0]; }
};

// A weight as the extension takes it: "<prefix>" dense bf16, or "<prefix>.sm" ... packed.
ossgpt::linear::Weight weight(Case& c, const std::string& prefix) {
  ossgpt::linear::Weight w;
  if (c.has(prefix)) {
    Array& a = c[prefix];
    w.R = a.shape[0], w.K = a.shape[1];
    w.dense = a.as<uint16_t>();
    return w;
  }
  Array& sm = c[prefix + ".sm"];
  w.R = sm.shape[0], w.K = sm.shape[1];
  w.packed = {sm.as<uint8_t>(), c[prefix + ".nib"].as<uint8_t>(), c[prefix + ".base"].as<uint8_t>(),
              c[prefix + ".ptr"].as<int64_t>(), c[prefix + ".col"].as<int32_t>(), c[prefix + ".val"].as<float>(), w.K};
  return w;
}

ossgpt::packed::PackedBF16 packed_parts(Case& c) {
  Array& sm = c["sm"];
  return {sm.as<uint8_t>(), c["nib"].as<uint8_t>(), c["base"].as<uint8_t>(), c["ptr"].as<int64_t>(),
          c["col"].as<int32_t>(), c["val"].as<float>(), sm.shape[1]};
}

ossgpt::moe::ExpertMatrix matrix(Case& c, const std::string& prefix) {
  Array& blocks = c[prefix + "_blocks"];
  Array& bias = c[prefix + "_bias"];
  const bool bf16 = bias.dtype == 'h';
  return {blocks.as<uint8_t>(), c[prefix + "_scales"].as<uint8_t>(), bf16 ? nullptr : bias.as<float>(),
          bf16 ? bias.as<uint16_t>() : nullptr, blocks.shape[1], blocks.shape[2]};
}

std::map<std::string, Array> run(Case& c) {
  const Array& op_bytes = c["op"];
  const std::string op(op_bytes.bytes.begin(), op_bytes.bytes.end());
  const ossgpt::Parallel serial = ossgpt::Parallel::serial();
  std::map<std::string, Array> out;
  if (op == "level") {
    const std::string level = ossgpt::simd::kLevel;
    Array a = empty('b', {(int64_t)level.size()});
    std::memcpy(a.bytes.data(), level.data(), level.size());
    out["level"] = a;
  } else if (op == "moe") {     // x (N, C) float32, bf16 flag, indices, gates, mlp1_*, mlp2_*
    Array& x = c["x"];
    Array& idx = c["indices"];
    const int64_t N = x.shape[0], C = x.shape[1], E = c["mlp1_blocks"].shape[0];
    Array y = empty('f', {N, C});
    ossgpt::moe::forward(x.as<float>(), c.scalar("bf16") != 0.f, idx.as<int64_t>(), c["gates"].as<float>(), N,
                         idx.shape[1], C, E, matrix(c, "mlp1"), matrix(c, "mlp2"), c.scalar("limit"),
                         c.scalar("alpha"), y.as<float>(), serial);
    out["y"] = y;
  } else if (op == "dequantize_bf16") {   // blocks (G, 16), scales (G,)
    Array& s = c["scales"];
    Array y = empty('h', {s.numel() * 32});
    ossgpt::mxfp4::dequantize_bf16(c["blocks"].as<uint8_t>(), s.as<uint8_t>(), s.numel(), y.as<uint16_t>());
    out["y"] = y;
  } else if (op == "linear") {    // x (N, K) bf16, weight, bias (R,) bf16 (optional)
    Array& x = c["x"];
    const auto w = weight(c, "weight");
    Array y = empty('h', {x.shape[0], w.R});
    ossgpt::linear::forward(x.as<uint16_t>(), x.shape[0], w, c.has("bias") ? c["bias"].as<uint16_t>() : nullptr,
                            y.as<uint16_t>(), serial);
    out["y"] = y;
  } else if (op == "qkv_rope") {   // x (N, C) bf16, norm (C,) f32, eps, q/k/v weights and biases, cos, sin, rope_heads
    Array& x = c["x"];
    const ossgpt::linear::Weight w[3] = {weight(c, "q"), weight(c, "k"), weight(c, "v")};
    const uint16_t* const b[3] = {c["q_bias"].as<uint16_t>(), c["k_bias"].as<uint16_t>(), c["v_bias"].as<uint16_t>()};
    Array& cos = c["cos"];
    Array y = empty('h', {x.shape[0], w[0].R + w[1].R + w[2].R});
    ossgpt::linear::qkv_rope(x.as<uint16_t>(), x.shape[0], x.shape[1], c["norm"].as<float>(), c.scalar("eps"), w, b,
                             cos.as<float>(), c["sin"].as<float>(), 2 * cos.shape[1], (int64_t)c.scalar("rope_heads"),
                             y.as<uint16_t>(), serial);
    out["y"] = y;
  } else if (op == "attention") {   // q (B, H, D), k, v (B, S, K, D) bf16, sinks (H,), mask (B, S), scale
    Array& q = c["q"];
    Array& k = c["k"];
    const int64_t B = q.shape[0], H = q.shape[1], D = q.shape[2], S = k.shape[1], K = k.shape[2];
    Array y = empty('h', {B, H, D});
    ossgpt::attention::forward(q.as<uint16_t>(), k.as<uint16_t>(), c["v"].as<uint16_t>(), S * K * D, K * D,
                               c["sinks"].as<float>(), c["mask"].as<bool>(), B, H, K, S, D, c.scalar("scale"),
                               y.as<uint16_t>(), serial);
    out["y"] = y;
  } else if (op == "pack") {   // weight (R, K) bf16
    Array& w = c["weight"];
    const int64_t R = w.shape[0], K = w.shape[1];
    Array sm = empty('b', {R, K}), nib = empty('b', {R, K / 2}), base = empty('b', {R}), ptr = empty('l', {R + 1});
    const uint16_t* rows = w.as<uint16_t>();
    ptr.as<int64_t>()[0] = 0;
    for (int64_t r = 0; r < R; ++r) {
      base.as<uint8_t>()[r] = (uint8_t)ossgpt::packed::best_base(rows + r * K, K);
      ptr.as<int64_t>()[r + 1] = ptr.as<int64_t>()[r] + ossgpt::packed::listed_count(rows + r * K, K, base.as<uint8_t>()[r]);
    }
    Array col = empty('i', {ptr.as<int64_t>()[R]}), val = empty('f', {ptr.as<int64_t>()[R]});
    for (int64_t r = 0; r < R; ++r)
      ossgpt::packed::pack_row(rows + r * K, K, base.as<uint8_t>()[r], sm.as<uint8_t>() + r * K,
                               nib.as<uint8_t>() + r * K / 2, col.as<int32_t>(), val.as<float>(), ptr.as<int64_t>()[r]);
    out["sm"] = sm, out["nib"] = nib, out["base"] = base, out["ptr"] = ptr, out["col"] = col, out["val"] = val;
  } else if (op == "unpack") {   // the packed parts
    const auto w = packed_parts(c);
    const int64_t R = c["sm"].shape[0];
    Array y = empty('h', {R, w.K});
    for (int64_t r = 0; r < R; ++r) ossgpt::packed::unpack_row(w, r, y.as<uint16_t>() + r * w.K);
    out["y"] = y;
  } else {
    throw std::runtime_error("harness: unknown op " + op);
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  try {
    Case c{read_arrays(argv[1])};
    write_arrays(argv[2], run(c));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
