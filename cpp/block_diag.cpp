// CPU kernels of block_diag: (..., D, b, b) -> (..., D*b, D*b) and its backward.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"

namespace orthoft {

at::Tensor block_diag_cpu(const at::Tensor& blocks) {
  check_block_diag(blocks);
  const at::Tensor in = blocks.contiguous();
  const int64_t b = in.size(-1);
  const int64_t d = in.size(-3);
  const int64_t n = d * b;
  std::vector<int64_t> sizes(in.sizes().begin(), in.sizes().end() - 3);
  sizes.push_back(n);
  sizes.push_back(n);
  at::Tensor out = at::empty(sizes, in.options());
  const int64_t rows = out.numel() / std::max<int64_t>(n, 1);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "orthoft_block_diag_cpu", [&] {
    const scalar_t* src = in.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    // One output row at a time: zeros, the block's row, zeros. Every element is written once.
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t matrix = r / n;
        const int64_t block = (r % n) / b;
        const int64_t row_in_block = r % b;
        scalar_t* out_row = dst + r * n;
        const scalar_t* block_row = src + ((matrix * d + block) * b + row_in_block) * b;
        std::fill(out_row, out_row + block * b, scalar_t(0));
        std::copy(block_row, block_row + b, out_row + block * b);
        std::fill(out_row + (block + 1) * b, out_row + n, scalar_t(0));
      }
    });
  });
  return out;
}

at::Tensor block_diag_backward_cpu(const at::Tensor& grad, int64_t block_size) {
  check_block_diag_backward(grad, block_size);
  const int64_t d = grad.size(-1) / block_size;
  // (..., D, b, D, b) view of grad whose diagonal holds the blocks: copying it reads only those.
  const at::Tensor diagonal =
      grad.unflatten(-1, {d, block_size}).unflatten(-3, {d, block_size}).diagonal(0, -4, -2).movedim(-1, -3);
  at::Tensor out = at::empty(diagonal.sizes(), grad.options());
  out.copy_(diagonal);
  return out;
}

TORCH_LIBRARY_IMPL(orthoft, CPU, m) {
  m.impl("block_diag", &block_diag_cpu);
  m.impl("block_diag_backward", &block_diag_backward_cpu);
}

}  // namespace orthoft
