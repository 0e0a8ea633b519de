// Helpers shared by the CUDA kernels of orthoft.
#pragma once

// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that a toolkit without
// those libraries (a CPU-only CI machine with nvcc) lacks.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

namespace orthoft {
namespace cuda {

// Accumulation type: float for float16/bfloat16/float32, double for double.
template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// N values moved as one aligned access of sizeof(T) * N bytes (a power of two up to 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T val[N];
};

template <int N, typename T>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

inline int device_attribute(cudaDeviceAttr attr) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, c10::cuda::current_device()));
  return value;
}

// Most dynamic shared memory one block of the current device may opt into.
inline int64_t max_dynamic_smem() { return device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin); }

// Blocks asking for more than the default 48 KB of dynamic shared memory must opt in first.
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, int64_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

}  // namespace cuda
}  // namespace orthoft
