// CPU kernels of block_diag: (..., D, b, b) -> (..., D*b, D*b) and its backward.
#include <algorithm>

#include "checks.h"

namespace orthoft {

Tensor block_diag_cpu(const Tensor& blocks) {
  check_block_diag(blocks);
  const Tensor in = torch::stable::contiguous(blocks);
  const int64_t b = in.size(-1);
  const int64_t d = in.size(-3);
  const int64_t n = d * b;
  std::vector<int64_t> sizes = shape(in);
  sizes.resize(sizes.size() - 3);
  sizes.insert(sizes.end(), {n, n});
  Tensor out = new_tensor(in, sizes);
  const int64_t rows = out.numel() / std::max<int64_t>(n, 1);

  ORTHOFT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "orthoft_block_diag_cpu", [&] {
    const scalar_t* src = in.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    // A task zeroes its rows in one pass, then writes each row's block: one long fill is faster than
    // two short ones per row.
    torch::stable::parallel_for(0, rows, std::max<int64_t>(1, 4096 / n), [&](int64_t begin, int64_t end) {
      std::fill(dst + begin * n, dst + end * n, scalar_t(0));
      for (int64_t r = begin; r < end; ++r) {
        // blocks[matrix, block, r % b, :] sits at (matrix * n + r % n) * b = r * b.
        std::copy(src + r * b, src + (r + 1) * b, dst + r * n + (r % n) / b * b);
      }
    });
  });
  return out;
}

// Reads only the diagonal blocks of grad, through its strides (also for expanded or transposed views).
Tensor block_diag_backward_cpu(const Tensor& grad, int64_t block_size) {
  check_block_diag_backward(grad, block_size);
  const int64_t n = grad.size(-1);
  const int64_t b = block_size;
  const int64_t d = n / b;
  std::vector<int64_t> sizes = shape(grad);
  sizes.resize(sizes.size() - 2);
  sizes.insert(sizes.end(), {d, b, b});
  Tensor out = new_tensor(grad, sizes);
  if (out.numel() == 0) return out;
  const Tensor g = torch::stable::reshape(grad, {-1, n, n});
  const int64_t s0 = g.stride(0), s1 = g.stride(1), s2 = g.stride(2);

  ORTHOFT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "orthoft_block_diag_backward_cpu", [&] {
    const scalar_t* src = g.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    // Task: one block (over batch * D).
    torch::stable::parallel_for(0, out.numel() / (b * b), std::max<int64_t>(1, 4096 / (b * b)),
                                [&](int64_t begin, int64_t end) {
                                  for (int64_t blk = begin; blk < end; ++blk) {
                                    const scalar_t* diag = src + (blk / d) * s0 + (blk % d) * b * (s1 + s2);
                                    scalar_t* block = dst + blk * b * b;
                                    for (int64_t p = 0; p < b; ++p) {
                                      for (int64_t q = 0; q < b; ++q) block[p * b + q] = diag[p * s1 + q * s2];
                                    }
                                  }
                                });
  });
  return out;
}

STABLE_TORCH_LIBRARY_IMPL(orthoft, CPU, m) {
  m.impl("block_diag", TORCH_BOX(&block_diag_cpu));
  m.impl("block_diag_backward", TORCH_BOX(&block_diag_backward_cpu));
}

}  // namespace orthoft
