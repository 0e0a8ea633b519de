// CUDA kernels of block_diag and its backward.
//
// Forward: a thread block covers 256 / tx output rows (threadIdx.y) and walks each row in 16-byte vectors
// (threadIdx.x), so every output element is written exactly once, zeros and block entries in the same
// store; only the b entries of a row's diagonal block are read. Backward: one thread per entry of the
// (..., D, b, b) result, gathering it from the diagonal blocks of grad through grad's strides.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "checks.h"
#include "utils.cuh"

namespace orthoft {
namespace {

using cuda::ceil_div;
using cuda::Vec;

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
      Vec<scalar_t, V> pack;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int64_t c = v * V + k - lo;
        pack.val[k] = (c >= 0 && c < b) ? src[c] : scalar_t(0);
      }
      cuda::store_vec<V>(dst + v * V, pack);
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

int64_t grid_size(int64_t work_items, int64_t per_block) {
  return std::min<int64_t>(ceil_div(work_items, per_block), std::numeric_limits<int32_t>::max());
}

at::Tensor block_diag_cuda(const at::Tensor& blocks) {
  check_block_diag(blocks);
  TORCH_CHECK(blocks.is_cuda(), "orthoft.ops.block_diag: blocks must be a CUDA tensor, got ", blocks.device());
  const at::cuda::OptionalCUDAGuard device_guard(device_of(blocks));

  const at::Tensor src = blocks.contiguous();
  const int64_t b = src.size(-1);
  const int64_t n = src.size(-3) * b;
  std::vector<int64_t> out_shape(src.sizes().begin(), src.sizes().end() - 3);
  out_shape.push_back(n);
  out_shape.push_back(n);
  at::Tensor out = at::empty(out_shape, src.options());
  if (out.numel() == 0) {
    return out;
  }
  const int64_t total_rows = out.numel() / n;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "orthoft_block_diag_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    auto launch = [&](auto kernel, int64_t vec) {
      // Threads along a row: the vectors of one row, rounded up to a power of two, at most kThreads.
      int tx = 1;
      while (tx < kThreads && tx < n / vec) {
        tx *= 2;
      }
      const dim3 block(tx, kThreads / tx);
      kernel<<<grid_size(total_rows, block.y), block, 0, stream>>>(src.const_data_ptr<scalar_t>(),
                                                                  out.mutable_data_ptr<scalar_t>(), total_rows, n, b);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    // A fresh allocation is 16-byte aligned, so rows are too whenever n is a multiple of the vector.
    if (n % kVec == 0) {
      launch(block_diag_kernel<scalar_t, kVec>, kVec);
    } else {
      launch(block_diag_kernel<scalar_t, 1>, 1);
    }
  });
  return out;
}

at::Tensor block_diag_backward_cuda(const at::Tensor& grad, int64_t block_size) {
  check_block_diag_backward(grad, block_size);
  TORCH_CHECK(grad.is_cuda(), "orthoft.ops.block_diag_backward: grad must be a CUDA tensor, got ", grad.device());
  const at::cuda::OptionalCUDAGuard device_guard(device_of(grad));

  const int64_t n = grad.size(-1);
  const int64_t b = block_size;
  const int64_t num_blocks = n / b;
  std::vector<int64_t> out_shape(grad.sizes().begin(), grad.sizes().end() - 2);
  out_shape.insert(out_shape.end(), {num_blocks, b, b});
  at::Tensor out = at::empty(out_shape, grad.options());
  if (out.numel() == 0) {
    return out;
  }
  // A view whenever the batch dimensions collapse (contiguous, expanded, sliced, last two transposed).
  const at::Tensor g = grad.reshape({-1, n, n});
  const int64_t total = out.numel();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "orthoft_block_diag_backward_cuda", [&] {
    block_diag_backward_kernel<scalar_t><<<grid_size(total, kThreads), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), total, num_blocks, b, g.stride(0),
        g.stride(1), g.stride(2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(orthoft, CUDA, m) {
  m.impl("block_diag", &block_diag_cuda);
  m.impl("block_diag_backward", &block_diag_backward_cuda);
}

}  // namespace orthoft
