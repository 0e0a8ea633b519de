// CPU kernels of channel_blocks (see channel_blocks.h) for float and double; other dtypes take the matmul
// path.
//
// x is (L, F, P) and a slice is the (C, P) part of one leading index and one chunk. The product of a
// slice is a (C, C) matrix times it: the block, transposed, in forward, and the block itself for x's
// gradient. A panel keeps a few rows by two vectors of positions in registers; positions are contiguous,
// so it runs along them, and the last positions, fewer than a vector, go through zero-padded copies.
//
// The blocks' gradient sums x's slices times grad's, transposed, over every leading index. Where C is two
// or more vectors wide it is a product over positions with grad's slices transposed block by block
// (gradient_chunk_by_columns). Narrower chunks take tiles of a few by a few rows of vectors of positions
// that sum their lanes at the end, every tile of a few rows of x passing over a segment of positions
// before the next, so that those rows are read from L1 (gradient_chunk_by_lanes). The backward takes both
// gradients chunk by chunk where there are chunks enough for every thread, so that grad's slices are
// still in cache for the blocks' gradient.
#include <algorithm>
#include <vector>

#include "channel_blocks.h"
#include "checks.h"
#include "cpu_isa.h"
#include "simd.h"

namespace orthoft {
namespace {

// Rows of a product panel: 8 x 2 accumulators of AVX-512's 32 registers, 4 x 2 of AVX2's 16.
template <int64_t Bytes>
constexpr int64_t kPanelRows = Bytes == 64 ? 8 : 4;
// A gradient tile: 4 x 4 vector accumulators of AVX-512's 32 registers, 2 x 4 of AVX2's 16.
template <int64_t Bytes>
constexpr int64_t kTileRows = Bytes == 64 ? 4 : 2;
constexpr int64_t kTileColumns = 4;
// The gradient by columns: vectors of columns per tile, and rows of x per tile for NV of them, within
// AVX-512's 32 registers (AVX2's 16), and the bytes of the transposed block of grad (in L1).
template <int64_t Bytes>
constexpr int64_t kColumnGroup = Bytes == 64 ? 4 : 2;
template <int64_t Bytes, int64_t NV>
constexpr int64_t kColumnTileRows = Bytes == 64 ? (NV >= 3 ? 6 : 16 / NV) : 8 / NV;
constexpr int64_t kTransposedBytes = 32 << 10;
// Bytes of the rows of x a pass of the gradient's tiles runs over (segments()).
constexpr int64_t kSegmentBytes = 8 << 10;
// The fewest multiply-adds a thread takes.
constexpr int64_t kMinTaskWork = int64_t{1} << 16;

// A (C, C) matrix read through strides, so that a block and its transpose are the same code.
template <typename T>
struct Coefficients {
  const T* data;
  int64_t row, column;  // strides
};

template <typename T>
struct Args {
  const T* x;  // (L, F, P)
  const T* blocks;  // (D, C, C)
  const T* grad;  // (L, F, P), for the blocks' gradient
  T* out;
  int64_t leading, f, p, c;
  bool transposed;  // the product by the blocks transposed (forward) or as they are (x's gradient)
};

// out[r, 0 .. NV * W] = sum_k a(r, k) y[k, 0 .. NV * W] for R rows; y's and out's rows are `stride` apart.
template <typename T, int64_t Bytes, int64_t R, int64_t NV>
ORTHOFT_ALWAYS_INLINE void product_panel(const Coefficients<T>& a, const T* y, T* out, int64_t stride,
                                         int64_t c) {
  using V = simd_t<T, Bytes>;
  constexpr int64_t w = kSimdWidth<T, Bytes>;
  V acc[R][NV] = {};
  for (int64_t k = 0; k < c; ++k) {
    V v[NV];
    for (int64_t n = 0; n < NV; ++n) v[n] = *reinterpret_cast<const V*>(y + k * stride + n * w);
    for (int64_t r = 0; r < R; ++r) {
      const T s = a.data[r * a.row + k * a.column];
      for (int64_t n = 0; n < NV; ++n) acc[r][n] += s * v[n];
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t n = 0; n < NV; ++n) *reinterpret_cast<V*>(out + r * stride + n * w) = acc[r][n];
  }
}

// Every row of a slice at NV vectors of positions.
template <typename T, int64_t Bytes, int64_t NV>
ORTHOFT_ALWAYS_INLINE void product_columns(const Coefficients<T>& a, const T* y, T* out, int64_t stride,
                                           int64_t c) {
  constexpr int64_t rows = kPanelRows<Bytes>;
  int64_t i = 0;
  for (; i + rows <= c; i += rows) {
    product_panel<T, Bytes, rows, NV>({a.data + i * a.row, a.row, a.column}, y, out + i * stride, stride, c);
  }
  for (; i < c; ++i) {
    product_panel<T, Bytes, 1, NV>({a.data + i * a.row, a.row, a.column}, y, out + i * stride, stride, c);
  }
}

// One slice: y and out (C, P); pad_in and pad_out hold C vectors.
template <typename T, int64_t Bytes>
ORTHOFT_ALWAYS_INLINE void product_slice(const Coefficients<T>& a, const T* y, T* out, int64_t c, int64_t p,
                                         T* pad_in, T* pad_out) {
  constexpr int64_t w = kSimdWidth<T, Bytes>;
  int64_t col = 0;
  for (; col + 2 * w <= p; col += 2 * w) product_columns<T, Bytes, 2>(a, y + col, out + col, p, c);
  for (; col + w <= p; col += w) product_columns<T, Bytes, 1>(a, y + col, out + col, p, c);
  const int64_t tail = p - col;
  if (tail == 0) return;
  for (int64_t k = 0; k < c; ++k) {
    std::copy(y + k * p + col, y + k * p + p, pad_in + k * w);
    std::fill(pad_in + k * w + tail, pad_in + (k + 1) * w, T(0));
  }
  product_columns<T, Bytes, 1>(a, pad_in, pad_out, w, c);
  for (int64_t i = 0; i < c; ++i) std::copy(pad_out + i * w, pad_out + i * w + tail, out + i * p + col);
}

// One slice, leading index by leading index; pads holds 2 * C vectors.
template <typename T, int64_t Bytes>
ORTHOFT_ALWAYS_INLINE void product_item(const Args<T>& a, int64_t item, T* pads) {
  const T* block = a.blocks + (item % (a.f / a.c)) * a.c * a.c;
  const Coefficients<T> coefficients = a.transposed ? Coefficients<T>{block, 1, a.c} : Coefficients<T>{block, a.c, 1};
  const int64_t offset = item * a.c * a.p;
  product_slice<T, Bytes>(coefficients, a.x + offset, a.out + offset, a.c, a.p, pads,
                          pads + a.c * kSimdWidth<T, Bytes>);
}

// Items: slices.
template <typename T, int64_t Bytes>
ORTHOFT_ALWAYS_INLINE void product_items(const Args<T>& a, int64_t begin, int64_t end) {
  std::vector<T> pads(2 * a.c * kSimdWidth<T, Bytes>);
  for (int64_t item = begin; item < end; ++item) product_item<T, Bytes>(a, item, pads.data());
}

// acc[k][i] += x[k, 0 .. W] * g[i, 0 .. W], rows `stride` apart.
template <typename T, int64_t Bytes, int64_t RK, int64_t RI>
ORTHOFT_ALWAYS_INLINE void tile_step(simd_t<T, Bytes> (&acc)[RK][RI], const T* x, const T* g, int64_t stride) {
  using V = simd_t<T, Bytes>;
  V xv[RK];
  V gv[RI];
  for (int64_t k = 0; k < RK; ++k) xv[k] = *reinterpret_cast<const V*>(x + k * stride);
  for (int64_t i = 0; i < RI; ++i) gv[i] = *reinterpret_cast<const V*>(g + i * stride);
  for (int64_t k = 0; k < RK; ++k) {
    for (int64_t i = 0; i < RI; ++i) acc[k][i] += xv[k] * gv[i];
  }
}

// Positions of one pass over a few rows: leading indices l0 .. l1, and positions p0 .. p1 of each.
struct Segment {
  int64_t l0, l1, p0, p1;
};

// Passes whose rows of x, RK of them, take at most kSegmentBytes, so that they stay in L1 while the
// tiles of every column of the gradient run over them: a whole slice or more where it fits, else part
// of one, a whole number of vectors long.
template <typename T, int64_t Bytes, int64_t RK>
std::vector<Segment> segments(const Args<T>& a) {
  constexpr int64_t w = kSimdWidth<T, Bytes>;
  const int64_t positions = std::max(w, kSegmentBytes / (RK * static_cast<int64_t>(sizeof(T))) / w * w);
  std::vector<Segment> out;
  if (a.p <= positions) {
    const int64_t leading = std::max<int64_t>(1, positions / std::max<int64_t>(1, a.p));
    for (int64_t l = 0; l < a.leading; l += leading) out.push_back({l, std::min(a.leading, l + leading), 0, a.p});
  } else {
    for (int64_t l = 0; l < a.leading; ++l) {
      for (int64_t p = 0; p < a.p; p += positions) out.push_back({l, l + 1, p, std::min(a.p, p + positions)});
    }
  }
  return out;
}

// acc[i][k] += sum over one segment of x[k, :] * g[i, :] for RK x RI rows of one chunk's slices; x_pad and
// g_pad hold their last positions as a zero-padded vector per row, leading index by leading index.
template <typename T, int64_t Bytes, int64_t RK, int64_t RI>
ORTHOFT_ALWAYS_INLINE void gradient_tile(const Args<T>& a, const Segment& s, const T* x, const T* g,
                                         const T* x_pad, const T* g_pad, simd_t<T, Bytes>* acc_store) {
  using V = simd_t<T, Bytes>;
  constexpr int64_t w = kSimdWidth<T, Bytes>;
  V acc[RK][RI];
  for (int64_t i = 0; i < RI; ++i) {
    for (int64_t k = 0; k < RK; ++k) acc[k][i] = acc_store[i * RK + k];
  }
  const int64_t leading_stride = a.f * a.p;
  const bool tail = s.p1 == a.p && a.p % w != 0;
  for (int64_t l = s.l0; l < s.l1; ++l) {
    const T* xl = x + l * leading_stride;
    const T* gl = g + l * leading_stride;
    for (int64_t col = s.p0; col + w <= s.p1; col += w) tile_step<T, Bytes, RK, RI>(acc, xl + col, gl + col, a.p);
    if (tail) tile_step<T, Bytes, RK, RI>(acc, x_pad + l * a.c * w, g_pad + l * a.c * w, w);
  }
  for (int64_t i = 0; i < RI; ++i) {
    for (int64_t k = 0; k < RK; ++k) acc_store[i * RK + k] = acc[k][i];
  }
}

// RK rows of a chunk's gradient: every column's tiles pass over a segment before the next, their sums
// kept as vectors in acc (RK per column) and summed across lanes at the end.
template <typename T, int64_t Bytes, int64_t RK>
ORTHOFT_ALWAYS_INLINE void gradient_rows(const Args<T>& a, const std::vector<Segment>& segments, const T* x,
                                         const T* g, const T* x_pad, const T* g_pad, T* acc_data, T* out) {
  using V = simd_t<T, Bytes>;
  constexpr int64_t w = kSimdWidth<T, Bytes>;
  std::fill(acc_data, acc_data + a.c * RK * w, T(0));
  V* acc = reinterpret_cast<V*>(acc_data);
  for (const Segment& s : segments) {
    int64_t i = 0;
    for (; i + kTileColumns <= a.c; i += kTileColumns) {
      gradient_tile<T, Bytes, RK, kTileColumns>(a, s, x, g + i * a.p, x_pad, g_pad + i * w, acc + i * RK);
    }
    for (; i < a.c; ++i) gradient_tile<T, Bytes, RK, 1>(a, s, x, g + i * a.p, x_pad, g_pad + i * w, acc + i * RK);
  }
  for (int64_t i = 0; i < a.c; ++i) {
    for (int64_t k = 0; k < RK; ++k) {
      T sum = 0;
      for (int64_t lane = 0; lane < w; ++lane) sum += acc[i * RK + k][lane];
      out[k * a.c + i] = sum;
    }
  }
}

// Copies the last positions of every row of one chunk's slices, fewer than a vector, zero-padded.
template <typename T>
void pad_tails(const Args<T>& a, const T* t, int64_t w, T* pad) {
  const int64_t col = a.p - a.p % w;
  for (int64_t l = 0; l < a.leading; ++l) {
    for (int64_t k = 0; k < a.c; ++k) {
      const T* row = t + l * a.f * a.p + k * a.p;
      T* padded = pad + (l * a.c + k) * w;
      std::copy(row + col, row + a.p, padded);
      std::fill(padded + a.p - col, padded + w, T(0));
    }
  }
}

// One chunk into its (C, C) slice of out, by tiles of vectors of positions.
template <typename T, int64_t Bytes>
ORTHOFT_ALWAYS_INLINE void gradient_chunk_by_lanes(const Args<T>& a, int64_t chunk) {
  constexpr int64_t w = kSimdWidth<T, Bytes>;
  constexpr int64_t rows = kTileRows<Bytes>;
  const T* x = a.x + chunk * a.c * a.p;
  const T* g = a.grad + chunk * a.c * a.p;
  const bool padded = a.p % w != 0;
  std::vector<T> x_pad(padded ? a.leading * a.c * w : 0);
  std::vector<T> g_pad(x_pad.size());
  if (padded) {
    pad_tails(a, x, w, x_pad.data());
    pad_tails(a, g, w, g_pad.data());
  }
  std::vector<T> acc(a.c * rows * w);
  T* out = a.out + chunk * a.c * a.c;
  int64_t k = 0;
  const std::vector<Segment> row_segments = segments<T, Bytes, rows>(a);
  for (; k + rows <= a.c; k += rows) {
    gradient_rows<T, Bytes, rows>(a, row_segments, x + k * a.p, g, x_pad.data() + k * w, g_pad.data(), acc.data(),
                                  out + k * a.c);
  }
  const std::vector<Segment> one_row_segments = segments<T, Bytes, 1>(a);
  for (; k < a.c; ++k) {
    gradient_rows<T, Bytes, 1>(a, one_row_segments, x + k * a.p, g, x_pad.data() + k * w, g_pad.data(), acc.data(),
                               out + k * a.c);
  }
}

// out[r, 0 .. NV * W] += sum over n positions q of x[r, q] * g_t[q, 0 .. NV * W] for R rows of x (`p`
// apart) and of out (`c` apart); g_t's rows are `c` apart.
template <typename T, int64_t Bytes, int64_t R, int64_t NV>
ORTHOFT_ALWAYS_INLINE void column_tile(const T* x, int64_t p, const T* g_t, int64_t c, int64_t n, T* out) {
  using V = simd_t<T, Bytes>;
  constexpr int64_t w = kSimdWidth<T, Bytes>;
  V acc[R][NV];
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t v = 0; v < NV; ++v) acc[r][v] = *reinterpret_cast<const V*>(out + r * c + v * w);
  }
  for (int64_t q = 0; q < n; ++q) {
    V gv[NV];
    for (int64_t v = 0; v < NV; ++v) gv[v] = *reinterpret_cast<const V*>(g_t + q * c + v * w);
    for (int64_t r = 0; r < R; ++r) {
      const T s = x[r * p + q];
      for (int64_t v = 0; v < NV; ++v) acc[r][v] += s * gv[v];
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t v = 0; v < NV; ++v) *reinterpret_cast<V*>(out + r * c + v * w) = acc[r][v];
  }
}

