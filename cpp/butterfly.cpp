// CPU kernels of butterfly: y = x @ M_{m-1} ... M_0 and its backward, with permutations as index maps.
//
// Every factor mixes columns only inside chunks of C = b * 2^(m-1), so a task takes a tile of
// kRows rows x C columns, stores it column-major in the accumulation type (each update is then a
// fixed-length loop over rows that the compiler vectorises), applies all m factors in place and
// writes the tile once. The tile loops are compiled twice, for AVX2+FMA and for the baseline
// instruction set, and chosen at run time.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define ORTHOFT_ALWAYS_INLINE inline __attribute__((always_inline))
#define ORTHOFT_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define ORTHOFT_HAVE_AVX2_PATH 1
#else
#define ORTHOFT_ALWAYS_INLINE inline
#define ORTHOFT_HAVE_AVX2_PATH 0
#endif

namespace orthoft {
namespace {

constexpr int64_t kRows = 32;
constexpr int64_t kMinTileColumns = 256;

// A 32-byte vector of the accumulation type (GCC/Clang vector extension): kRows rows of one tile
// column are kLanes of them. may_alias lets the tile be read and written as scalars too; the
// element alignment keeps loads unaligned, as the baseline build does not align 32-byte types.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32), may_alias, aligned(sizeof(float))));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32), may_alias, aligned(sizeof(double))));
};
template <typename T>
using vec_t = typename Vec<T>::type;
template <typename T>
constexpr int64_t kLanes = kRows * sizeof(T) / sizeof(vec_t<T>);

// positions[i * C + blk * b + t]: the column, inside a tile of C columns, of element t of local block blk of
// factor i. Factor i splits the chunk into pieces of c = b * 2^i; block d of a piece takes b/2
// columns at d * b/2 and b/2 columns at c/2 + d * b/2 (factor 0: b contiguous columns).
std::vector<int64_t> butterfly_positions(int64_t b, int64_t m, int64_t chunk) {
  const int64_t half = b / 2;
  std::vector<int64_t> positions(m * chunk);
  for (int64_t i = 0; i < m; ++i) {
    const int64_t piece = b << i;
    const int64_t blocks_per_piece = int64_t(1) << i;
    for (int64_t j = 0; j < chunk; ++j) {
      const int64_t blk = j / b;
      const int64_t t = j % b;
      const int64_t start = (blk / blocks_per_piece) * piece;
      const int64_t d = blk % blocks_per_piece;
      positions[i * chunk + j] = start + (t < half ? d * half + t : piece / 2 + d * half + t - half);
    }
  }
  return positions;
}

// Sizes of one call, and where a task's tile lies.
// A task's tile spans `chunk` columns: a whole number of the independent b * 2^(m-1) column groups,
// widened up to kMinTileColumns so that small groups do not make tiny tasks.
struct Problem {
  int64_t n, b, m, chunk, rows, tiles, chunks;
  Problem(const at::Tensor& x, const at::Tensor& rotations, int64_t block_size)
      : n(x.size(-1)), b(block_size), m(rotations.size(0)), chunk(block_size << (m - 1)) {
    const int64_t groups = n / chunk;
    for (int64_t k = groups; k >= 1; --k) {
      if (groups % k == 0 && k * chunk <= std::max(chunk, kMinTileColumns)) {
        chunk *= k;
        break;
      }
    }
    rows = n == 0 ? 0 : x.numel() / n;
    tiles = (rows + kRows - 1) / kRows;
    chunks = n / chunk;
  }
  int64_t blocks_per_chunk() const { return chunk / b; }
  int64_t factor_stride() const { return n * b; }  // elements of one factor's rotations
};

// Loads rows [first, first + rows) of one chunk, zero-padding the tile to kRows rows.
template <typename scalar_t, typename acc_t>
ORTHOFT_ALWAYS_INLINE void load_tile(const scalar_t* src, const Problem& p, int64_t first, int64_t rows,
                                     int64_t chunk, acc_t* buf) {
  for (int64_t r = 0; r < kRows; ++r) {
    if (r < rows) {
      const scalar_t* row = src + (first + r) * p.n + chunk * p.chunk;
      for (int64_t j = 0; j < p.chunk; ++j) buf[j * kRows + r] = static_cast<acc_t>(row[j]);
    } else {
      for (int64_t j = 0; j < p.chunk; ++j) buf[j * kRows + r] = acc_t(0);
    }
  }
}

template <typename scalar_t, typename acc_t>
ORTHOFT_ALWAYS_INLINE void store_tile(const acc_t* buf, const Problem& p, int64_t first, int64_t rows,
                                      int64_t chunk, scalar_t* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* row = dst + (first + r) * p.n + chunk * p.chunk;
    for (int64_t j = 0; j < p.chunk; ++j) row[j] = static_cast<scalar_t>(buf[j * kRows + r]);
  }
}

