#include "hla/dtype.hpp"

#include <cmath>

#include "hla/tensor.hpp"

namespace hla {

const char* dtype_name(DType d) {
    switch (d) {
        case DType::F32: return "f32";
        case DType::F64: return "f64";
        case DType::BF16: return "bf16";
        case DType::F16: return "f16";
        case DType::I32: return "i32";
        case DType::I64: return "i64";
    }
    return "?";
}

size_t dtype_size(DType d) {
    switch (d) {
        case DType::F32: case DType::I32: return 4;
        case DType::F64: case DType::I64: return 8;
        case DType::BF16: case DType::F16: return 2;
    }
    return 0;
}

const char* device_name(Device d) { return d == Device::CPU ? "cpu" : "cuda"; }

float f16_to_float(f16 x) {
    const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
    const uint32_t exp = (x.bits >> 10) & 0x1f;
    const uint32_t mant = x.bits & 0x3ffu;
    uint32_t u;
    if (exp == 0) {
        // zero or subnormal: value = mant · 2^-24
        float f = std::ldexp(float(mant), -24);
        return sign ? -f : f;
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (mant << 13);
    } else {
        u = sign | ((exp + 112) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

f16 float_to_f16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
    const float a = std::fabs(f);
    if (std::isnan(f)) return f16{uint16_t(sign | 0x7e00u)};
    if (a >= 65520.0f) return f16{uint16_t(sign | 0x7c00u)};  // rounds to infinity
    if (a < 6.103515625e-05f) {
        // subnormal range: round a / 2^-24 to the nearest integer (ties to even via nearbyint)
        const uint16_t m = uint16_t(std::nearbyint(std::ldexp(a, 24)));
        return f16{uint16_t(sign | m)};
    }
    uint32_t exp = ((u >> 23) & 0xff) - 112;
    uint32_t mant = u & 0x7fffffu;
    uint32_t h = (exp << 10) | (mant >> 13);
    const uint32_t rest = mant & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // round to nearest even
    return f16{uint16_t(sign | h)};
}

float round_to_dtype(float x, DType dtype) {
    switch (dtype) {
        case DType::BF16: return bf16_to_float(float_to_bf16(x));
        case DType::F16: return f16_to_float(float_to_f16(x));
        default: return x;
    }
}

}  // namespace hla
