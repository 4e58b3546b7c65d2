// hla bench — what to run: ops, backends, shapes, dtypes, passes, repetitions. Parsed from the
// command line; every bad option is a UsageError (the CLI prints it and exits with code 2).
#pragma once

#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "hla/hla.hpp"

namespace hla::cli {

// A command-line mistake: the message says which option and what was expected. Exit code 2.
class UsageError : public std::runtime_error {
public:
    explicit UsageError(const std::string& message) : std::runtime_error(message) {}
};

enum class Pass : uint8_t { Fwd, FwdBwd, Decode };
const char* pass_name(Pass pass);

// One named cell of the linear family.
struct OpInfo {
    const char* name;
    LinearConfig (*config)();
};
const std::vector<OpInfo>& linear_ops();  // linear_attn … kda, in the family's order
inline constexpr const char* kSoftmaxOpName = "softmax_attn";

struct BenchOptions {
    std::vector<OpInfo> ops;         // linear-family cells
    bool softmax = true;             // softmax_attn: causal flash attention, HQ = HKV = H, D = K
    std::vector<Backend> backends;
    std::vector<DType> dtypes;
    std::vector<Pass> passes;
    std::vector<int64_t> T;          // tokens per sequence (fwd, fwdbwd)
    std::vector<int64_t> B;          // batch for fwd / fwdbwd
    std::vector<int64_t> decode_B;   // sequences per decode call
    int64_t H = 16, HV = 16, K = 128, V = 128;
    int64_t check_heads = 2;   // the error is measured on the first check_heads heads (all with check_full)
    bool check_full = false;
    int threads = 0;           // CPU threads (the pool's size)
    int reps = 0;              // 0: automatic (see bench.cpp)
    int decode_calls = 300;    // timed decode calls (median)
    bool json = false;
    std::string json_out;      // also write the JSON records to this file (table on stdout)
    bool quick = false;
    bool progress = true;
    uint64_t seed = 20240611;
};

// Parses the arguments after "bench". Throws UsageError; returns false when --help was asked (and
// printed).
bool parse_bench_options(const std::vector<std::string>& args, BenchOptions& out);

void print_bench_usage(std::FILE* to);

}  // namespace hla::cli
