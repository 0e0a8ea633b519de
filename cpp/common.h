// What every orthoft kernel, CPU and CUDA, shares: the LibTorch stable-ABI types, the accumulation
// type, one dtype dispatch, and PEFT's Cayley-Neumann coefficients.
//
// Only torch/csrc/stable and torch/headeronly headers: the build sets TORCH_TARGET_VERSION to torch
// 2.10, so orthoft._C loads on every torch from 2.10 on.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/Dispatch.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/macros/Macros.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <array>
#include <cstdint>
#include <vector>

namespace orthoft {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// Accumulation type: float for float16, bfloat16 and float32; double for double.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

inline ScalarType acc_dtype(ScalarType t) { return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float; }

// Runs the lambda in __VA_ARGS__ with scalar_t set to the C++ type of TYPE, one of the four dtypes.
#define ORTHOFT_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...)                                       \
  THO_DISPATCH_SWITCH(TYPE, NAME,                                                               \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::Float, __VA_ARGS__)     \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::Double, __VA_ARGS__)    \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::Half, __VA_ARGS__)      \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::BFloat16, __VA_ARGS__))

// The same for the two dtypes the CPU kernels compute in themselves (the others take a matmul path).
#define ORTHOFT_DISPATCH_FLOAT_DOUBLE(TYPE, NAME, ...)                                         \
  THO_DISPATCH_SWITCH(TYPE, NAME,                                                               \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::Float, __VA_ARGS__)     \
                      THO_DISPATCH_CASE(torch::headeronly::ScalarType::Double, __VA_ARGS__))

inline bool is_float_or_double(const Tensor& t) {
  return t.scalar_type() == ScalarType::Float || t.scalar_type() == ScalarType::Double;
}

// PEFT's Cayley-Neumann series with k terms, R = sum_j c_j S^j for j = 0 .. top: k = 1 gives I,
// k = 2 gives I + 2S, k >= 3 gives I + 2S + ... + 2S^(top-1) + S^top with top = max(k, 4) - 1 (PEFT
// computes 3 terms as 4).
C10_HOST_DEVICE constexpr int neumann_top(int64_t num_terms) {
  return num_terms <= 1 ? 0 : (num_terms == 2 ? 1 : static_cast<int>(num_terms < 4 ? 4 : num_terms) - 1);
}

C10_HOST_DEVICE constexpr double neumann_coef(int j, int top) {
  return j == 0 ? 1.0 : (j < top || top == 1 ? 2.0 : 1.0);
}

// c_j for any j >= 0: zero above the top degree.
C10_HOST_DEVICE constexpr double series_coef(int j, int top) { return j <= top ? neumann_coef(j, top) : 0.0; }

// A new uninitialised tensor on t's device, of t's dtype unless one is given.
inline Tensor new_tensor(const Tensor& t, const std::vector<int64_t>& sizes, ScalarType dtype) {
  return torch::stable::new_empty(t, sizes, dtype);
}
inline Tensor new_tensor(const Tensor& t, const std::vector<int64_t>& sizes) {
  return new_tensor(t, sizes, t.scalar_type());
}

inline std::vector<int64_t> shape(const Tensor& t) {
  const auto sizes = t.sizes();
  return std::vector<int64_t>(sizes.begin(), sizes.end());
}

// out[e] = the sum over parts of partial[part * numel + e], added in part order, so that a gradient split
// into parts between threads does not depend on how they were scheduled.
template <typename Acc, typename T>
void add_parts(const Acc* partial, int64_t parts, int64_t numel, T* out) {
  for (int64_t e = 0; e < numel; ++e) {
    Acc total = 0;
    for (int64_t part = 0; part < parts; ++part) total += partial[part * numel + e];
    out[e] = static_cast<T>(total);
  }
}

// A result computed in the accumulation type, as a contiguous tensor of input's dtype and shape.
inline Tensor result_like(const Tensor& result, const Tensor& input) {
  return torch::stable::contiguous(
      torch::stable::reshape(torch::stable::to(result, input.scalar_type()), shape(input)));
}

// Calls an ATen operator through torch's stable dispatcher, with every argument its schema lists, and
// returns its (first) tensor result.
template <typename... Args>
Tensor call_aten(const char* name, const char* overload, const Args&... args) {
  std::array<StableIValue, sizeof...(Args)> stack{torch::stable::detail::from(args)...};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

}  // namespace orthoft