// Every row of out for NV vectors of its columns, in tiles of kColumnTileRows rows.
template <typename T, int64_t Bytes, int64_t NV>
ORTHOFT_ALWAYS_INLINE void column_group(const T* x, int64_t p, const T* g_t, int64_t c, int64_t n, T* out) {
  constexpr int64_t rows = kColumnTileRows<Bytes, NV>;
  int64_t k = 0;
  for (; k + rows <= c; k += rows) column_tile<T, Bytes, rows, NV>(x + k * p, p, g_t, c, n, out + k * c);
  for (; k < c; ++k) column_tile<T, Bytes, 1, NV>(x + k * p, p, g_t, c, n, out + k * c);
}

// out += x (C, n) @ g_t (n, C), in groups of kColumnGroup vectors of columns and one group of the rest.
template <typename T, int64_t Bytes>
ORTHOFT_ALWAYS_INLINE void column_product(const T* x, int64_t p, const T* g_t, int64_t c, int64_t n, T* out) {
  constexpr int64_t w = kSimdWidth<T, Bytes>;
  constexpr int64_t group = kColumnGroup<Bytes>;
  const int64_t vectors = c / w;
  int64_t v = 0;
  for (; v + group <= vectors; v += group) column_group<T, Bytes, group>(x, p, g_t + v * w, c, n, out + v * w);
  const int64_t rest = vectors - v;
  if constexpr (group == 4) {
    if (rest == 3) return column_group<T, Bytes, 3>(x, p, g_t + v * w, c, n, out + v * w);
    if (rest == 2) return column_group<T, Bytes, 2>(x, p, g_t + v * w, c, n, out + v * w);
  }
  if (rest == 1) column_group<T, Bytes, 1>(x, p, g_t + v * w, c, n, out + v * w);
}

