// CPU kernels of one butterfly factor of wide float blocks on row-major rows: y = x @ blockdiag(w) and the
// blocks' gradient x^T @ grad per block, each block a slice of columns, read and written in place.
//
// A panel keeps a few rows by two vectors of one block's columns in registers: the product runs over
// the block's b inputs of kPanelRows rows, the gradient over the rows for kGradPanelRows of its b
// inputs. Vectors are AVX-512's where the blocks hold whole panels of them, else AVX2's width.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "butterfly.h"
#include "cpu_isa.h"
#include "simd.h"

namespace orthoft {
namespace {

constexpr int64_t kPanelRows = 6;
// The fewest multiply-adds a thread takes. A floor of 96 rows instead kept 64 rows of 4096 columns in
// 128-column blocks on one thread: 80 GMAC/s, against BLAS's 98 on two, and 140-175 now.
constexpr int64_t kMinTaskWork = 1 << 21;
// Rows a gradient task reads per pass over its block: two 96-row slices of a 32-column block stay in L1.
constexpr int64_t kGradChunkRows = 96;
// Wider blocks go to BLAS, which is faster there (butterfly_by_matmul). With AVX-512 the kernels beat it
// up to 256 columns (2048 x 1024, float: 128 columns 239 against 92 GMAC/s forward, 154 against 74 for
// the gradient; 256 columns 203 against 98 and 175 against 94) but not at 1024 (97 against 106). Without
// AVX-512 64-column blocks take BLAS too (1568 x 1024, AVX2: the gradient 2.1 ms against 1.7 ms).
constexpr int64_t kMaxKernelBlock = 32;
constexpr int64_t kMaxAvx512KernelBlock = 256;

template <typename T, int64_t Bytes>
constexpr int64_t kPanelColumns = 2 * kSimdWidth<T, Bytes>;

// Inputs of the gradient a panel holds: 8 x 2 accumulators of AVX-512's 32 registers, 6 x 2 of AVX2's 16.
template <int64_t Bytes>
constexpr int64_t kGradPanelRows = Bytes == 64 ? 8 : 6;

template <typename T>
struct BlockArgs {
  const T* x;
  const T* w;  // (D, b, b)
  T* y;
  int64_t rows, n, b;
};

// y[r, c .. c + 2V] = x[r, block] @ w[:, c .. c + 2V] for R rows.
template <typename T, int64_t Bytes, int64_t R>
ORTHOFT_ALWAYS_INLINE void product_panel(const T* x, const T* w, T* y, int64_t n, int64_t b) {
  using V = simd_t<T, Bytes>;
  constexpr int64_t half = kSimdWidth<T, Bytes>;
  V acc0[R] = {};
  V acc1[R] = {};
  for (int64_t t = 0; t < b; ++t) {
    const V w0 = *reinterpret_cast<const V*>(w + t * b);
    const V w1 = *reinterpret_cast<const V*>(w + t * b + half);
    for (int64_t r = 0; r < R; ++r) {
      const T v = x[r * n + t];
      acc0[r] += v * w0;
      acc1[r] += v * w1;
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    *reinterpret_cast<V*>(y + r * n) = acc0[r];
    *reinterpret_cast<V*>(y + r * n + half) = acc1[r];
  }
}

// Rows r .. r + R through every block.
template <typename T, int64_t Bytes, int64_t R>
ORTHOFT_ALWAYS_INLINE void product_rows(const BlockArgs<T>& a, int64_t r) {
  for (int64_t col = 0; col < a.n; col += a.b) {
    for (int64_t c = 0; c < a.b; c += kPanelColumns<T, Bytes>) {
      product_panel<T, Bytes, R>(a.x + r * a.n + col, a.w + col * a.b + c, a.y + r * a.n + col + c, a.n, a.b);
    }
  }
}

// Item: kPanelRows rows through every block, so that x and y stream row by row (the blocks' rotations
// stay in L2).
template <typename T, int64_t Bytes>
ORTHOFT_ALWAYS_INLINE void product_items(const BlockArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t first = begin * kPanelRows;
  const int64_t last = std::min(a.rows, end * kPanelRows);
  int64_t r = first;
  for (; r + kPanelRows <= last; r += kPanelRows) product_rows<T, Bytes, kPanelRows>(a, r);
  for (; r < last; ++r) product_rows<T, Bytes, 1>(a, r);
}

// out[t .. t + R, 0 .. 2V] += x[:, t .. t + R]^T @ grad[:, 0 .. 2V] over `rows` rows n apart; out's rows
// are b apart.
template <typename T, int64_t Bytes, int64_t R>
ORTHOFT_ALWAYS_INLINE void gradient_panel(const T* x, const T* grad, int64_t rows, int64_t n, T* out, int64_t b) {
  using V = simd_t<T, Bytes>;
  constexpr int64_t half = kSimdWidth<T, Bytes>;
  V acc0[R];
  V acc1[R];
  for (int64_t t = 0; t < R; ++t) {
    acc0[t] = *reinterpret_cast<const V*>(out + t * b);
    acc1[t] = *reinterpret_cast<const V*>(out + t * b + half);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const V g0 = *reinterpret_cast<const V*>(grad + r * n);
    const V g1 = *reinterpret_cast<const V*>(grad + r * n + half);
    for (int64_t t = 0; t < R; ++t) {
      const T v = x[r * n + t];
      acc0[t] += v * g0;
      acc1[t] += v * g1;
    }
  }
  for (int64_t t = 0; t < R; ++t) {
    *reinterpret_cast<V*>(out + t * b) = acc0[t];
    *reinterpret_cast<V*>(out + t * b + half) = acc1[t];
  }
}

// Task item: one part of one block's rows, into its zeroed (b, b) slice of out. Part p of `parts` takes
// rows [p * rows / parts, (p + 1) * rows / parts) into slice p * D + block.
template <typename T, int64_t Bytes>
ORTHOFT_ALWAYS_INLINE void gradient_items(const BlockArgs<T>& a, int64_t parts, int64_t begin, int64_t end) {
  constexpr int64_t panel_rows = kGradPanelRows<Bytes>;
  const int64_t blocks = a.n / a.b;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t block = item / parts;
    const int64_t part = item % parts;
    const int64_t col = block * a.b;
    T* out = a.y + (part * blocks + block) * a.b * a.b;
    const int64_t last = (part + 1) * a.rows / parts;
    for (int64_t first = part * a.rows / parts; first < last; first += kGradChunkRows) {
      const int64_t rows = std::min(kGradChunkRows, last - first);
      const T* x = a.x + first * a.n + col;
      const T* grad = a.w + first * a.n + col;
      for (int64_t c = 0; c < a.b; c += kPanelColumns<T, Bytes>) {
        int64_t t = 0;
        for (; t + panel_rows <= a.b; t += panel_rows) {
          gradient_panel<T, Bytes, panel_rows>(x + t, grad + c, rows, a.n, out + t * a.b + c, a.b);
        }
        for (; t < a.b; ++t) gradient_panel<T, Bytes, 1>(x + t, grad + c, rows, a.n, out + t * a.b + c, a.b);
      }
    }
  }
}

// Runs items(args, begin, end) with the instruction set's vectors where the blocks hold whole panels of
// them, else (AVX-512 with 16-column blocks) with AVX2-wide ones.
template <typename T, typename Items>
void run_items(const BlockArgs<T>& a, int64_t begin, int64_t end, const Items& items) {
  run_for_cpu([&](auto isa) ORTHOFT_INLINE_LAMBDA {
    constexpr int64_t bytes = kVectorBytes<isa.isa>;
    if (a.b % kPanelColumns<T, bytes> == 0) return items(a, begin, end, std::integral_constant<int64_t, bytes>{});
    items(a, begin, end, std::integral_constant<int64_t, std::min<int64_t>(bytes, 32)>{});
  });
}

int64_t rows_of(const Tensor& x) { return x.size(-1) == 0 ? 0 : x.numel() / x.size(-1); }

template <typename T>
void product_into(const Tensor& x, const Tensor& w, int64_t block_size, Tensor& out) {
  const int64_t rows = rows_of(x);
  const BlockArgs<T> args{x.const_data_ptr<T>(), w.const_data_ptr<T>(), out.mutable_data_ptr<T>(), rows,
                          x.size(-1), block_size};
  // Each thread takes one run of panels, all of about the same length.
  const int64_t panels = (rows + kPanelRows - 1) / kPanelRows;
  const int64_t panel_work = std::max<int64_t>(1, kPanelRows * x.size(-1) * block_size);
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / panel_work);
  torch::stable::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    run_items(args, begin, end, [](const auto& a, int64_t b, int64_t e, auto bytes) ORTHOFT_INLINE_LAMBDA {
      product_items<T, decltype(bytes)::value>(a, b, e);
    });
  });
}

