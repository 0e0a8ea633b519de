// The Cayley kernels of cayley_matmul.cpp on one small block, in the CPU kernels' scratch: all of a
// block's products stay in L1 and a call makes one pass over the batch, instead of one batched product
// per step. Same series and gradients as cayley_matmul.cpp.
#pragma once

#include <utility>

#include "small_matrix.h"

namespace orthoft {

// Blocks up to this size take these kernels; larger ones go to the batched products (BLAS).
constexpr int64_t kMaxCayleyBlockKernel = 32;

// n x n matrices of scratch the block kernels need, at most.
inline int64_t block_scratch_matrices(int64_t num_neumann_terms) { return 6 + neumann_top(num_neumann_terms) / 2; }

// m = S2 @ h + L_i for L_i = c_2i I + c_(2i+1) S (a step of Horner's rule in S2, see neumann_pairs).
template <int64_t Bytes, typename T>
ORTHOFT_ALWAYS_INLINE void horner_step(int64_t n, const T* s, const T* s2, const T* h, int i, int top, T* m) {
  matmul<Bytes>(n, s2, h, m, false);
  combine(n, m, T(1), s, T(series_coef(2 * i + 1, top)), T(series_coef(2 * i, top)));
}

// H_i for i = lowest .. half (H_half formed only for an odd top), as neumann_pairs: H_0 at h0 (when
// lowest is 0), H_i for i >= 1 at rest + (i - 1) n^2.
template <int64_t Bytes, typename T>
ORTHOFT_ALWAYS_INLINE void neumann_terms(int64_t n, const T* s, const T* s2, int top, int lowest, T* h0, T* rest) {
  const int half = top / 2;
  const int64_t nn = n * n;
  const auto h = [&](int i) { return i == 0 ? h0 : rest + (i - 1) * nn; };
  int i = half - 1;
  if (top % 2 == 1) {
    for (int64_t j = 0; j < nn; ++j) h(half)[j] = T(0);
    combine(n, h(half), T(0), s, T(series_coef(top, top)), T(series_coef(top - 1, top)));
  } else {  // H_(half-1) = c_top S2 + L_(half-1)
    if (i < lowest) return;
    for (int64_t j = 0; j < nn; ++j) h(i)[j] = T(series_coef(top, top)) * s2[j];
    combine(n, h(i), T(1), s, T(series_coef(2 * i + 1, top)), T(series_coef(2 * i, top)));
    --i;
  }
  for (; i >= lowest; --i) horner_step<Bytes>(n, s, s2, h(i + 1), i, top, h(i));
}

// out = p(S), PEFT's Neumann series of num_neumann_terms terms (>= 1).
template <int64_t Bytes, typename T>
ORTHOFT_ALWAYS_INLINE void neumann_block(int64_t n, int64_t num_neumann_terms, const T* s, T* out, T* scratch) {
  const int top = neumann_top(num_neumann_terms);
  const int64_t nn = n * n;
  if (top < 2) {
    for (int64_t j = 0; j < nn; ++j) out[j] = T(0);
    combine(n, out, T(0), s, T(series_coef(1, top)), T(1));
    return;
  }
  T* s2 = scratch;
  matmul<Bytes>(n, s, s, s2, false);
  neumann_terms<Bytes>(n, s, s2, top, 0, out, s2 + nn);
}

// ds = dp(S)/dS applied to g, as neumann_pairs_backward.
template <int64_t Bytes, typename T>
ORTHOFT_ALWAYS_INLINE void neumann_block_backward(int64_t n, int64_t num_neumann_terms, const T* s, const T* g,
                                                  T* ds, T* scratch) {
  const int top = neumann_top(num_neumann_terms);
  const int half = top / 2;
  const bool even = top % 2 == 0;
  const int64_t nn = n * n;
  if (top < 2) {
    for (int64_t j = 0; j < nn; ++j) ds[j] = T(series_coef(1, top)) * g[j];
    return;
  }
  T* s2 = scratch;
  T* s2t = s2 + nn;
  T* st = s2t + nn;
  T* dh = st + nn;
  T* next = dh + nn;
  T* ds2 = next + nn;
  T* h = ds2 + nn;  // H_i at h + (i - 1) n^2
  matmul<Bytes>(n, s, s, s2, false);
  transpose(n, s2, s2t);
  transpose(n, s, st);
  neumann_terms<Bytes, T>(n, s, s2, top, 1, nullptr, h);
  // ds = sum_i c_(2i+1) dH_i + dS2 S^T + S^T dS2, with dH_0 = g, dH_(i+1) = S2^T dH_i and
  // dS2 = sum_i dH_i H_(i+1)^T (H_half = c_top I for an even top).
  for (int64_t j = 0; j < nn; ++j) {
    dh[j] = g[j];
    ds[j] = T(series_coef(1, top)) * g[j];
    ds2[j] = T(0);
  }
  for (int i = 0; i < half; ++i) {
    if (i > 0) combine(n, ds, T(1), dh, T(series_coef(2 * i + 1, top)), T(0));
    if (i + 1 == half && even) {
      combine(n, ds2, T(1), dh, T(series_coef(top, top)), T(0));
      continue;
    }
    transpose(n, h + i * nn, next);
    matmul<Bytes>(n, dh, next, ds2, true);
    matmul<Bytes>(n, s2t, dh, next, false);
    std::swap(dh, next);
  }
  if (!even) combine(n, ds, T(1), dh, T(series_coef(top, top)), T(0));
  matmul<Bytes>(n, ds2, st, ds, true);
  matmul<Bytes>(n, st, ds2, ds, true);
}

// ds = -1/2 A^T g A^T with A = R + I = 2 inv(I + S), the exact transform's gradient.
template <int64_t Bytes, typename T>
ORTHOFT_ALWAYS_INLINE void exact_block_backward(int64_t n, const T* rotation, const T* g, T* ds, T* scratch) {
  T* at = scratch;
  T* product = at + n * n;
  transpose(n, rotation, at);
  for (int64_t j = 0; j < n * n; j += n + 1) at[j] += T(1);
  matmul<Bytes>(n, g, at, product, false);
  matmul<Bytes>(n, at, product, ds, false);
  for (int64_t j = 0; j < n * n; ++j) ds[j] *= T(-0.5);
}

}  // namespace orthoft
