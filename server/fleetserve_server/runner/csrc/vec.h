// The 16-float vector the CPU kernels of paged_attention.cpp and fused_ops.cpp are written in.
//
// GCC/Clang's portable vector type: one register with AVX-512, several with AVX2/SSE/NEON.
// Element-aligned, so that any row can be loaded. Included by both translation units before
// anything that changes code generation (fused_ops.cpp's fp-contract pragma), so these inline
// functions compile alike in both; runner/paged_attention.py hashes this header into the
// module's cache key with the sources.
#pragma once

#include <cstdint>

namespace fleetserve_vec {

typedef float vfloat __attribute__((vector_size(64), aligned(4)));
typedef float vfloat8 __attribute__((vector_size(32), aligned(4)));
typedef float vfloat4 __attribute__((vector_size(16), aligned(4)));
constexpr int64_t kLanes = 16;

inline vfloat vload(const float* p) { return *reinterpret_cast<const vfloat*>(p); }
inline void vstore(float* p, vfloat v) { *reinterpret_cast<vfloat*>(p) = v; }

// Sum of the 16 lanes as a tree (a chain of 15 scalar adds would be the step's critical path).
inline float hsum(vfloat v) {
  vfloat8 lo, hi;
  __builtin_memcpy(&lo, &v, sizeof lo);
  __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  const vfloat8 s8 = lo + hi;
  vfloat4 a, b;
  __builtin_memcpy(&a, &s8, sizeof a);
  __builtin_memcpy(&b, reinterpret_cast<const char*>(&s8) + sizeof a, sizeof b);
  const vfloat4 s4 = a + b;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

}  // namespace fleetserve_vec
