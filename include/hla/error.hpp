// hla — error type shared by every entry point.
//
// Every bad argument (shape, dtype, device, stride, value) is reported as an hla::Error whose
// message names the argument, what was expected and what came, e.g.
//   "gated_delta_rule: k: expected shape [B=2, T=64, H=4, K=32], got [2, 64, 4, 16]".
// The Python layer turns it into ValueError with the same message.
#pragma once

#include <charconv>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

namespace hla {

class Error : public std::invalid_argument {
public:
    explicit Error(const std::string& message) : std::invalid_argument(message) {}
};

namespace detail {

// Message parts are appended without iostreams: no locale, no stream state, so building an error
// can never fail for reasons of its own (and the library needs no <sstream> in its headers).
template <class T>
void append_part(std::string& s, const T& x) {
    if constexpr (std::is_same_v<T, bool>) {
        s += x ? "true" : "false";
    } else if constexpr (std::is_same_v<T, char>) {
        s += x;
    } else if constexpr (std::is_integral_v<T> || std::is_enum_v<T>) {
        char buf[24];
        const auto r = std::is_unsigned_v<T> ? std::to_chars(buf, buf + sizeof buf, static_cast<unsigned long long>(x))
                                             : std::to_chars(buf, buf + sizeof buf, static_cast<long long>(x));
        s.append(buf, r.ptr);
    } else if constexpr (std::is_floating_point_v<T>) {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%g", double(x));
        s += buf;
    } else if constexpr (std::is_convertible_v<const T&, const char*>) {  // string literals, C strings
        const char* p = x;
        s += p ? p : "(null)";
    } else {
        static_assert(std::is_convertible_v<const T&, std::string_view>, "hla::detail::fail: unsupported part");
        s += std::string_view(x);
    }
}

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
    std::string message;
    (append_part(message, parts), ...);
    throw Error(message);
}

}  // namespace detail

// HLA_CHECK(cond, parts...) throws hla::Error built from parts when cond is false.
// Unlike assert it never disappears in release builds.
#define HLA_CHECK(cond, ...)                         \
    do {                                             \
        if (!(cond)) ::hla::detail::fail(__VA_ARGS__); \
    } while (0)

}  // namespace hla
