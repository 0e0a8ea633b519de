// Vectors of the CPU kernels: GCC/Clang vector extensions of a given width in bytes, that the compiler
// lowers to the instruction set of the function they are inlined into (cpu_isa.h).
#pragma once

#include <cstdint>

namespace orthoft {

// may_alias lets buffers be read and written as scalars too; the element alignment keeps loads
// unaligned, as buffers are not aligned to the vector width.
template <typename T, int64_t Bytes>
struct Simd {
  typedef T type __attribute__((vector_size(Bytes), may_alias, aligned(sizeof(T))));
};
template <typename T, int64_t Bytes>
using simd_t = typename Simd<T, Bytes>::type;
template <typename T, int64_t Bytes>
constexpr int64_t kSimdWidth = Bytes / sizeof(T);

}  // namespace orthoft
