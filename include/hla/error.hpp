// hla — error type shared by every entry point.
//
// Every bad argument (shape, dtype, device, stride, value) is reported as an hla::Error whose
// message names the argument, what was expected and what came, e.g.
//   "gated_delta_rule: k: expected shape [B=2, T=64, H=4, K=32], got [2, 64, 4, 16]".
// The Python layer turns it into ValueError with the same message.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace hla {

class Error : public std::invalid_argument {
public:
    explicit Error(const std::string& message) : std::invalid_argument(message) {}
};

namespace detail {

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
    std::ostringstream os;
    (os << ... << parts);
    throw Error(os.str());
}

}  // namespace detail

// HLA_CHECK(cond, parts...) throws hla::Error built from parts when cond is false.
// Unlike assert it never disappears in release builds.
#define HLA_CHECK(cond, ...)                         \
    do {                                             \
        if (!(cond)) ::hla::detail::fail(__VA_ARGS__); \
    } while (0)

}  // namespace hla