// Gradient args: x as x, grad in place of w, the (D, b, b) gradient as y.
template <typename T>
void gradient_into(const Tensor& x, const Tensor& grad, int64_t block_size, Tensor& out) {
  const int64_t rows = rows_of(x);
  const int64_t blocks = x.size(-1) / block_size;
  // With fewer blocks than threads, each block's sum over rows is split into parts of at least
  // kGradChunkRows rows, added in a fixed order at the end, so that every thread works (one 256-column
  // block of 2048 rows, two threads: 106 GMAC/s on one of them, 141 split).
  const int64_t threads = torch::stable::get_num_threads();
  const int64_t parts =
      blocks >= threads ? 1
                        : std::max<int64_t>(1, std::min((threads + blocks - 1) / blocks, rows / kGradChunkRows));
  std::vector<T> partial(parts > 1 ? parts * out.numel() : 0, T(0));
  T* sums = parts > 1 ? partial.data() : out.mutable_data_ptr<T>();
  if (parts == 1) std::fill(sums, sums + out.numel(), T(0));
  const BlockArgs<T> args{x.const_data_ptr<T>(), grad.const_data_ptr<T>(), sums, rows, x.size(-1), block_size};
  torch::stable::parallel_for(0, blocks * parts, 1, [&](int64_t begin, int64_t end) {
    run_items(args, begin, end, [parts](const auto& a, int64_t b, int64_t e, auto bytes) ORTHOFT_INLINE_LAMBDA {
      gradient_items<T, decltype(bytes)::value>(a, parts, b, e);
    });
  });
  if (parts > 1) add_parts(partial.data(), parts, out.numel(), out.mutable_data_ptr<T>());
}

}  // namespace

