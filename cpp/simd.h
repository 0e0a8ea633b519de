// Vectors of the CPU kernels: GCC/Clang vector extensions of a given width in bytes, that the compiler
// lowers to the instruction set of the function they are inlined into (cpu_isa.h).
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include "cpu_isa.h"

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

// Element j of a shuffle of rows a and b (elements W .. 2W of the pair are b's) for one stage of a
// transpose: the low row takes the first `s` of every 2s elements of a and of b, the high row the rest.
constexpr int64_t exchange_index(int64_t w, int64_t s, bool high, int64_t j) {
  return high ? ((j & s) == 0 ? j + s : w + j) : ((j & s) == 0 ? j : w + j - s);
}

template <typename T, int64_t Bytes, int64_t S, bool High, size_t... J>
ORTHOFT_ALWAYS_INLINE simd_t<T, Bytes> exchange(simd_t<T, Bytes> a, simd_t<T, Bytes> b, std::index_sequence<J...>) {
  constexpr int64_t w = kSimdWidth<T, Bytes>;
#if defined(__clang__)
  return __builtin_shufflevector(a, b, exchange_index(w, S, High, J)...);
#else
  using Index = std::conditional_t<sizeof(T) == 8, int64_t, int32_t>;
  typedef Index Indices __attribute__((vector_size(Bytes)));
  return __builtin_shuffle(a, b, Indices{static_cast<Index>(exchange_index(w, S, High, J))...});
#endif
}

// A W x W square held as W row vectors, transposed in place: log2(W) stages, each swapping blocks of S
// elements between rows S apart.
template <typename T, int64_t Bytes, int64_t S = kSimdWidth<T, Bytes> / 2>
ORTHOFT_ALWAYS_INLINE void transpose_square(simd_t<T, Bytes>* rows) {
  constexpr int64_t w = kSimdWidth<T, Bytes>;
  for (int64_t i = 0; i < w; ++i) {
    if ((i & S) != 0) continue;
    const simd_t<T, Bytes> a = rows[i], b = rows[i + S];
    rows[i] = exchange<T, Bytes, S, false>(a, b, std::make_index_sequence<w>{});
    rows[i + S] = exchange<T, Bytes, S, true>(a, b, std::make_index_sequence<w>{});
  }
  if constexpr (S > 1) transpose_square<T, Bytes, S / 2>(rows);
}

}  // namespace orthoft
