// CUDA kernels of cayley and its backward for a batch of b x b matrices, b <= 64 on the fast path.
//
// A block of 256 threads holds 256 / g^2 matrices (g = min(b, 16)); thread (ty, tx) of a matrix owns its
// entries (ty + g*a, tx + g*c), a, c < TILE = ceil(b / g), in registers. Exact: Gauss-Jordan inversion of
// I + S in those registers, one barrier per pivot, the pivot row and column passed through small
// double-buffered shared arrays. Neumann and the backwards: b x b products with operands in shared memory
// (row stride b + 1, so row and column walks are free of bank conflicts). b > 64: ATen fallback.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "checks.h"
#include "utils.cuh"

namespace orthoft {
namespace {

using cuda::acc_t;

constexpr int kThreads = 256;
constexpr int kLanes = 16;      // threads per matrix side
constexpr int kMaxTile = 4;     // entries per thread per matrix side
constexpr int kMaxFast = kLanes * kMaxTile;

// Highest power of S in PEFT's series with k terms: k = 1 -> I, 2 -> I + 2S, k >= 3 -> ... + S^(max(k,4)-1).
int neumann_top(int64_t num_terms) {
  TORCH_CHECK_VALUE(num_terms < std::numeric_limits<int>::max(), "orthoft.ops.cayley: num_neumann_terms must be ",
                    "below 2^31 - 1, got ", num_terms);
  return num_terms <= 1 ? 0 : (num_terms == 2 ? 1 : std::max<int>(static_cast<int>(num_terms), 4) - 1);
}

// Coefficient of S^j in that series: 1, 2, ..., 2, 1 (1, 2 when top is 1).
__host__ __device__ inline double neumann_coef(int j, int top) {
  return j == 0 ? 1.0 : (j < top || top == 1 ? 2.0 : 1.0);
}

struct Layout {
  int b, g, per_block, ld;
  __host__ __device__ explicit Layout(int b_)
      : b(b_), g(b_ < kLanes ? b_ : kLanes), per_block(kThreads / (g * g)), ld(b_ + 1) {}
  __host__ __device__ int64_t smem_matrices(int count, size_t elem) const {
    return static_cast<int64_t>(count) * per_block * b * ld * elem;
  }
};

// The entries this thread owns: rows ty + g*a, columns tx + g*c of matrix q of the block.
struct Owner {
  int q, ty, tx;
  bool active;  // idle lanes and matrices past the end still reach every barrier
  int64_t offset;
  __device__ Owner(const Layout& L, int64_t num_mats) {
    const int per_mat = L.g * L.g;
    const int slot = threadIdx.x / per_mat;
    q = min(slot, L.per_block - 1);  // idle lanes read a real matrix of the block, so shared reads stay in bounds
    ty = threadIdx.x % per_mat / L.g;
    tx = threadIdx.x % L.g;
    const int64_t mat = static_cast<int64_t>(blockIdx.x) * L.per_block + slot;
    active = slot < L.per_block && mat < num_mats;
    offset = mat * L.b * L.b;
  }
  __device__ int row(const Layout& L, int a) const { return ty + L.g * a; }
  __device__ int col(const Layout& L, int c) const { return tx + L.g * c; }
  __device__ bool owns(const Layout& L, int a, int c) const { return active && row(L, a) < L.b && col(L, c) < L.b; }
};

// Copies this block's matrices from global (contiguous b x b) into shared memory (row stride ld) as
// f(value, is_diagonal), coalesced over the whole block.
template <typename scalar_t, typename acc, typename F>
__device__ void stage(const scalar_t* __restrict__ src, acc* dst, const Layout& L, int64_t num_mats, F f) {
  const int per_mat = L.b * L.b;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * L.per_block;
  for (int idx = threadIdx.x; idx < L.per_block * per_mat; idx += kThreads) {
    const int q = idx / per_mat;
    const int i = idx % per_mat / L.b;
    const int j = idx % L.b;
    if (first + q < num_mats) {
      dst[(q * L.b + i) * L.ld + j] = f(static_cast<acc>(src[first * per_mat + idx]), i == j);
    }
  }
}

// out[a][c] = sum_l op(A)[i][l] op(B)[l][j] over the owned entries, op transposing when asked.
// Rows and columns past b are clamped: they compute a copy that is never stored.
template <bool kTransA, bool kTransB, int TILE, typename acc>
__device__ void matmul_owned(const acc* A, const acc* B, const Layout& L, const Owner& o,
                             acc (&out)[TILE][TILE]) {
  const acc* a_mat = A + o.q * L.b * L.ld;
  const acc* b_mat = B + o.q * L.b * L.ld;
  int ii[TILE], jj[TILE];
#pragma unroll
  for (int t = 0; t < TILE; ++t) {
    ii[t] = min(o.row(L, t), L.b - 1);
    jj[t] = min(o.col(L, t), L.b - 1);
  }
#pragma unroll
  for (int a = 0; a < TILE; ++a) {
#pragma unroll
    for (int c = 0; c < TILE; ++c) {
      out[a][c] = 0;
    }
  }
  for (int l = 0; l < L.b; ++l) {
    acc x[TILE], y[TILE];
#pragma unroll
    for (int t = 0; t < TILE; ++t) {
      x[t] = kTransA ? a_mat[l * L.ld + ii[t]] : a_mat[ii[t] * L.ld + l];
      y[t] = kTransB ? b_mat[jj[t] * L.ld + l] : b_mat[l * L.ld + jj[t]];
    }
#pragma unroll
    for (int a = 0; a < TILE; ++a) {
#pragma unroll
      for (int c = 0; c < TILE; ++c) {
        out[a][c] += x[a] * y[c];
      }
    }
  }
}

template <int TILE, typename acc>
__device__ void store_owned(acc* smem, const Layout& L, const Owner& o, const acc (&val)[TILE][TILE]) {
#pragma unroll
  for (int a = 0; a < TILE; ++a) {
#pragma unroll
    for (int c = 0; c < TILE; ++c) {
      if (o.owns(L, a, c)) {
        smem[(o.q * L.b + o.row(L, a)) * L.ld + o.col(L, c)] = val[a][c];
      }
    }
  }
}

template <int TILE, typename scalar_t, typename acc>
__device__ void write_owned(scalar_t* __restrict__ out, const Layout& L, const Owner& o,
                            const acc (&val)[TILE][TILE]) {
#pragma unroll
  for (int a = 0; a < TILE; ++a) {
#pragma unroll
    for (int c = 0; c < TILE; ++c) {
      if (o.owns(L, a, c)) {
        out[o.offset + o.row(L, a) * L.b + o.col(L, c)] = static_cast<scalar_t>(val[a][c]);
      }
    }
  }
}

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

// Calls f with the entries per thread per side as a compile-time constant.
template <typename F>
void dispatch_tile(int b, F&& f) {
  switch ((b + kLanes - 1) / kLanes) {
    case 1:
      f(std::integral_constant<int, 1>{});
      break;
    case 2:
      f(std::integral_constant<int, 2>{});
      break;
    case 3:
      f(std::integral_constant<int, 3>{});
      break;
    default:
      f(std::integral_constant<int, 4>{});
      break;
  }
}

template <typename Kernel, typename... Args>
void launch(Kernel kernel, int64_t num_mats, const Layout& L, int64_t smem, Args... args) {
  const int64_t grid = cuda::ceil_div(num_mats, L.per_block);
  TORCH_CHECK(grid <= std::numeric_limits<int32_t>::max(), "orthoft.ops.cayley: ", num_mats,
              " matrices are more than one launch can cover");
  cuda::allow_dynamic_smem(kernel, smem);
  kernel<<<grid, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// b > 64: the same functions through ATen, in the accumulation type.
at::Tensor cayley_fallback(const at::Tensor& skew, int64_t num_terms) {
  const at::Tensor s = skew.to(at::toOpMathType(skew.scalar_type()));
  const at::Tensor eye = at::eye(s.size(-1), s.options());
  at::Tensor r;
  if (num_terms == 0) {
    r = 2 * at::linalg_inv(eye + s) - eye;
  } else {
    const int top = neumann_top(num_terms);
    if (top == 0) {
      r = eye.expand_as(s).clone();
    } else {
      r = neumann_coef(top, top) * s + neumann_coef(top - 1, top) * eye;
      for (int j = top - 2; j >= 0; --j) {
        r = at::matmul(r, s) + neumann_coef(j, top) * eye;
      }
    }
  }
  return r.to(skew.scalar_type());
}

at::Tensor cayley_backward_fallback(const at::Tensor& grad, const at::Tensor& skew, const at::Tensor& rotation,
                                    int64_t num_terms) {
  const auto acc_type = at::toOpMathType(skew.scalar_type());
  const at::Tensor g = grad.to(acc_type);
  at::Tensor ds;
  if (num_terms == 0) {
    const at::Tensor m = rotation.to(acc_type) + at::eye(skew.size(-1), g.options());
    ds = -0.5 * at::matmul(at::matmul(m.mT(), g), m.mT());
  } else {
    const int top = neumann_top(num_terms);
    const at::Tensor t = skew.to(acc_type).mT();
    at::Tensor u = g, v = g;
    ds = top == 0 ? at::zeros_like(g) : neumann_coef(1, top) * g;
    for (int n = 1; n < top; ++n) {
      v = at::matmul(v, t);
      u = at::matmul(t, u) + v;
      ds = ds + neumann_coef(n + 1, top) * u;
    }
  }
  return ds.to(skew.scalar_type());
}

at::Tensor cayley_cuda(const at::Tensor& skew, int64_t num_neumann_terms) {
  check_cayley(skew, num_neumann_terms);
  TORCH_CHECK(skew.is_cuda(), "orthoft.ops.cayley: skew must be a CUDA tensor, got ", skew.device());
  const at::cuda::OptionalCUDAGuard device_guard(device_of(skew));
  const int64_t b = skew.size(-1);
  if (skew.numel() == 0) {
    return at::empty_like(skew, at::MemoryFormat::Contiguous);
  }
  if (b > kMaxFast) {
    return cayley_fallback(skew, num_neumann_terms);
  }
  const at::Tensor s = skew.contiguous();
  at::Tensor out = at::empty_like(s);
  const int64_t num_mats = s.numel() / (b * b);
  const Layout L(static_cast<int>(b));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "orthoft_cayley_cuda", [&] {
    using acc = acc_t<scalar_t>;
    dispatch_tile(L.b, [&](auto tile) {
      constexpr int TILE = decltype(tile)::value;
      if (num_neumann_terms == 0) {
        launch(cayley_exact_kernel<scalar_t, TILE>, num_mats, L, 4 * L.per_block * b * sizeof(acc),
               s.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), num_mats, L.b);
      } else {
        launch(cayley_neumann_kernel<scalar_t, TILE>, num_mats, L, L.smem_matrices(2, sizeof(acc)),
               s.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), num_mats, L.b,
               neumann_top(num_neumann_terms));
      }
    });
  });
  return out;
}

