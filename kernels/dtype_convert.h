// Element conversions between the KV-cache dtypes and float, shared by every kernel and
// its CPU reference (host and device), so both round the same way.
//
// f16: IEEE binary16; bf16: the top half of a binary32; fp8-e4m3: OCP E4M3 "fn"
// (bias 7, no infinities, NaN = S.1111.111, largest finite 448). Float -> narrower
// rounds to nearest, ties to even; NaN stays NaN; f16 overflows to infinity (as
// hardware does); fp8 saturates to +-448 (as __nv_cvt_float_to_fp8 with
// __NV_SATFINITE does), since it has no infinity.
#ifndef KVTIER_KERNELS_DTYPE_CONVERT_H_
#define KVTIER_KERNELS_DTYPE_CONVERT_H_

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/host_device.h"
#include "kvtier/layout.h"

namespace kvtier {

KVTIER_HOST_DEVICE uint32_t FloatBits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
KVTIER_HOST_DEVICE float BitsToFloat(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

KVTIER_HOST_DEVICE float HalfBitsToFloat(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  if (exp == 0) {
    const float v = float(mant) * 5.9604644775390625e-8f;  // mant * 2^-24
    return sign ? -v : v;
  }
  if (exp == 31) return BitsToFloat(sign | 0x7F800000u | (mant << 13));
  return BitsToFloat(sign | ((exp + 112) << 23) | (mant << 13));
}

KVTIER_HOST_DEVICE uint16_t FloatToHalfBits(float f) {
  const uint32_t x = FloatBits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t exp = (x >> 23) & 0xFFu;
  uint32_t mant = x & 0x7FFFFFu;
  if (exp == 0xFF) return uint16_t(sign | 0x7C00u | (mant ? 0x200u : 0u));  // inf, NaN
  const int e = int(exp) - 127 + 15;
  if (e >= 31) return uint16_t(sign | 0x7C00u);  // overflow: infinity
  if (e <= 0) {                                  // a subnormal half, or zero
    if (e < -10) return uint16_t(sign);
    mant |= 0x800000u;
    const int shift = 14 - e;
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return uint16_t(sign | h);
  }
  uint32_t h = sign | (uint32_t(e) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry may reach infinity
  return uint16_t(h);
}

KVTIER_HOST_DEVICE float Bf16BitsToFloat(uint16_t b) { return BitsToFloat(uint32_t(b) << 16); }

KVTIER_HOST_DEVICE uint16_t FloatToBf16Bits(float f) {
  const uint32_t x = FloatBits(f);
  if ((x & 0x7F800000u) == 0x7F800000u && (x & 0x7FFFFFu)) return uint16_t((x >> 16) | 0x40u);
  return uint16_t((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

KVTIER_HOST_DEVICE float Fp8E4M3BitsToFloat(uint8_t v) {
  const bool negative = v & 0x80u;
  const uint32_t exp = (v >> 3) & 0xFu;
  const uint32_t mant = v & 0x7u;
  if (exp == 15 && mant == 7) return BitsToFloat(0x7FC00000u);  // NaN
  float mag;
  if (exp == 0) {
    mag = float(mant) * 0.001953125f;  // mant * 2^-9
  } else {
    mag = ldexpf(1.0f + float(mant) * 0.125f, int(exp) - 7);
  }
  return negative ? -mag : mag;
}

KVTIER_HOST_DEVICE uint8_t FloatToFp8E4M3Bits(float f) {
  const uint8_t sign = (FloatBits(f) >> 24) & 0x80u;
  if (f != f) return uint8_t(sign | 0x7Fu);
  const float a = fabsf(f);
  if (a >= 448.0f) return uint8_t(sign | 0x7Eu);  // saturate
  if (a < 0.015625f) {                            // below 2^-6: subnormal
    const float q = rintf(a * 512.0f);            // units of 2^-9, ties to even
    return uint8_t(sign | uint8_t(q));            // q == 8 is the smallest normal: 0x08
  }
  int e;
  const float m = frexpf(a, &e);  // a = m * 2^e, m in [0.5, 1)
  float q = rintf((m * 2.0f - 1.0f) * 8.0f);
  int exp = e - 1 + 7;
  if (q >= 8.0f) {
    q = 0.0f;
    ++exp;
  }
  if (exp > 15 || (exp == 15 && q >= 7.0f)) return uint8_t(sign | 0x7Eu);
  return uint8_t(sign | uint8_t(exp << 3) | uint8_t(q));
}

// Element `index` of an array of `dtype`, as float.
KVTIER_HOST_DEVICE float LoadAsFloat(const void* base, uint64_t index, DType dtype) {
  switch (dtype) {
    case DType::kF16:
      return HalfBitsToFloat(static_cast<const uint16_t*>(base)[index]);
    case DType::kBF16:
      return Bf16BitsToFloat(static_cast<const uint16_t*>(base)[index]);
    case DType::kF32:
      return static_cast<const float*>(base)[index];
    case DType::kFP8E4M3:
      return Fp8E4M3BitsToFloat(static_cast<const uint8_t*>(base)[index]);
  }
  return 0.0f;
}

KVTIER_HOST_DEVICE void StoreFromFloat(void* base, uint64_t index, DType dtype, float v) {
  switch (dtype) {
    case DType::kF16:
      static_cast<uint16_t*>(base)[index] = FloatToHalfBits(v);
      return;
    case DType::kBF16:
      static_cast<uint16_t*>(base)[index] = FloatToBf16Bits(v);
      return;
    case DType::kF32:
      static_cast<float*>(base)[index] = v;
      return;
    case DType::kFP8E4M3:
      static_cast<uint8_t*>(base)[index] = FloatToFp8E4M3Bits(v);
      return;
  }
}

}  // namespace kvtier

#endif  // KVTIER_KERNELS_DTYPE_CONVERT_H_
