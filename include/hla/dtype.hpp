// hla — element types and the scalar conversions every backend shares.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace hla {

enum class DType : uint8_t { F32, F64, BF16, F16, I32, I64 };

const char* dtype_name(DType dtype);
size_t dtype_size(DType dtype);
inline bool is_floating(DType d) { return d == DType::F32 || d == DType::F64 || d == DType::BF16 || d == DType::F16; }

// bf16: the upper 16 bits of an IEEE fp32; conversion rounds to nearest even, NaN stays NaN.
struct bf16 {
    uint16_t bits;
};
// fp16: IEEE binary16, converted in software so the library needs no compiler extension.
struct f16 {
    uint16_t bits;
};

inline float bf16_to_float(bf16 x) {
    uint32_t u = uint32_t(x.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline bf16 float_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40)};  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return bf16{uint16_t(u >> 16)};
}

float f16_to_float(f16 x);
f16 float_to_f16(float f);

// Round-trip a float through a storage type: what a value becomes when written in that dtype.
float round_to_dtype(float x, DType dtype);

// Read element i of a buffer of the given dtype as float / double (floating dtypes only).
inline double load_as_double(const void* base, DType dtype, int64_t i) {
    switch (dtype) {
        case DType::F32: return static_cast<const float*>(base)[i];
        case DType::F64: return static_cast<const double*>(base)[i];
        case DType::BF16: return bf16_to_float(static_cast<const bf16*>(base)[i]);
        case DType::F16: return f16_to_float(static_cast<const f16*>(base)[i]);
        case DType::I32: return static_cast<const int32_t*>(base)[i];
        case DType::I64: return double(static_cast<const int64_t*>(base)[i]);
    }
    return 0;
}

inline void store_from_double(void* base, DType dtype, int64_t i, double x) {
    switch (dtype) {
        case DType::F32: static_cast<float*>(base)[i] = float(x); break;
        case DType::F64: static_cast<double*>(base)[i] = x; break;
        case DType::BF16: static_cast<bf16*>(base)[i] = float_to_bf16(float(x)); break;
        case DType::F16: static_cast<f16*>(base)[i] = float_to_f16(float(x)); break;
        case DType::I32: static_cast<int32_t*>(base)[i] = int32_t(x); break;
        case DType::I64: static_cast<int64_t*>(base)[i] = int64_t(x); break;
    }
}

}  // namespace hla
