// The cayley operator as batched matrix products through torch's dispatcher, on any device: the path of
// the CPU kernels (Neumann series and backwards) and of the CUDA kernels for blocks larger than their
// per-block kernels take. Everything runs in the accumulation type.
#pragma once

#include "common.h"

namespace orthoft {

// Largest block size the elimination kernels (CPU exact forward, CUDA) take; larger ones go through
// cayley_by_matmul, where LAPACK's or cuSOLVER's inverse is faster.
constexpr int64_t kMaxEliminationBlock = 64;

Tensor cayley_by_matmul(const Tensor& skew, int64_t num_neumann_terms);

Tensor cayley_backward_by_matmul(const Tensor& grad, const Tensor& skew, const Tensor& rotation,
                                 int64_t num_neumann_terms);

}  // namespace orthoft