// g_t[q, i] = g[i, q] for C rows of g (`p` apart) and n positions: squares of W x W in registers, the
// last positions one by one.
template <typename T, int64_t Bytes>
ORTHOFT_ALWAYS_INLINE void transpose_rows(const T* g, int64_t p, int64_t c, int64_t n, T* g_t) {
  using V = simd_t<T, Bytes>;
  constexpr int64_t w = kSimdWidth<T, Bytes>;
  int64_t q = 0;
  for (; q + w <= n; q += w) {
    for (int64_t i = 0; i < c; i += w) {
      V square[w];
      for (int64_t r = 0; r < w; ++r) square[r] = *reinterpret_cast<const V*>(g + (i + r) * p + q);
      transpose_square<T, Bytes>(square);
      for (int64_t r = 0; r < w; ++r) *reinterpret_cast<V*>(g_t + (q + r) * c + i) = square[r];
    }
  }
  for (int64_t i = 0; i < c; ++i) {
    for (int64_t t = q; t < n; ++t) g_t[t * c + i] = g[i * p + t];
  }
}

// One chunk into its (C, C) slice of out, as a product over positions: each block of grad's slices is
// transposed into a (positions, C) buffer, so that a tile of rows of x by vectors of columns takes one
// load per vector and one broadcast per row at every position, and no sum across lanes (8 x 1024 x 196,
// one thread: C = 64 at 98 GMAC/s against 47 by lanes, C = 32 at 91 against 45).
template <typename T, int64_t Bytes>
ORTHOFT_ALWAYS_INLINE void gradient_chunk_by_columns(const Args<T>& a, int64_t chunk) {
  constexpr int64_t w = kSimdWidth<T, Bytes>;
  const T* x = a.x + chunk * a.c * a.p;
  const T* g = a.grad + chunk * a.c * a.p;
  T* out = a.out + chunk * a.c * a.c;
  std::fill(out, out + a.c * a.c, T(0));
  const int64_t block = std::max(w, kTransposedBytes / (a.c * static_cast<int64_t>(sizeof(T))) / w * w);
  std::vector<T> g_t(block * a.c);
  for (int64_t l = 0; l < a.leading; ++l) {
    const int64_t offset = l * a.f * a.p;
    for (int64_t p0 = 0; p0 < a.p; p0 += block) {
      const int64_t n = std::min(block, a.p - p0);
      transpose_rows<T, Bytes>(g + offset + p0, a.p, a.c, n, g_t.data());
      column_product<T, Bytes>(x + offset + p0, a.p, g_t.data(), a.c, n, out);
    }
  }
}

