// channel_blocks and its backward as batched matrix products through torch's dispatcher (see
// channel_blocks.h), registered for every device without a kernel of its own.
#include "channel_blocks.h"
#include "checks.h"

namespace orthoft {
namespace {

using torch::stable::matmul;
using torch::stable::reshape;
using torch::stable::transpose;

// t (..., F, P) in the accumulation type as (L, D, C, P).
Tensor acc_slices(const Tensor& t, int64_t d, int64_t c) {
  return reshape(torch::stable::to(t, acc_dtype(t.scalar_type())), {leading_size(t), d, c, t.size(-1)});
}

// (L, D, C, P) -> (D, C, L * P): a chunk's channels over every leading index and position.
Tensor chunk_rows(const Tensor& slices) {
  return reshape(transpose(transpose(slices, 0, 1), 1, 2), {slices.size(1), slices.size(2), -1});
}

Tensor channel_blocks_any(const Tensor& x, const Tensor& blocks) {
  check_channel_blocks(x, blocks);
  return channel_blocks_by_matmul(x, blocks);
}

std::tuple<Tensor, Tensor> channel_blocks_backward_any(const Tensor& grad, const Tensor& x, const Tensor& blocks,
                                                       std::vector<bool> output_mask) {
  check_channel_blocks_backward(grad, x, blocks, output_mask);
  return channel_blocks_backward_by_matmul(grad, x, blocks, output_mask);
}

}  // namespace

Tensor channel_blocks_by_matmul(const Tensor& x, const Tensor& blocks) {
  const int64_t d = blocks.size(0), c = blocks.size(1);
  const Tensor w = torch::stable::to(blocks, acc_dtype(x.scalar_type()));
  // Per slice, out = w^T @ x: the channels of each position, as a row, times the block.
  return result_like(matmul(transpose(w, 1, 2), acc_slices(x, d, c)), x);
}

std::tuple<Tensor, Tensor> channel_blocks_backward_by_matmul(const Tensor& grad, const Tensor& x,
                                                             const Tensor& blocks,
                                                             const std::vector<bool>& output_mask) {
  const int64_t d = blocks.size(0), c = blocks.size(1);
  const Tensor w = torch::stable::to(blocks, acc_dtype(x.scalar_type()));
  const Tensor g = acc_slices(grad, d, c);
  const Tensor grad_x = output_mask[0] ? result_like(matmul(w, g), x) : torch::stable::new_empty(x, {0});
  const Tensor grad_blocks =
      output_mask[1] ? result_like(matmul(chunk_rows(acc_slices(x, d, c)), transpose(chunk_rows(g), 1, 2)), blocks)
                     : torch::stable::new_empty(blocks, {0});
  return {grad_x, grad_blocks};
}

STABLE_TORCH_LIBRARY_IMPL(orthoft, CompositeExplicitAutograd, m) {
  m.impl("channel_blocks", TORCH_BOX(&channel_blocks_any));
  m.impl("channel_blocks_backward", TORCH_BOX(&channel_blocks_backward_any));
}

}  // namespace orthoft
