// What every orthoft CUDA kernel shares: the entry into a kernel call (device guard and torch's current
// stream, through the stable C shim), one launch helper, compile-time constant dispatch and 16-byte packs.
#pragma once

#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>  // aoti_torch_get_current_cuda_stream (USE_CUDA)
#include <torch/csrc/stable/accelerator.h>

#include <type_traits>
#include <utility>

#include "common.h"

#define ORTHOFT_CUDA_CHECK(expr)                                                                  \
  do {                                                                                            \
    const cudaError_t orthoft_error = (expr);                                                     \
    STD_TORCH_CHECK(orthoft_error == cudaSuccess, "CUDA error: ", cudaGetErrorString(orthoft_error)); \
  } while (0)

namespace orthoft {
namespace cuda {

// For the lifetime of a kernel call: makes t's device current and holds torch's current stream on it.
class DeviceScope {
 public:
  explicit DeviceScope(const Tensor& t) : guard_(t.get_device_index()) {
    void* stream = nullptr;
    STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
    stream_ = static_cast<cudaStream_t>(stream);
  }
  cudaStream_t stream() const { return stream_; }

 private:
  torch::stable::accelerator::DeviceGuard guard_;
  cudaStream_t stream_;
};

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int device_attribute(cudaDeviceAttr attr) {
  int device = 0;
  int value = 0;
  ORTHOFT_CUDA_CHECK(cudaGetDevice(&device));
  ORTHOFT_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

// Most dynamic shared memory one block of the current device may opt into.
inline int64_t max_dynamic_smem() { return device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin); }

// Blocks asking for more than the default 48 KB of dynamic shared memory must opt in first.
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, int64_t bytes) {
  if (bytes > 48 * 1024) {
    ORTHOFT_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

// kernel<<<grid, block, smem, stream>>>(args...), opted into its shared memory and checked.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, int64_t smem, cudaStream_t stream, Args&&... args) {
  allow_dynamic_smem(kernel, smem);
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  ORTHOFT_CUDA_CHECK(cudaGetLastError());
}

// Calls f(std::integral_constant<int, V>{}) for the V of Values equal to value; false if there is none.
template <int... Values, typename F>
bool dispatch_constant(int64_t value, F&& f) {
  bool done = false;
  ((!done && value == Values ? (done = true, f(std::integral_constant<int, Values>{}), 0) : 0), ...);
  return done;
}

// N values moved as one aligned access of sizeof(T) * N bytes (a power of two up to 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T val[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

}  // namespace cuda
}  // namespace orthoft