at::Tensor cayley_backward_cuda(const at::Tensor& grad, const at::Tensor& skew, const at::Tensor& rotation,
                                int64_t num_neumann_terms) {
  check_cayley_backward(grad, skew, rotation, num_neumann_terms);
  TORCH_CHECK(skew.is_cuda(), "orthoft.ops.cayley_backward: skew must be a CUDA tensor, got ", skew.device());
  const at::cuda::OptionalCUDAGuard device_guard(device_of(skew));
  const int64_t b = skew.size(-1);
  if (skew.numel() == 0) {
    return at::empty_like(skew, at::MemoryFormat::Contiguous);
  }
  if (b > kMaxFast) {
    return cayley_backward_fallback(grad, skew, rotation, num_neumann_terms);
  }
  const at::Tensor g = grad.contiguous();
  at::Tensor out = at::empty_like(g);
  const int64_t num_mats = g.numel() / (b * b);
  const Layout L(static_cast<int>(b));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "orthoft_cayley_backward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    dispatch_tile(L.b, [&](auto tile) {
      constexpr int TILE = decltype(tile)::value;
      if (num_neumann_terms == 0) {
        const at::Tensor r = rotation.contiguous();
        launch(cayley_exact_backward_kernel<scalar_t, TILE>, num_mats, L, L.smem_matrices(2, sizeof(acc)),
               g.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
               num_mats, L.b);
      } else {
        const at::Tensor s = skew.contiguous();
        launch(cayley_neumann_backward_kernel<scalar_t, TILE>, num_mats, L, L.smem_matrices(3, sizeof(acc)),
               g.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
               num_mats, L.b, neumann_top(num_neumann_terms));
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(orthoft, CUDA, m) {
  m.impl("cayley", &cayley_cuda);
  m.impl("cayley_backward", &cayley_backward_cuda);
}

}  // namespace orthoft
