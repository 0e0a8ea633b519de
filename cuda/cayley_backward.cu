// CUDA kernels of the backward of cayley for b <= 64 (cayley.cuh): b x b products in shared memory.
#include "cayley.cuh"
#include "checks.h"

namespace orthoft {
namespace cuda {
namespace {

// dS = -1/2 (R + I)^T G (R + I)^T, as T = G M^T then dS = -1/2 M^T T with M = R + I.
template <typename scalar_t, int TILE>
__global__ void __launch_bounds__(kThreads)
    cayley_exact_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ rotation,
                                 scalar_t* __restrict__ out, int64_t num_mats, int b) {
  using acc = acc_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const Layout L(b);
  const Owner o(L, num_mats);
  acc* m_s = reinterpret_cast<acc*>(smem);
  acc* g_s = m_s + L.per_block * b * L.ld;
  stage(rotation, m_s, L, num_mats, [](acc x, bool diag) { return diag ? x + acc(1) : x; });
  stage(grad, g_s, L, num_mats, [](acc x, bool) { return x; });
  __syncthreads();

  acc t[TILE][TILE];
  matmul_owned<false, true>(g_s, m_s, L, o, t);
  __syncthreads();  // everyone is done reading G before it becomes T
  store_owned(g_s, L, o, t);
  __syncthreads();
  acc ds[TILE][TILE];
  matmul_owned<true, false>(m_s, g_s, L, o, ds);
#pragma unroll
  for (int a = 0; a < TILE; ++a) {
#pragma unroll
    for (int c = 0; c < TILE; ++c) {
      ds[a][c] *= acc(-0.5);
    }
  }
  write_owned(out, L, o, ds);
}

// dS = sum_n c_(n+1) U_n with U_n = sum_(a+c=n) T^a G T^c, T = S^T:
// U_0 = V_0 = G, V_n = V_(n-1) T, U_n = T U_(n-1) + V_n.
template <typename scalar_t, int TILE>
__global__ void __launch_bounds__(kThreads)
    cayley_neumann_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ skew,
                                   scalar_t* __restrict__ out, int64_t num_mats, int b, int top) {
  using acc = acc_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const Layout L(b);
  const Owner o(L, num_mats);
  const int mat_elems = L.per_block * b * L.ld;
  acc* s_s = reinterpret_cast<acc*>(smem);
  acc* u_s = s_s + mat_elems;
  acc* v_s = u_s + mat_elems;
  stage(skew, s_s, L, num_mats, [](acc x, bool) { return x; });
  stage(grad, u_s, L, num_mats, [](acc x, bool) { return x; });
  stage(grad, v_s, L, num_mats, [](acc x, bool) { return x; });
  __syncthreads();

  acc ds[TILE][TILE];
  const acc c1 = top == 0 ? acc(0) : acc(neumann_coef(1, top));
#pragma unroll
  for (int a = 0; a < TILE; ++a) {
#pragma unroll
    for (int c = 0; c < TILE; ++c) {
      const int i = min(o.row(L, a), b - 1), j = min(o.col(L, c), b - 1);
      ds[a][c] = c1 * u_s[(o.q * b + i) * L.ld + j];
    }
  }
  for (int n = 1; n < top; ++n) {
    acc u[TILE][TILE], v[TILE][TILE];
    matmul_owned<false, true>(v_s, s_s, L, o, v);
    matmul_owned<true, false>(s_s, u_s, L, o, u);
    const acc cn = acc(neumann_coef(n + 1, top));
#pragma unroll
    for (int a = 0; a < TILE; ++a) {
#pragma unroll
      for (int c = 0; c < TILE; ++c) {
        u[a][c] += v[a][c];
        ds[a][c] += cn * u[a][c];
      }
    }
    __syncthreads();  // all reads of U and V done
    store_owned(u_s, L, o, u);
    store_owned(v_s, L, o, v);
    __syncthreads();
  }
  write_owned(out, L, o, ds);
}

}  // namespace
}  // namespace cuda

Tensor cayley_backward_cuda(const Tensor& grad, const Tensor& skew, const Tensor& rotation,
                            int64_t num_neumann_terms) {
  check_cayley_backward(grad, skew, rotation, num_neumann_terms);
  STD_TORCH_CHECK(skew.is_cuda(), "orthoft.ops.cayley_backward: skew must be a CUDA tensor");
  const cuda::DeviceScope scope(skew);
  const int64_t b = skew.size(-1);
  if (skew.numel() == 0) {
    return new_tensor(skew, shape(skew));
  }
  if (b > kMaxEliminationBlock) {
    return cayley_backward_by_matmul(grad, skew, rotation, num_neumann_terms);
  }
  const Tensor g = torch::stable::contiguous(grad);
  Tensor out = new_tensor(g, shape(g));
  const int64_t num_mats = g.numel() / (b * b);
  const cuda::Layout L(static_cast<int>(b));

  ORTHOFT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "orthoft_cayley_backward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    cuda::dispatch_tile(L.b, [&](auto tile) {
      constexpr int TILE = decltype(tile)::value;
      if (num_neumann_terms == 0) {
        const Tensor r = torch::stable::contiguous(rotation);
        cuda::launch_matrices(cuda::cayley_exact_backward_kernel<scalar_t, TILE>, num_mats, L,
                              L.smem_matrices(2, sizeof(acc)), scope.stream(), g.const_data_ptr<scalar_t>(),
                              r.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), num_mats, L.b);
      } else {
        const Tensor s = torch::stable::contiguous(skew);
        cuda::launch_matrices(cuda::cayley_neumann_backward_kernel<scalar_t, TILE>, num_mats, L,
                              L.smem_matrices(3, sizeof(acc)), scope.stream(), g.const_data_ptr<scalar_t>(),
                              s.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), num_mats, L.b,
                              neumann_top(num_neumann_terms));
      }
    });
  });
  return out;
}

STABLE_TORCH_LIBRARY_IMPL(orthoft, CUDA, m) { m.impl("cayley_backward", TORCH_BOX(&cayley_backward_cuda)); }

}  // namespace orthoft