// By columns where C is two or more whole vectors, else by lanes.
template <typename T, int64_t Bytes>
ORTHOFT_ALWAYS_INLINE void gradient_chunk(const Args<T>& a, int64_t chunk) {
  constexpr int64_t w = kSimdWidth<T, Bytes>;
  if (a.c % w == 0 && a.c >= 2 * w) return gradient_chunk_by_columns<T, Bytes>(a, chunk);
  gradient_chunk_by_lanes<T, Bytes>(a, chunk);
}

// Items: chunks, each with x's gradient of its slices first, which brings grad's slices into cache for
// the blocks' gradient: grad is read from memory once instead of twice.
template <typename T, int64_t Bytes>
ORTHOFT_ALWAYS_INLINE void backward_items(const Args<T>& product, const Args<T>& gradient, int64_t begin,
                                          int64_t end) {
  const int64_t chunks = product.f / product.c;
  std::vector<T> pads(2 * product.c * kSimdWidth<T, Bytes>);
  for (int64_t chunk = begin; chunk < end; ++chunk) {
    for (int64_t l = 0; l < product.leading; ++l) product_item<T, Bytes>(product, l * chunks + chunk, pads.data());
    gradient_chunk<T, Bytes>(gradient, chunk);
  }
}

// Tasks of at least kMinTaskWork multiply-adds, for items of `work` each.
int64_t grain(int64_t work) { return std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work)); }

