// CUDA kernels of block_diag and its backward.
//
// Forward: a thread block covers 256 / tx output rows (threadIdx.y) and walks each row in 16-byte vectors
// (threadIdx.x), so every output element is written exactly once, zeros and block entries in the same
// store; only the b entries of a row's diagonal block are read. Backward: one thread per entry of the
// (..., D, b, b) result, gathering it from the diagonal blocks of grad through grad's strides.
#include <algorithm>
#include <limits>
#include <vector>

#include "checks.h"
#include "launch.cuh"

namespace orthoft {
namespace {

using cuda::ceil_div;
using cuda::Pack;

constexpr int kThreads = 256;

// blocks: (batch, D, b, b) contiguous; out: (batch, n, n) with n = D * b; V values per store.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    block_diag_kernel(const scalar_t* __restrict__ blocks, scalar_t* __restrict__ out, int64_t total_rows,
                      int64_t n, int64_t b) {
  const int64_t vecs_per_row = n / V;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < total_rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t mat = row / n;
    const int64_t r = row - mat * n;
    const int64_t lo = r - r % b;  // first column of this row's diagonal block
    // blocks[mat, r / b, r % b, c] sits at (mat * n + r) * b + c: the row of the block, contiguous.
    const scalar_t* src = blocks + (mat * n + r) * b;
    scalar_t* dst = out + row * n;
    for (int64_t v = threadIdx.x; v < vecs_per_row; v += blockDim.x) {
      Pack<scalar_t, V> pack;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int64_t c = v * V + k - lo;
        pack.val[k] = (c >= 0 && c < b) ? src[c] : scalar_t(0);
      }
      cuda::store_pack<V>(dst + v * V, pack);
    }
  }
}

// grad is read through its strides (s0 over the flattened batch, s1 rows, s2 columns): only the
// diagonal blocks are touched, also when grad is an expanded or transposed view.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    block_diag_backward_kernel(const scalar_t* __restrict__ grad, scalar_t* __restrict__ out, int64_t total,
                               int64_t num_blocks, int64_t b, int64_t s0, int64_t s1, int64_t s2) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t q = idx % b;
    const int64_t p = (idx / b) % b;
    const int64_t blk = idx / (b * b);  // over batch * D
    const int64_t mat = blk / num_blocks;
    const int64_t diag = (blk - mat * num_blocks) * b;
    out[idx] = grad[mat * s0 + (diag + p) * s1 + (diag + q) * s2];
  }
}

unsigned grid_size(int64_t work_items, int64_t per_block) {
  return static_cast<unsigned>(std::min<int64_t>(ceil_div(work_items, per_block), std::numeric_limits<int32_t>::max()));
}

Tensor block_diag_cuda(const Tensor& blocks) {
  check_block_diag(blocks);
  STD_TORCH_CHECK(blocks.is_cuda(), "orthoft.ops.block_diag: blocks must be a CUDA tensor");
  const cuda::DeviceScope scope(blocks);

  const Tensor src = torch::stable::contiguous(blocks);
  const int64_t b = src.size(-1);
  const int64_t n = src.size(-3) * b;
  std::vector<int64_t> out_shape = shape(src);
  out_shape.resize(out_shape.size() - 3);
  out_shape.insert(out_shape.end(), {n, n});
  Tensor out = new_tensor(src, out_shape);
  if (out.numel() == 0) {
    return out;
  }
  const int64_t total_rows = out.numel() / n;

  ORTHOFT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "orthoft_block_diag_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    auto run = [&](auto kernel, int64_t vec) {
      // Threads along a row: the vectors of one row, rounded up to a power of two, at most kThreads.
      int tx = 1;
      while (tx < kThreads && tx < n / vec) {
        tx *= 2;
      }
      const dim3 block(tx, kThreads / tx);
      cuda::launch(kernel, grid_size(total_rows, block.y), block, 0, scope.stream(), src.const_data_ptr<scalar_t>(),
                   out.mutable_data_ptr<scalar_t>(), total_rows, n, b);
    };
    // A fresh allocation is 16-byte aligned, so rows are too whenever n is a multiple of the vector.
    if (n % kVec == 0) {
      run(block_diag_kernel<scalar_t, kVec>, kVec);
    } else {
      run(block_diag_kernel<scalar_t, 1>, 1);
    }
  });
  return out;
}

Tensor block_diag_backward_cuda(const Tensor& grad, int64_t block_size) {
  check_block_diag_backward(grad, block_size);
  STD_TORCH_CHECK(grad.is_cuda(), "orthoft.ops.block_diag_backward: grad must be a CUDA tensor");
  const cuda::DeviceScope scope(grad);

  const int64_t n = grad.size(-1);
  const int64_t b = block_size;
  const int64_t num_blocks = n / b;
  std::vector<int64_t> out_shape = shape(grad);
  out_shape.resize(out_shape.size() - 2);
  out_shape.insert(out_shape.end(), {num_blocks, b, b});
  Tensor out = new_tensor(grad, out_shape);
  if (out.numel() == 0) {
    return out;
  }
  // A view whenever the batch dimensions collapse (contiguous, expanded, sliced, last two transposed).
  const Tensor g = torch::stable::reshape(grad, {-1, n, n});
  const int64_t total = out.numel();

  ORTHOFT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "orthoft_block_diag_backward_cuda", [&] {
    cuda::launch(block_diag_backward_kernel<scalar_t>, grid_size(total, kThreads), kThreads, 0, scope.stream(),
                 g.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), total, num_blocks, b, g.stride(0),
                 g.stride(1), g.stride(2));
  });
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(orthoft, CUDA, m) {
  m.impl("block_diag", TORCH_BOX(&block_diag_cuda));
  m.impl("block_diag_backward", TORCH_BOX(&block_diag_backward_cuda));
}

}  // namespace orthoft
