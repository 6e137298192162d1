// ATen's vector layer at the widest width this build targets, as Inductor's CPU kernels
// use it: a kernel includes "vec.h" first (before any torch header), so
// at::vec::Vectorized<float> is the AVX-512, AVX2, NEON/SVE or portable class that the
// compiler flags (-march=native) allow. One source for every CPU; the register tiles
// below are sized from the vector width so they fit the machine's registers.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && !defined(CPU_CAPABILITY_AVX512)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__) && !defined(CPU_CAPABILITY_AVX512) && \
    !defined(CPU_CAPABILITY_AVX2)
#define CPU_CAPABILITY_AVX2
#endif
#include <ATen/cpu/vec/vec.h>

namespace dynvec {
using Vec = at::vec::Vectorized<float>;
// Floats per vector (16 AVX-512, 8 AVX2 and the portable class, 4 NEON).
constexpr int kW = static_cast<int>(Vec::size());
// Vectors per block of 16 floats (weights are packed in blocks of 16 units).
constexpr int kPerBlock = 16 / kW;
// Blocks of 16 columns per register tile: four with 32 vector registers of 16 floats
// (6 rows x 4 accumulators = 24 registers), one elsewhere (6 x 2 on AVX2's 16
// registers, 6 x 4 on NEON's 32).
constexpr int kTileBlocks = kW == 16 ? 4 : 1;
constexpr int kTileCols = 16 * kTileBlocks;

// The name of the vector class this build uses ("avx512", "avx2", "neon", "default").
inline const char* isa() {
#if defined(CPU_CAPABILITY_AVX512)
  return "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#elif defined(__aarch64__)
  return "neon";
#else
  return "default";
#endif
}
}  // namespace dynvec
