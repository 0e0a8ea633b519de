// CUDA kernel of the backward of butterfly (butterfly.cuh): each CTA recomputes the factor inputs of its
// tile, sums grad_rotations in shared memory and writes it once as a per-CTA partial that the host
// reduces (deterministic), and carries the gradient back through the factors to grad_x.
#include "butterfly.cuh"
#include "checks.h"

namespace orthoft {
namespace cuda {
namespace {

// out = the N entries t0 .. t0 + N - 1 of the block in one tile row.
template <typename acc, int B, int N>
__device__ __forceinline__ void load_entries(const acc* row, int base0, int base1, int t0, acc (&out)[N]) {
  using S = BlockTraits<acc, B>;
  if constexpr (N <= S::H) {  // inside one run: contiguous and aligned to N
    constexpr int W = N < S::kVec ? N : S::kVec;
    const acc* p = row + entry_col<B>(t0, base0, base1);
#pragma unroll
    for (int e = 0; e < N; e += W) {
      const auto w = load_pack<W>(p + e);
#pragma unroll
      for (int u = 0; u < W; ++u) {
        out[e + u] = w.val[u];
      }
    }
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) {
      out[e] = row[entry_col<B>(t0 + e, base0, base1)];
    }
  }
}

// Sums v over the G lanes g = lane % G by recursive halving: lane g ends with the sums of values
// [g * NV/G, (g+1) * NV/G) in v[0 .. NV/G). Every lane of the warp must call it.
template <int O, int NV, int G, typename acc>
__device__ __forceinline__ void reduce_scatter(acc (&v)[NV], int g) {
  if constexpr (O >= 1) {
    constexpr int half = NV * O / G;
    const bool upper = g & O;
#pragma unroll
    for (int k = 0; k < half; ++k) {
      const acc send = upper ? v[k] : v[k + half];
      const acc keep = upper ? v[k + half] : v[k];
      v[k] = keep + __shfl_xor_sync(0xffffffffu, send, O);
    }
    reduce_scatter<O / 2, NV, G>(v, g);
  }
}

// dr[blk] += sum over the tile's rows of in_blk^T gout_blk (outer products of the gathered entries).
template <typename acc, int B>
__device__ void accumulate_grad_rotations(const acc* in, const acc* gout, acc* dr, int i, int nblk, int tr,
                                          int ld) {
  using S = BlockTraits<acc, B>;
  constexpr int N = S::kSub;
  constexpr int G = S::kGroups;
  constexpr int kPer = B / N;  // pieces per block side
  const int pieces = nblk * kPer * kPer;
  const int g = threadIdx.x % G;
  // The trip count is the same for every thread: reduce_scatter needs whole warps.
  for (int p0 = 0; p0 < pieces; p0 += kThreads / G) {
    const int piece = p0 + threadIdx.x / G;
    const bool active = piece < pieces;
    const int blk = piece / (kPer * kPer);
    const int t0 = piece / kPer % kPer * N;
    const int j0 = piece % kPer * N;
    acc sum[N * N] = {};
    if (active) {
      const int base0 = run_start<B>(blk, i, 0);
      const int base1 = run_start<B>(blk, i, 1);
      for (int r = g; r < tr; r += G) {
        acc a[N], c[N];
        load_entries<acc, B, N>(in + r * ld, base0, base1, t0, a);
        load_entries<acc, B, N>(gout + r * ld, base0, base1, j0, c);
#pragma unroll
        for (int x = 0; x < N; ++x) {
#pragma unroll
          for (int y = 0; y < N; ++y) {
            sum[x * N + y] += a[x] * c[y];
          }
        }
      }
    }
    reduce_scatter<G / 2, N * N, G>(sum, g);
    if (active) {
#pragma unroll
      for (int k = 0; k < N * N / G; ++k) {
        const int e = g * (N * N / G) + k;
        dr[blk * B * B + (t0 + e / N) * B + j0 + e % N] += sum[k];
      }
    }
  }
}

// Same grid. act(i) holds the input of factor i (act(m-1) = x), g the gradient of the current factor's
// output, updated in place to its input's gradient. partial: [gridDim.y][m][D][B][B]. Without need_rot
// the factor inputs and grad_rotations are skipped (partial is not written), without need_x the last
// factor's transposed product and the store of grad_x.
template <typename scalar_t, int B>
__global__ void __launch_bounds__(kThreads)
    butterfly_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                              const scalar_t* __restrict__ rotations, scalar_t* __restrict__ grad_x,
                              acc_t<scalar_t>* __restrict__ partial, const TileShape p, bool need_x,
                              bool need_rot) {
  using acc = acc_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int nblk = p.tw / B;
  const int per_factor = nblk * B * B;
  acc* rot = reinterpret_cast<acc*>(smem);
  acc* dr = rot + p.m * per_factor;
  acc* acts = dr + p.m * per_factor;
  acc* g = acts + p.m * p.tile_elems;
  auto act = [&](int i) { return acts + i * p.tile_elems; };
  stage_rotations<scalar_t, acc, B>(rotations, rot, p, nblk);
  for (int idx = threadIdx.x; idx < p.m * per_factor; idx += kThreads) {
    dr[idx] = acc(0);
  }
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * p.tw;
  for (int64_t rt = blockIdx.y; rt < p.row_tiles; rt += gridDim.y) {
    __syncthreads();  // staging done, previous tile stored
    if (need_rot) {
      load_tile(x, act(p.m - 1), rt * p.tr, col0, p);
    }
    load_tile(grad, g, rt * p.tr, col0, p);
    __syncthreads();
    if (need_rot) {
      for (int i = p.m - 1; i >= 1; --i) {
        apply_factor<acc, B, false>(act(i), act(i - 1), rot + i * per_factor, i, nblk, p.tr, p.ld);
        __syncthreads();
      }
    }
    for (int i = 0; i < p.m; ++i) {
      if (need_rot) {
        accumulate_grad_rotations<acc, B>(act(i), g, dr + i * per_factor, i, nblk, p.tr, p.ld);
        __syncthreads();
      }
      if (need_x || i + 1 < p.m) {
        apply_factor<acc, B, true>(g, g, rot + i * per_factor, i, nblk, p.tr, p.ld);
        __syncthreads();
      }
    }
    if (need_x) {
      store_tile(g, grad_x, rt * p.tr, col0, p);
    }
  }
  if (!need_rot) {
    return;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < p.m * per_factor; idx += kThreads) {
    const int i = idx / per_factor;
    partial[((static_cast<int64_t>(blockIdx.y) * p.m + i) * p.num_blocks + static_cast<int64_t>(blockIdx.x) * nblk) *
                B * B +
            idx - i * per_factor] = dr[idx];
  }
}

}  // namespace
}  // namespace cuda

