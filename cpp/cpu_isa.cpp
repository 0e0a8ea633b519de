// The run-time choice of cpu_isa.h.
#include "cpu_isa.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace orthoft {
namespace {

Isa widest_supported() {
#if ORTHOFT_HAVE_X86_PATHS
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

// ATEN_CPU_CAPABILITY's cap; other values (torch's names for other architectures) cap nothing.
Isa capability_cap() {
  const char* value = std::getenv("ATEN_CPU_CAPABILITY");
  if (value == nullptr) return Isa::kAvx512;
  if (std::strcmp(value, "default") == 0) return Isa::kBaseline;
  if (std::strcmp(value, "avx2") == 0) return Isa::kAvx2;
  return Isa::kAvx512;
}

}  // namespace

Isa cpu_isa() {
  static const Isa isa = std::min(widest_supported(), capability_cap());
  return isa;
}

}  // namespace orthoft