// In place on a column-major tile: for each block, v <- v @ R. Two output columns at a time, so each
// loaded input vector feeds two independent accumulator chains.
template <typename acc_t>
ORTHOFT_ALWAYS_INLINE void apply_factor(acc_t* buf, const int64_t* pos, const acc_t* rot, int64_t blocks,
                                        int64_t b, acc_t* scratch) {
  using V = vec_t<acc_t>;
  constexpr int64_t lanes = kLanes<acc_t>;
  V* tile = reinterpret_cast<V*>(buf);
  V* out = reinterpret_cast<V*>(scratch);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t* p = pos + blk * b;
    const acc_t* r = rot + blk * b * b;
    int64_t c = 0;
    for (; c + 1 < b; c += 2) {
      V acc0[lanes] = {};
      V acc1[lanes] = {};
      for (int64_t t = 0; t < b; ++t) {
        const acc_t w0 = r[t * b + c];
        const acc_t w1 = r[t * b + c + 1];
        const V* in = tile + p[t] * lanes;
        for (int64_t l = 0; l < lanes; ++l) {
          acc0[l] += w0 * in[l];
          acc1[l] += w1 * in[l];
        }
      }
      for (int64_t l = 0; l < lanes; ++l) {
        out[c * lanes + l] = acc0[l];
        out[(c + 1) * lanes + l] = acc1[l];
      }
    }
    if (c < b) {
      V acc[lanes] = {};
      for (int64_t t = 0; t < b; ++t) {
        const V* in = tile + p[t] * lanes;
        for (int64_t l = 0; l < lanes; ++l) acc[l] += r[t * b + c] * in[l];
      }
      for (int64_t l = 0; l < lanes; ++l) out[c * lanes + l] = acc[l];
    }
    for (int64_t j = 0; j < b; ++j) {
      for (int64_t l = 0; l < lanes; ++l) tile[p[j] * lanes + l] = out[j * lanes + l];
    }
  }
}

// grad_lanes[blk, t, c] += in_block^T @ grad_block over the tile's rows, kept as one vector of
// partial sums per entry (padding rows are zero); reduce_lanes folds them once all tiles are done.
template <typename acc_t>
ORTHOFT_ALWAYS_INLINE void accumulate_rotation_grad(const acc_t* in, const acc_t* grad, const int64_t* pos,
                                                    int64_t blocks, int64_t b, acc_t* grad_lanes) {
  using V = vec_t<acc_t>;
  constexpr int64_t lanes = kLanes<acc_t>;
  const V* x = reinterpret_cast<const V*>(in);
  const V* g = reinterpret_cast<const V*>(grad);
  V* out = reinterpret_cast<V*>(grad_lanes);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t* p = pos + blk * b;
    for (int64_t t = 0; t < b; ++t) {
      for (int64_t c = 0; c < b; ++c) {
        V sum = out[(blk * b + t) * b + c];
        for (int64_t l = 0; l < lanes; ++l) sum += x[p[t] * lanes + l] * g[p[c] * lanes + l];
        out[(blk * b + t) * b + c] = sum;
      }
    }
  }
}

template <typename acc_t>
ORTHOFT_ALWAYS_INLINE void reduce_lanes(const acc_t* grad_lanes, int64_t count, acc_t* grad_rot) {
  constexpr int64_t width = sizeof(vec_t<acc_t>) / sizeof(acc_t);
  for (int64_t i = 0; i < count; ++i) {
    acc_t total = 0;
    for (int64_t e = 0; e < width; ++e) total += grad_lanes[i * width + e];
    grad_rot[i] += total;
  }
}

template <typename scalar_t, typename acc_t>
struct ForwardArgs {
  const Problem& p;
  const int64_t* positions;
  const acc_t* rot;
  const scalar_t* x;
  scalar_t* y;
};

