// The instruction set a CPU kernel runs with, chosen once per process: the widest the CPU offers among
// AVX-512, AVX2+FMA and the baseline, capped by ATEN_CPU_CAPABILITY ("default", "avx2", "avx512") as
// torch's own kernels are. A kernel is a generic lambda taking an IsaTag, marked ORTHOFT_INLINE_LAMBDA;
// run_for_cpu compiles it once per instruction set and calls the one chosen.
#pragma once

#include <cstdint>

namespace orthoft {

enum class Isa { kBaseline, kAvx2, kAvx512 };

template <Isa I>
struct IsaTag {
  static constexpr Isa isa = I;
};

// Bytes of the vectors a kernel uses: the instruction set's registers (the baseline's are SSE2's or
// NEON's 16; wider generic vectors there are split into scalars, not into pairs of registers).
template <Isa I>
constexpr int64_t kVectorBytes = I == Isa::kAvx512 ? 64 : (I == Isa::kAvx2 ? 32 : 16);

Isa cpu_isa();

#if defined(__GNUC__) && defined(__x86_64__)
#define ORTHOFT_ALWAYS_INLINE inline __attribute__((always_inline))
#define ORTHOFT_INLINE_LAMBDA __attribute__((always_inline))
#define ORTHOFT_HAVE_X86_PATHS 1

template <typename Kernel>
__attribute__((target("avx512f,avx512vl,avx2,fma"))) void run_avx512(const Kernel& kernel) {
  kernel(IsaTag<Isa::kAvx512>{});
}

template <typename Kernel>
__attribute__((target("avx2,fma"))) void run_avx2(const Kernel& kernel) {
  kernel(IsaTag<Isa::kAvx2>{});
}
#else
#define ORTHOFT_ALWAYS_INLINE inline
#define ORTHOFT_INLINE_LAMBDA
#define ORTHOFT_HAVE_X86_PATHS 0
#endif

template <typename Kernel>
void run_for_cpu(const Kernel& kernel) {
#if ORTHOFT_HAVE_X86_PATHS
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return run_avx512(kernel);
    case Isa::kAvx2:
      return run_avx2(kernel);
    case Isa::kBaseline:
      break;
  }
#endif
  kernel(IsaTag<Isa::kBaseline>{});
}

}  // namespace orthoft
