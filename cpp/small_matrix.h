// Elimination on one small row-major n x n matrix, for the CPU Cayley kernel.
#pragma once

#include <cstdint>

namespace orthoft {

// inverse = inv(I + skew) by Gauss-Jordan elimination without pivoting: the symmetric part of I + S is
// I, so every pivot is at least 1 in the Schur complements. work is n x n scratch.
template <typename T>
void inverse_of_identity_plus(int64_t n, const T* skew, T* work, T* inverse) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      work[i * n + j] = skew[i * n + j] + T(i == j ? 1 : 0);
      inverse[i * n + j] = T(i == j ? 1 : 0);
    }
  }
  for (int64_t k = 0; k < n; ++k) {
    const T scale = T(1) / work[k * n + k];
    for (int64_t j = 0; j < n; ++j) {
      work[k * n + j] *= scale;
      inverse[k * n + j] *= scale;
    }
    for (int64_t i = 0; i < n; ++i) {
      const T factor = work[i * n + k];
      if (i == k || factor == T(0)) continue;
      for (int64_t j = k; j < n; ++j) work[i * n + j] -= factor * work[k * n + j];
      for (int64_t j = 0; j < n; ++j) inverse[i * n + j] -= factor * inverse[k * n + j];
    }
  }
}

}  // namespace orthoft