template <typename scalar_t, typename acc_t>
ORTHOFT_ALWAYS_INLINE void forward_items(const ForwardArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
  const Problem& p = a.p;
  std::vector<acc_t> storage((p.chunk + p.b) * kRows);
  acc_t* buf = storage.data();
  acc_t* scratch = buf + p.chunk * kRows;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t chunk = item % p.chunks;
    const int64_t first = (item / p.chunks) * kRows;
    const int64_t rows = std::min(kRows, p.rows - first);
    load_tile(a.x, p, first, rows, chunk, buf);
    for (int64_t i = p.m - 1; i >= 0; --i) {
      apply_factor(buf, a.positions + i * p.chunk, a.rot + i * p.factor_stride() + chunk * p.chunk * p.b,
                   p.blocks_per_chunk(), p.b, scratch);
    }
    store_tile(buf, p, first, rows, chunk, a.y);
  }
}

template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  const Problem& p;
  const int64_t* positions;
  const acc_t* rot;
  const acc_t* rot_t;  // the rotations transposed, for the gradient of x
  const scalar_t* x;
  const scalar_t* grad;
  scalar_t* grad_x;
  acc_t* partial;  // (parts, m, D, b, b)
  int64_t parts;
};

// Rows are split into `parts` interleaved sets of tiles, each summing into its own partial rotation
// gradient; item = (part, chunk).
template <typename scalar_t, typename acc_t>
ORTHOFT_ALWAYS_INLINE void backward_items(const BackwardArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
  const Problem& p = a.p;
  const int64_t tile_size = p.chunk * kRows;
  // stages[i]: the input of factor i (stage m-1 is x); gbuf: the gradient flowing back.
  constexpr int64_t width = sizeof(vec_t<acc_t>) / sizeof(acc_t);
  const int64_t factor_entries = p.chunk * p.b;  // rotation entries of one factor inside a tile
  std::vector<acc_t> storage((p.m + 1) * tile_size + p.b * kRows);
  std::vector<acc_t> grad_lanes(p.m * factor_entries * width);
  acc_t* stages = storage.data();
  acc_t* gbuf = stages + p.m * tile_size;
  acc_t* scratch = gbuf + tile_size;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t part = item / p.chunks;
    const int64_t chunk = item % p.chunks;
    const acc_t* rot = a.rot + chunk * p.chunk * p.b;
    const acc_t* rot_t = a.rot_t + chunk * p.chunk * p.b;
    acc_t* grad_rot = a.partial + part * p.m * p.factor_stride() + chunk * p.chunk * p.b;
    std::fill(grad_lanes.begin(), grad_lanes.end(), acc_t(0));
    for (int64_t tile = part; tile < p.tiles; tile += a.parts) {
      const int64_t first = tile * kRows;
      const int64_t rows = std::min(kRows, p.rows - first);
      load_tile(a.x, p, first, rows, chunk, stages + (p.m - 1) * tile_size);
      for (int64_t i = p.m - 1; i >= 1; --i) {
        acc_t* next = stages + (i - 1) * tile_size;
        std::copy_n(stages + i * tile_size, tile_size, next);
        apply_factor(next, a.positions + i * p.chunk, rot + i * p.factor_stride(), p.blocks_per_chunk(), p.b,
                     scratch);
      }
      load_tile(a.grad, p, first, rows, chunk, gbuf);
      for (int64_t i = 0; i < p.m; ++i) {
        const int64_t* pos = a.positions + i * p.chunk;
        accumulate_rotation_grad(stages + i * tile_size, gbuf, pos, p.blocks_per_chunk(), p.b,
                                 grad_lanes.data() + i * factor_entries * width);
        apply_factor(gbuf, pos, rot_t + i * p.factor_stride(), p.blocks_per_chunk(), p.b, scratch);
      }
      store_tile(gbuf, p, first, rows, chunk, a.grad_x);
    }
    for (int64_t i = 0; i < p.m; ++i) {
      reduce_lanes(grad_lanes.data() + i * factor_entries * width, factor_entries, grad_rot + i * p.factor_stride());
    }
  }
}

#if ORTHOFT_HAVE_AVX2_PATH
template <typename scalar_t, typename acc_t>
ORTHOFT_TARGET_AVX2 void forward_items_avx2(const ForwardArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
  forward_items(a, begin, end);
}

