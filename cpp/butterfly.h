// Paths of the butterfly operator besides its fused kernels. By matmul: batched matrix products through
// torch's dispatcher, factor by factor, in the accumulation type, on any device: the CPU's path for one
// factor of float blocks wider than the block kernels take (BLAS is faster there) and the CUDA kernels'
// path for block sizes and tiles their fused kernels do not take.
#pragma once

#include <tuple>

#include "common.h"

namespace orthoft {

Tensor butterfly_by_matmul(const Tensor& x, const Tensor& rotations, int64_t block_size);

// Gradients of x and rotations; one whose output_mask flag is false comes back as an empty tensor.
std::tuple<Tensor, Tensor> butterfly_backward_by_matmul(const Tensor& grad, const Tensor& x, const Tensor& rotations,
                                                        int64_t block_size, const std::vector<bool>& output_mask);

// One factor of wide float or double blocks by the CPU block kernels (butterfly_blocks.cpp), for x
// (..., N) contiguous and block sizes block_kernel_takes: x @ blockdiag(w) for w (D, b, b) contiguous in
// x's dtype, and the blocks' gradient x^T @ grad per block, (D, b, b).
bool block_kernel_takes(const Tensor& x, int64_t block_size);
Tensor block_product(const Tensor& x, const Tensor& w, int64_t block_size);
Tensor block_gradient(const Tensor& x, const Tensor& grad, int64_t block_size);

// The chain of factors by the CPU tile kernels (butterfly.cpp), for any block size and dtype.
Tensor tile_product(const Tensor& x, const Tensor& rotations, int64_t block_size);
std::tuple<Tensor, Tensor> tile_backward(const Tensor& grad, const Tensor& x, const Tensor& rotations,
                                         int64_t block_size, const std::vector<bool>& output_mask);

// Factors of float or double blocks as one factor of their dense chunks (of C = b * 2^(m-1) columns or a
// multiple) by the block kernels (butterfly_chunks.cpp): where chunks_take, for the forward or the
// backward, for x (..., N) and rotations (m, D, b, b) of x's dtype.
bool chunks_take(const Tensor& x, const Tensor& rotations, int64_t block_size, bool backward);
Tensor chunk_product(const Tensor& x, const Tensor& rotations, int64_t block_size);
std::tuple<Tensor, Tensor> chunk_backward(const Tensor& grad, const Tensor& x, const Tensor& rotations,
                                          int64_t block_size, const std::vector<bool>& output_mask);

}  // namespace orthoft
