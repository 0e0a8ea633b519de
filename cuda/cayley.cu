// CUDA kernels of cayley for b <= 64 (cayley.cuh): exact, by Gauss-Jordan inversion of I + S in
// registers with one barrier per pivot, the pivot row and column passed through small double-buffered
// shared arrays; and PEFT's Neumann series by Horner's rule.
#include "cayley.cuh"
#include "checks.h"

namespace orthoft {
namespace cuda {
namespace {

// R = 2 inv(I + S) - I by Gauss-Jordan without pivoting (the symmetric part of I + S is I).
// Step k turns column k into e_k and applies the same row operations to the identity, in place.
// Either a thread's entries all belong to one matrix (b > 16) or it owns a single entry, so it
// needs one pivot per step.
template <typename scalar_t, int TILE>
__global__ void __launch_bounds__(kThreads)
    cayley_exact_kernel(const scalar_t* __restrict__ skew, scalar_t* __restrict__ out, int64_t num_mats, int b) {
  using acc = acc_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const Layout L(b);
  const Owner o(L, num_mats);
  const int buf = L.per_block * b;
  acc* pivot_col = reinterpret_cast<acc*>(smem);  // [2][per_block][b]: column k of each matrix
  acc* pivot_row = pivot_col + 2 * buf;            // [2][per_block][b]: row k of each matrix

  acc v[TILE][TILE] = {};
#pragma unroll
  for (int a = 0; a < TILE; ++a) {
#pragma unroll
    for (int c = 0; c < TILE; ++c) {
      if (o.owns(L, a, c)) {
        const int i = o.row(L, a), j = o.col(L, c);
        v[a][c] = static_cast<acc>(skew[o.offset + i * b + j]) + acc(i == j ? 1 : 0);
        if (j == 0) pivot_col[o.q * b + i] = v[a][c];
        if (i == 0) pivot_row[o.q * b + j] = v[a][c];
      }
    }
  }
  __syncthreads();

  for (int k = 0; k < b; ++k) {
    const int cur = (k & 1) * buf + o.q * b;
    const int nxt = ((k + 1) & 1) * buf + o.q * b;
    if (o.active) {
      const acc inv = acc(1) / pivot_row[cur + k];
#pragma unroll
      for (int a = 0; a < TILE; ++a) {
        const int i = o.row(L, a);
        const acc f = pivot_col[cur + min(i, b - 1)];
#pragma unroll
        for (int c = 0; c < TILE; ++c) {
          const int j = o.col(L, c);
          if (i < b && j < b) {
            const acc rk = j == k ? inv : pivot_row[cur + j] * inv;  // new row k
            const acc x = i == k ? rk : (j == k ? acc(0) : v[a][c]) - f * rk;
            v[a][c] = x;
            if (j == k + 1) pivot_col[nxt + i] = x;
            if (i == k + 1) pivot_row[nxt + j] = x;
          }
        }
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int a = 0; a < TILE; ++a) {
#pragma unroll
    for (int c = 0; c < TILE; ++c) {
      v[a][c] = 2 * v[a][c] - acc(o.row(L, a) == o.col(L, c) ? 1 : 0);
    }
  }
  write_owned(out, L, o, v);
}

// R = sum_j c_j S^j by Horner: P = c_top S + c_(top-1) I, then P <- P S + c_j I down to j = 0.
template <typename scalar_t, int TILE>
__global__ void __launch_bounds__(kThreads)
    cayley_neumann_kernel(const scalar_t* __restrict__ skew, scalar_t* __restrict__ out, int64_t num_mats, int b,
                          int top) {
  using acc = acc_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const Layout L(b);
  const Owner o(L, num_mats);
  acc* s_s = reinterpret_cast<acc*>(smem);
  acc* p_s = s_s + L.per_block * b * L.ld;
  stage(skew, s_s, L, num_mats, [](acc x, bool) { return x; });
  __syncthreads();

  acc p[TILE][TILE];
#pragma unroll
  for (int a = 0; a < TILE; ++a) {
#pragma unroll
    for (int c = 0; c < TILE; ++c) {
      const int i = min(o.row(L, a), b - 1), j = min(o.col(L, c), b - 1);
      const acc eye = acc(i == j ? 1 : 0);
      p[a][c] = top == 0 ? eye
                         : acc(neumann_coef(top, top)) * s_s[(o.q * b + i) * L.ld + j] +
                               acc(neumann_coef(top - 1, top)) * eye;
    }
  }
  for (int j = top - 2; j >= 0; --j) {
    store_owned(p_s, L, o, p);
    __syncthreads();
    matmul_owned<false, false>(p_s, s_s, L, o, p);
#pragma unroll
    for (int a = 0; a < TILE; ++a) {  // row == column only for a == c (ty, tx < g)
      p[a][a] += o.row(L, a) == o.col(L, a) ? acc(neumann_coef(j, top)) : acc(0);
    }
    __syncthreads();  // P is overwritten next step
  }
  write_owned(out, L, o, p);
}

}  // namespace
}  // namespace cuda

Tensor cayley_cuda(const Tensor& skew, int64_t num_neumann_terms) {
  check_cayley(skew, num_neumann_terms);
  STD_TORCH_CHECK(skew.is_cuda(), "orthoft.ops.cayley: skew must be a CUDA tensor");
  const cuda::DeviceScope scope(skew);
  const int64_t b = skew.size(-1);
  if (skew.numel() == 0) {
    return new_tensor(skew, shape(skew));
  }
  if (b > kMaxEliminationBlock) {
    return cayley_by_matmul(skew, num_neumann_terms);
  }
  const Tensor s = torch::stable::contiguous(skew);
  Tensor out = new_tensor(s, shape(s));
  const int64_t num_mats = s.numel() / (b * b);
  const cuda::Layout L(static_cast<int>(b));

  ORTHOFT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "orthoft_cayley_cuda", [&] {
    using acc = acc_t<scalar_t>;
    cuda::dispatch_tile(L.b, [&](auto tile) {
      constexpr int TILE = decltype(tile)::value;
      if (num_neumann_terms == 0) {
        cuda::launch_matrices(cuda::cayley_exact_kernel<scalar_t, TILE>, num_mats, L,
                              4 * L.per_block * b * sizeof(acc), scope.stream(), s.const_data_ptr<scalar_t>(),
                              out.mutable_data_ptr<scalar_t>(), num_mats, L.b);
      } else {
        cuda::launch_matrices(cuda::cayley_neumann_kernel<scalar_t, TILE>, num_mats, L,
                              L.smem_matrices(2, sizeof(acc)), scope.stream(), s.const_data_ptr<scalar_t>(),
                              out.mutable_data_ptr<scalar_t>(), num_mats, L.b, neumann_top(num_neumann_terms));
      }
    });
  });
  return out;
}

STABLE_TORCH_LIBRARY_IMPL(orthoft, CUDA, m) { m.impl("cayley", TORCH_BOX(&cayley_cuda)); }

}  // namespace orthoft