template <typename scalar_t, typename acc_t>
ORTHOFT_TARGET_AVX2 void backward_items_avx2(const BackwardArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
  backward_items(a, begin, end);
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

template <typename scalar_t, typename acc_t>
void run_forward(const ForwardArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
#if ORTHOFT_HAVE_AVX2_PATH
  if (cpu_has_avx2()) return forward_items_avx2(a, begin, end);
#endif
  forward_items(a, begin, end);
}

template <typename scalar_t, typename acc_t>
void run_backward(const BackwardArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
#if ORTHOFT_HAVE_AVX2_PATH
  if (cpu_has_avx2()) return backward_items_avx2(a, begin, end);
#endif
  backward_items(a, begin, end);
}

// One factor with large float blocks is a batched matrix product over contiguous blocks, which BLAS
// does faster than the tile loops: (D, rows, b) @ (D, b, b).
bool use_batched_gemm(const at::Tensor& x, const Problem& p) {
  return p.m == 1 && p.b >= 16 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble);
}

at::Tensor as_blocks(const at::Tensor& t, const Problem& p) { return t.reshape({p.rows, p.n / p.b, p.b}); }

}  // namespace

at::Tensor butterfly_cpu(const at::Tensor& x, const at::Tensor& rotations, int64_t block_size) {
  check_butterfly(x, rotations, block_size);
  TORCH_CHECK(x.device().is_cpu(), "orthoft.ops.butterfly: the CPU kernel got x on ", x.device());
  const Problem p(x, rotations, block_size);
  if (use_batched_gemm(x, p)) {
    return at::einsum("nrk,rkc->nrc", {as_blocks(x, p), rotations[0]}).reshape(x.sizes()).contiguous();
  }
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  const std::vector<int64_t> positions = butterfly_positions(p.b, p.m, p.chunk);
  const auto acc_type = at::toOpMathType(in.scalar_type());
  const at::Tensor rot = rotations.to(acc_type).contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "orthoft_butterfly_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ForwardArgs<scalar_t, acc_t> args{p, positions.data(), rot.const_data_ptr<acc_t>(),
                                            in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>()};
    at::parallel_for(0, p.tiles * p.chunks, 1, [&](int64_t begin, int64_t end) { run_forward(args, begin, end); });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> butterfly_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                          const at::Tensor& rotations, int64_t block_size) {
  check_butterfly_backward(grad, x, rotations, block_size);
  TORCH_CHECK(x.device().is_cpu(), "orthoft.ops.butterfly_backward: the CPU kernel got x on ", x.device());
  const Problem p(x, rotations, block_size);
  if (use_batched_gemm(x, p)) {
    const at::Tensor x_blocks = as_blocks(x, p);
    const at::Tensor g_blocks = as_blocks(grad, p);
    return {at::einsum("nrc,rkc->nrk", {g_blocks, rotations[0]}).reshape(x.sizes()).contiguous(),
            at::einsum("nrk,nrc->rkc", {x_blocks, g_blocks}).unsqueeze(0).contiguous()};
  }
  const at::Tensor in = x.contiguous();
  const at::Tensor g = grad.contiguous();
  at::Tensor grad_x = at::empty_like(in);
  const std::vector<int64_t> positions = butterfly_positions(p.b, p.m, p.chunk);
  // Enough parts to keep every thread busy; summed at the end in a fixed order, so the result does
  // not depend on scheduling.
  const int64_t parts = std::min(p.tiles, std::max<int64_t>(1, (2 * at::get_num_threads() + p.chunks - 1) / p.chunks));
  const auto acc_type = at::toOpMathType(in.scalar_type());
  const at::Tensor rot = rotations.to(acc_type).contiguous();
  const at::Tensor rot_t = rot.transpose(-1, -2).contiguous();
  at::Tensor partial = at::zeros({parts, p.m, p.n / p.b, p.b, p.b}, in.options().dtype(acc_type));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "orthoft_butterfly_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardArgs<scalar_t, acc_t> args{p,
                                             positions.data(),
                                             rot.const_data_ptr<acc_t>(),
                                             rot_t.const_data_ptr<acc_t>(),
                                             in.const_data_ptr<scalar_t>(),
                                             g.const_data_ptr<scalar_t>(),
                                             grad_x.mutable_data_ptr<scalar_t>(),
                                             partial.mutable_data_ptr<acc_t>(),
                                             parts};
    at::parallel_for(0, parts * p.chunks, 1, [&](int64_t begin, int64_t end) { run_backward(args, begin, end); });
  });
  return {grad_x, partial.sum(0).to(rotations.scalar_type())};
}

TORCH_LIBRARY_IMPL(orthoft, CPU, m) {
  m.impl("butterfly", &butterfly_cpu);
  m.impl("butterfly_backward", &butterfly_backward_cpu);
}

}  // namespace orthoft