template <typename T>
void product_into(const Tensor& y, const Tensor& blocks, bool transposed, Tensor& out) {
  const int64_t c = blocks.size(1);
  const Args<T> args{y.const_data_ptr<T>(), blocks.const_data_ptr<T>(), nullptr, out.mutable_data_ptr<T>(),
                     leading_size(y), y.size(-2), y.size(-1), c, transposed};
  const int64_t slices = args.leading * blocks.size(0);
  torch::stable::parallel_for(0, slices, grain(c * c * args.p), [&](int64_t begin, int64_t end) {
    run_for_cpu([&](auto isa) ORTHOFT_INLINE_LAMBDA {
      product_items<T, kVectorBytes<decltype(isa)::isa>>(args, begin, end);
    });
  });
}

// Fewer chunks than threads split the sum over the leading indices into parts, each into its own copy of
// out, added in a fixed order so that the result does not depend on scheduling.
template <typename T>
void gradient_into(const Tensor& x, const Tensor& grad, int64_t c, Tensor& out) {
  const int64_t chunks = out.size(0), leading = leading_size(x), f = x.size(-2), p = x.size(-1);
  const int64_t threads = torch::stable::get_num_threads();
  const int64_t parts = std::max<int64_t>(1, std::min(leading, (threads + chunks - 1) / chunks));
  const int64_t numel = out.numel();
  std::vector<T> partial(parts > 1 ? parts * numel : 0);
  T* sums = parts > 1 ? partial.data() : out.mutable_data_ptr<T>();
  const int64_t work = c * c * p * (leading / parts);
  torch::stable::parallel_for(0, chunks * parts, grain(work), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t part = item % parts, chunk = item / parts;
      const int64_t first = part * leading / parts, last = (part + 1) * leading / parts;
      const Args<T> args{x.const_data_ptr<T>() + first * f * p, nullptr, grad.const_data_ptr<T>() + first * f * p,
                         sums + part * numel, last - first, f, p, c, false};
      run_for_cpu([&](auto isa) ORTHOFT_INLINE_LAMBDA {
        gradient_chunk<T, kVectorBytes<decltype(isa)::isa>>(args, chunk);
      });
    }
  });
  if (parts > 1) add_parts(partial.data(), parts, numel, out.mutable_data_ptr<T>());
}

