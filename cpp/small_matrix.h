// Helpers of the CPU Cayley kernels: elimination on one small row-major n x n matrix, and PEFT's
// Neumann coefficients.
#pragma once

#include <cstdint>
#include <vector>

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

// PEFT's Cayley-Neumann coefficients of S^0 .. S^j for num_terms series terms.
inline std::vector<double> neumann_coefficients(int64_t num_terms) {
  if (num_terms <= 1) return {1.0};
  if (num_terms == 2) return {1.0, 2.0};
  const int64_t top = (num_terms < 4 ? 4 : num_terms) - 1;  // 3 terms are computed as 4 by PEFT
  std::vector<double> c(top + 1, 2.0);
  c.front() = 1.0;
  c.back() = 1.0;
  return c;
}

}  // namespace orthoft
