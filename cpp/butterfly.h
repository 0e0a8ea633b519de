// The butterfly operator as batched matrix products through torch's dispatcher, factor by factor, on any
// device: the CPU kernels' path for one factor of float blocks wider than their block kernel takes (BLAS
// is faster there) and the CUDA kernels' path for block sizes and tiles their fused kernels do not take.
// In the accumulation type.
#pragma once

#include <tuple>

#include "common.h"

namespace orthoft {

Tensor butterfly_by_matmul(const Tensor& x, const Tensor& rotations, int64_t block_size);

// Gradients of x and rotations; one whose output_mask flag is false comes back as an empty tensor.
std::tuple<Tensor, Tensor> butterfly_backward_by_matmul(const Tensor& grad, const Tensor& x, const Tensor& rotations,
                                                        int64_t block_size, const std::vector<bool>& output_mask);

}  // namespace orthoft