// Both gradients, chunk by chunk.
template <typename T>
void backward_into(const Tensor& grad, const Tensor& x, const Tensor& blocks, Tensor& grad_x, Tensor& grad_blocks) {
  const int64_t c = blocks.size(1);
  const int64_t l = leading_size(x), f = x.size(-2), p = x.size(-1);
  const Args<T> product{grad.const_data_ptr<T>(), blocks.const_data_ptr<T>(), nullptr, grad_x.mutable_data_ptr<T>(),
                        l, f, p, c, false};
  const Args<T> gradient{x.const_data_ptr<T>(), nullptr, grad.const_data_ptr<T>(), grad_blocks.mutable_data_ptr<T>(),
                         l, f, p, c, false};
  torch::stable::parallel_for(0, blocks.size(0), grain(2 * c * c * p * l), [&](int64_t begin, int64_t end) {
    run_for_cpu([&](auto isa) ORTHOFT_INLINE_LAMBDA {
      backward_items<T, kVectorBytes<decltype(isa)::isa>>(product, gradient, begin, end);
    });
  });
}

// y (..., F, P) with each position's channels times blockdiag(blocks), transposed or not.
Tensor product(const Tensor& y, const Tensor& blocks, bool transposed) {
  const Tensor in = torch::stable::contiguous(y);
  const Tensor w = torch::stable::contiguous(blocks);
  Tensor out = new_tensor(in, shape(in));
  ORTHOFT_DISPATCH_FLOAT_DOUBLE(in.scalar_type(), "orthoft_channel_blocks_cpu",
                                [&] { product_into<scalar_t>(in, w, transposed, out); });
  return out;
}

