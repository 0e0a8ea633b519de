// CUDA kernel of butterfly: one pass over x, all m factors applied to each tile in shared memory
// (butterfly.cuh).
#include "butterfly.cuh"
#include "checks.h"

namespace orthoft {
namespace cuda {
namespace {

// grid: (column tiles, row splits); a CTA takes row tiles blockIdx.y, blockIdx.y + gridDim.y, ...
template <typename scalar_t, int B>
__global__ void __launch_bounds__(kThreads)
    butterfly_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ rotations,
                     scalar_t* __restrict__ y, const TileShape p) {
  using acc = acc_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int nblk = p.tw / B;
  const int per_factor = nblk * B * B;
  acc* rot = reinterpret_cast<acc*>(smem);
  acc* tile = rot + p.m * per_factor;
  stage_rotations<scalar_t, acc, B>(rotations, rot, p, nblk);
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * p.tw;
  for (int64_t rt = blockIdx.y; rt < p.row_tiles; rt += gridDim.y) {
    __syncthreads();  // rotations staged, previous tile stored
    load_tile(x, tile, rt * p.tr, col0, p);
    __syncthreads();
    for (int i = p.m - 1; i >= 0; --i) {
      apply_factor<acc, B, false>(tile, tile, rot + i * per_factor, i, nblk, p.tr, p.ld);
      __syncthreads();
    }
    store_tile(tile, y, rt * p.tr, col0, p);
  }
}

}  // namespace
}  // namespace cuda

Tensor butterfly_cuda(const Tensor& x, const Tensor& rotations, int64_t block_size) {
  check_butterfly(x, rotations, block_size);
  STD_TORCH_CHECK(x.is_cuda(), "orthoft.ops.butterfly: x must be a CUDA tensor");
  const cuda::DeviceScope scope(x);
  const int64_t n = x.size(-1);
  if (x.numel() == 0) {
    return new_tensor(x, shape(x));
  }
  const Tensor x2 = torch::stable::contiguous(torch::stable::reshape(x, {-1, n}));
  const Tensor rot = torch::stable::contiguous(rotations);
  const int64_t rows = x2.size(0);
  const int m = static_cast<int>(rot.size(0));
  Tensor y = new_tensor(x2, shape(x2));

  bool fused = false;
  ORTHOFT_DISPATCH_FLOATING_TYPES(x2.scalar_type(), "orthoft_butterfly_cuda", [&] {
    cuda::dispatch_block_size(block_size, [&](auto bs) {
      constexpr int B = decltype(bs)::value;
      const auto kernel = cuda::butterfly_kernel<scalar_t, B>;
      cuda::LaunchPlan l;
      if (!cuda::plan<scalar_t, B>(kernel, rows, n, m, /*backward=*/false, l)) {
        return;
      }
      constexpr int VG = 16 / sizeof(scalar_t);
      l.p.vec = n % VG == 0 && l.p.tw % VG == 0 && cuda::aligned16(x2) && cuda::aligned16(y);
      const dim3 grid(static_cast<unsigned>(n / l.p.tw), static_cast<unsigned>(l.splits));
      cuda::launch(kernel, grid, cuda::kThreads, l.smem, scope.stream(), x2.const_data_ptr<scalar_t>(),
                   rot.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), l.p);
      fused = true;
    });
  });
  if (!fused) {
    return butterfly_by_matmul(x, rotations, block_size);
  }
  return torch::stable::view(y, shape(x));
}

STABLE_TORCH_LIBRARY_IMPL(orthoft, CUDA, m) { m.impl("butterfly", TORCH_BOX(&butterfly_cuda)); }

}  // namespace orthoft
