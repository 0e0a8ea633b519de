// What the CUDA kernels of cayley and of its backward share, for a batch of b x b matrices, b <= 64.
//
// A block of 256 threads holds 256 / g^2 matrices (g = min(b, 16)); thread (ty, tx) of a matrix owns its
// entries (ty + g*a, tx + g*c), a, c < TILE = ceil(b / g), in registers. Products of b x b matrices read
// their operands from shared memory (row stride b + 1, so row and column walks are free of bank
// conflicts). Larger blocks go through cayley_by_matmul (cpp/cayley.h).
#pragma once

#include "cayley.h"
#include "launch.cuh"

#include <limits>

namespace orthoft {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kSideThreads = 16;  // threads per matrix side
constexpr int kMaxTile = 4;       // entries per thread per matrix side
static_assert(kSideThreads * kMaxTile == kMaxEliminationBlock, "the kernels cover every block up to the limit");

struct Layout {
  int b, g, per_block, ld;
  __host__ __device__ explicit Layout(int b_)
      : b(b_), g(b_ < kSideThreads ? b_ : kSideThreads), per_block(kThreads / (g * g)), ld(b_ + 1) {}
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

// Calls f with TILE, the entries per thread per matrix side, as a compile-time constant.
template <typename F>
void dispatch_tile(int b, F&& f) {
  dispatch_constant<1, 2, 3, 4>(ceil_div(b, kSideThreads), f);
}

// One launch over num_mats matrices, per_block of them per block of threads.
template <typename... Params, typename... Args>
void launch_matrices(void (*kernel)(Params...), int64_t num_mats, const Layout& L, int64_t smem, cudaStream_t stream,
                     Args&&... args) {
  const int64_t grid = ceil_div(num_mats, L.per_block);
  STD_TORCH_CHECK(grid <= std::numeric_limits<int32_t>::max(), "orthoft.ops.cayley: ", num_mats,
                  " matrices are more than one launch can cover");
  launch(kernel, static_cast<unsigned>(grid), kThreads, smem, stream, std::forward<Args>(args)...);
}

}  // namespace cuda
}  // namespace orthoft