Tensor channel_blocks_cpu(const Tensor& x, const Tensor& blocks) {
  check_channel_blocks(x, blocks);
  STD_TORCH_CHECK(x.is_cpu(), "orthoft.ops.channel_blocks: the CPU kernel got x on another device");
  if (!is_float_or_double(x)) return channel_blocks_by_matmul(x, blocks);
  return product(x, blocks, true);
}

template <typename T>
void gradients_into(const Tensor& grad, const Tensor& x, const Tensor& blocks, bool by_chunks, Tensor& grad_x,
                    Tensor& grad_blocks) {
  if (by_chunks) return backward_into<T>(grad, x, blocks, grad_x, grad_blocks);
  gradient_into<T>(x, grad, blocks.size(1), grad_blocks);
}

std::tuple<Tensor, Tensor> channel_blocks_backward_cpu(const Tensor& grad, const Tensor& x, const Tensor& blocks,
                                                       std::vector<bool> output_mask) {
  check_channel_blocks_backward(grad, x, blocks, output_mask);
  STD_TORCH_CHECK(x.is_cpu(), "orthoft.ops.channel_blocks_backward: the CPU kernel got x on another device");
  if (!is_float_or_double(x)) return channel_blocks_backward_by_matmul(grad, x, blocks, output_mask);
  const bool need_x = output_mask[0];
  const Tensor no_grad_x = torch::stable::new_empty(x, {0});
  if (!output_mask[1]) {
    return {need_x ? product(grad, blocks, false) : no_grad_x, torch::stable::new_empty(blocks, {0})};
  }
  const Tensor in = torch::stable::contiguous(x);
  const Tensor g = torch::stable::contiguous(grad);
  const Tensor w = torch::stable::contiguous(blocks);
  // Chunk by chunk where there are chunks enough for every thread.
  const bool by_chunks = need_x && w.size(0) >= 2 * static_cast<int64_t>(torch::stable::get_num_threads());
  Tensor grad_x = by_chunks ? new_tensor(g, shape(g)) : (need_x ? product(g, w, false) : no_grad_x);
  Tensor grad_blocks = new_tensor(w, shape(w));
  ORTHOFT_DISPATCH_FLOAT_DOUBLE(in.scalar_type(), "orthoft_channel_blocks_backward_cpu",
                                [&] { gradients_into<scalar_t>(g, in, w, by_chunks, grad_x, grad_blocks); });
  return {grad_x, grad_blocks};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(orthoft, CPU, m) {
  m.impl("channel_blocks", TORCH_BOX(&channel_blocks_cpu));
  m.impl("channel_blocks_backward", TORCH_BOX(&channel_blocks_backward_cpu));
}

}  // namespace orthoft