std::tuple<Tensor, Tensor> butterfly_backward_cuda(const Tensor& grad, const Tensor& x, const Tensor& rotations,
                                                   int64_t block_size, std::vector<bool> output_mask) {
  check_butterfly_backward(grad, x, rotations, block_size, output_mask);
  STD_TORCH_CHECK(x.is_cuda(), "orthoft.ops.butterfly_backward: x must be a CUDA tensor");
  const cuda::DeviceScope scope(x);
  const bool need_x = output_mask[0], need_rot = output_mask[1];
  const int64_t n = x.size(-1);
  Tensor grad_x = new_tensor(x, need_x ? shape(x) : std::vector<int64_t>{0});
  Tensor grad_rot = need_rot ? torch::stable::new_zeros(rotations, shape(rotations)) : new_tensor(rotations, {0});
  if (x.numel() == 0) {  // no rows: nothing flows to the rotations
    return {grad_x, grad_rot};
  }
  const Tensor x2 = torch::stable::contiguous(torch::stable::reshape(x, {-1, n}));
  const Tensor g2 = torch::stable::contiguous(torch::stable::reshape(grad, {-1, n}));
  const Tensor rot = torch::stable::contiguous(rotations);
  const int64_t rows = x2.size(0);
  const int m = static_cast<int>(rot.size(0));

  bool fused = false;
  ORTHOFT_DISPATCH_FLOATING_TYPES(x2.scalar_type(), "orthoft_butterfly_backward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    cuda::dispatch_block_size(block_size, [&](auto bs) {
      constexpr int B = decltype(bs)::value;
      const auto kernel = cuda::butterfly_backward_kernel<scalar_t, B>;
      cuda::LaunchPlan l;
      if (!cuda::plan<scalar_t, B>(kernel, rows, n, m, /*backward=*/true, l)) {
        return;
      }
      constexpr int VG = 16 / sizeof(scalar_t);
      l.p.vec = n % VG == 0 && l.p.tw % VG == 0 && cuda::aligned16(x2) && cuda::aligned16(g2) &&
                (!need_x || cuda::aligned16(grad_x));
      const Tensor partial = new_tensor(x2, {need_rot ? l.splits : 0, m, n / B, B, B}, acc_dtype(x2.scalar_type()));
      const dim3 grid(static_cast<unsigned>(n / l.p.tw), static_cast<unsigned>(l.splits));
      cuda::launch(kernel, grid, cuda::kThreads, l.smem, scope.stream(), g2.const_data_ptr<scalar_t>(),
                   x2.const_data_ptr<scalar_t>(), rot.const_data_ptr<scalar_t>(),
                   need_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr,
                   need_rot ? partial.mutable_data_ptr<acc>() : nullptr, l.p, need_x, need_rot);
      if (need_rot) {
        const std::vector<int64_t> splits{0};
        grad_rot = torch::stable::to(torch::stable::sum(partial, splits), x2.scalar_type());
      }
      fused = true;
    });
  });
  if (!fused) {
    return butterfly_backward_by_matmul(grad, x, rotations, block_size, output_mask);
  }
  return {grad_x, grad_rot};
}

STABLE_TORCH_LIBRARY_IMPL(orthoft, CUDA, m) { m.impl("butterfly_backward", TORCH_BOX(&butterfly_backward_cuda)); }

}  // namespace orthoft
