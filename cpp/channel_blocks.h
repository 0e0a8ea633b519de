// The channel_blocks operator: x (..., F, P) holds a row of F channels at each of its P positions (an NCHW
// activation as (N, C, H*W)), and each row is multiplied by blockdiag(blocks), blocks (D, C, C) with
// D * C = F, without moving the channels into rows.
#pragma once

#include <tuple>
#include <vector>

#include "common.h"

namespace orthoft {

// By batched matrix products through torch's dispatcher, in the accumulation type, on any device
// (channel_blocks_matmul.cpp): the path of every device but the CPU, and of the CPU's half types.
Tensor channel_blocks_by_matmul(const Tensor& x, const Tensor& blocks);

// Gradients of x and blocks; one whose output_mask flag is false comes back as an empty tensor.
std::tuple<Tensor, Tensor> channel_blocks_backward_by_matmul(const Tensor& grad, const Tensor& x,
                                                             const Tensor& blocks,
                                                             const std::vector<bool>& output_mask);

// The leading size L of x (..., F, P) as (L, F, P).
inline int64_t leading_size(const Tensor& x) {
  int64_t l = 1;
  for (int64_t d = 0; d + 2 < x.dim(); ++d) l *= x.size(d);
  return l;
}

}  // namespace orthoft
