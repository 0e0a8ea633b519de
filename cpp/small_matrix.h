// Elimination on one small row-major n x n matrix, for the CPU Cayley kernel.
#pragma once

#include <cstdint>

#include "cpu_isa.h"

namespace orthoft {

// dst[j] -= factor * src[j]; distinct rows, so the compiler vectorises without alias checks.
template <typename T>
ORTHOFT_ALWAYS_INLINE void subtract_row(T* __restrict dst, const T* __restrict src, T factor, int64_t length) {
  for (int64_t j = 0; j < length; ++j) dst[j] -= factor * src[j];
}

// inverse = inv(I + skew) by Gauss-Jordan elimination without pivoting: the symmetric part of I + S is
// I, so every pivot is at least 1 in the Schur complements. work is n x 2n scratch, the augmented
// [I + S | I]; step k touches its columns from k on, the ones left of k being eliminated already.
// Inlined into each instruction set's kernel, whose vectors the row updates then use.
template <typename T>
ORTHOFT_ALWAYS_INLINE void inverse_of_identity_plus(int64_t n, const T* skew, T* work, T* inverse) {
  const int64_t width = 2 * n;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      work[i * width + j] = skew[i * n + j] + T(i == j ? 1 : 0);
      work[i * width + n + j] = T(i == j ? 1 : 0);
    }
  }
  for (int64_t k = 0; k < n; ++k) {
    T* pivot_row = work + k * width;
    const T scale = T(1) / pivot_row[k];
    // From a multiple of 16 columns: the pivot row is zero left of k, and whole vectors beat a tail.
    const int64_t first = k - k % 16;
    for (int64_t j = first; j < width; ++j) pivot_row[j] *= scale;
    for (int64_t i = 0; i < n; ++i) {
      const T factor = work[i * width + k];
      if (i != k && factor != T(0)) subtract_row(work + i * width + first, pivot_row + first, factor, width - first);
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) inverse[i * n + j] = work[i * width + n + j];
  }
}

}  // namespace orthoft
