// Products and elimination on small row-major n x n matrices, for the CPU Cayley kernels. Inlined into
// each instruction set's kernel, whose vectors the row loops then use.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu_isa.h"
#include "simd.h"

namespace orthoft {

// dst[j] -= factor * src[j]; distinct rows, so the compiler vectorises without alias checks.
template <typename T>
ORTHOFT_ALWAYS_INLINE void subtract_row(T* __restrict dst, const T* __restrict src, T factor, int64_t length) {
  for (int64_t j = 0; j < length; ++j) dst[j] -= factor * src[j];
}

// c = a @ b, or c += a @ b, for n = N known at compile time: rows of c in vectors of Bytes bytes (the
// instruction set's), R rows at a time, as many as keep 8 (16 with AVX-512's 32 registers)
// accumulator vectors, so that independent chains of products are in flight.
template <int64_t Bytes, typename T, int64_t N>
ORTHOFT_ALWAYS_INLINE void matmul_fixed(const T* a, const T* b, T* c, bool accumulate) {
  constexpr int64_t bytes = N * int64_t(sizeof(T)) < Bytes ? N * int64_t(sizeof(T)) : Bytes;
  using V = simd_t<T, bytes>;
  constexpr int64_t per_row = N * int64_t(sizeof(T)) / bytes;
  constexpr int64_t budget = Bytes == 64 ? 16 : 8;
  constexpr int64_t R = std::max<int64_t>(1, std::min<int64_t>(N, budget / per_row));
  static_assert(N % R == 0, "R must divide N");
  const V* b_rows = reinterpret_cast<const V*>(b);
  V* c_rows = reinterpret_cast<V*>(c);
  for (int64_t i = 0; i < N; i += R) {
    V sum[R][per_row];
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t v = 0; v < per_row; ++v) sum[r][v] = accumulate ? c_rows[(i + r) * per_row + v] : V{};
    }
    for (int64_t k = 0; k < N; ++k) {
      for (int64_t v = 0; v < per_row; ++v) {
        const V row = b_rows[k * per_row + v];
        for (int64_t r = 0; r < R; ++r) sum[r][v] += a[(i + r) * N + k] * row;
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t v = 0; v < per_row; ++v) c_rows[(i + r) * per_row + v] = sum[r][v];
    }
  }
}

// c = a @ b, or c += a @ b; c is neither a nor b. Block sizes 8, 16 and 32 in whole vectors.
template <int64_t Bytes, typename T>
ORTHOFT_ALWAYS_INLINE void matmul(int64_t n, const T* a, const T* b, T* __restrict c, bool accumulate) {
  if (n == 8) return matmul_fixed<Bytes, T, 8>(a, b, c, accumulate);
  if (n == 16) return matmul_fixed<Bytes, T, 16>(a, b, c, accumulate);
  if (n == 32) return matmul_fixed<Bytes, T, 32>(a, b, c, accumulate);
  for (int64_t i = 0; i < n; ++i) {
    T* __restrict row = c + i * n;
    if (!accumulate) {
      for (int64_t j = 0; j < n; ++j) row[j] = T(0);
    }
    for (int64_t k = 0; k < n; ++k) subtract_row(row, b + k * n, -a[i * n + k], n);
  }
}

template <typename T>
ORTHOFT_ALWAYS_INLINE void transpose(int64_t n, const T* a, T* __restrict out) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) out[j * n + i] = a[i * n + j];
  }
}

// m = alpha m + beta x + gamma I.
template <typename T>
ORTHOFT_ALWAYS_INLINE void combine(int64_t n, T* __restrict m, T alpha, const T* __restrict x, T beta, T gamma) {
  for (int64_t j = 0; j < n * n; ++j) m[j] = alpha * m[j] + beta * x[j];
  for (int64_t j = 0; j < n * n; j += n + 1) m[j] += gamma;
}

// inverse = inv(I + skew) by Gauss-Jordan elimination without pivoting: the symmetric part of I + S is
// I, so every pivot is at least 1 in the Schur complements. work is n x 2n scratch, the augmented
// [I + S | I]; step k touches its columns from k on, the ones left of k being eliminated already.
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