bool block_kernel_takes(const Tensor& x, int64_t block_size) {
  const bool is_float = x.scalar_type() == ScalarType::Float;
  if (!is_float && x.scalar_type() != ScalarType::Double) return false;
  const int64_t panel = is_float ? kPanelColumns<float, 32> : kPanelColumns<double, 32>;
  const int64_t largest = cpu_isa() == Isa::kAvx512 ? kMaxAvx512KernelBlock : kMaxKernelBlock;
  return block_size <= largest && block_size % panel == 0;
}

Tensor block_product(const Tensor& x, const Tensor& w, int64_t block_size) {
  Tensor out = new_tensor(x, shape(x));
  ORTHOFT_DISPATCH_FLOAT_DOUBLE(x.scalar_type(), "orthoft_block_product",
                                [&] { product_into<scalar_t>(x, w, block_size, out); });
  return out;
}

Tensor block_gradient(const Tensor& x, const Tensor& grad, int64_t block_size) {
  Tensor out = new_tensor(x, {x.size(-1) / block_size, block_size, block_size});
  ORTHOFT_DISPATCH_FLOAT_DOUBLE(x.scalar_type(), "orthoft_block_gradient",
                                [&] { gradient_into<scalar_t>(x, grad, block_size, out); });
  return out;
}

}  // namespace orthoft
