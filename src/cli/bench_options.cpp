#include "cli/bench_options.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <map>
#include <set>

namespace hla::cli {

const char* pass_name(Pass pass) {
    switch (pass) {
        case Pass::Fwd: return "fwd";
        case Pass::FwdBwd: return "fwdbwd";
        case Pass::Decode: return "decode";
    }
    return "?";
}

const std::vector<OpInfo>& linear_ops() {
    static const std::vector<OpInfo> ops = {
        {"linear_attn", linear_attn_config},   {"lightning_attn", lightning_attn_config},
        {"simple_gla", simple_gla_config},     {"gla", gla_config},
        {"delta_rule", delta_rule_config},     {"gated_delta_rule", gated_delta_rule_config},
        {"kda", kda_config},
    };
    return ops;
}

void print_bench_usage(std::FILE* to) {
    std::fputs(
        "usage: hla bench [options]\n"
        "\n"
        "For every linear-family op, causal softmax attention and every backend on this machine: the\n"
        "error against the fp64 reference and the speed (forward, forward+backward, per-token decode),\n"
        "as a table or JSON.\n"
        "\n"
        "Selection:\n"
        "  --ops LIST          comma-separated (default: all): linear_attn, lightning_attn, simple_gla,\n"
        "                      gla, delta_rule, gated_delta_rule, kda, softmax_attn (causal flash attention\n"
        "                      with HQ = HKV = H and head dim D = K; its decode rows attend over a cache of\n"
        "                      max(--T) tokens, shown in the T column; CUDA runs it for bf16/f16 and\n"
        "                      D in {64, 128, 256})\n"
        "  --backends LIST     cpu, cuda, reference (default: cpu, plus cuda when a GPU is usable; the\n"
        "                      fp64 reference is slow and runs only when named)\n"
        "  --passes LIST       fwd, fwdbwd, decode (default: all three)\n"
        "  --dtype LIST        input dtypes: f32, bf16, f16 (default: f32)\n"
        "Shapes:\n"
        "  --T LIST            tokens per sequence for fwd/fwdbwd (default: 1024,4096)\n"
        "  --B LIST            batch (default: 1 for fwd/fwdbwd, 1,8 for decode)\n"
        "  --H N               query/key heads (default: 16)\n"
        "  --HV N              value heads, a multiple of H (default: H)\n"
        "  --K N, --V N        key / value head dims (default: 128)\n"
        "Measurement:\n"
        "  --threads N         CPU threads (default: HLA_NUM_THREADS, else every core)\n"
        "  --reps N            timed repetitions, the median is reported (default: 5 at B*T*HV = 4096*16,\n"
        "                      more for smaller problems, fewer when a run would exceed ~2 s)\n"
        "  --decode-calls N    timed decode calls, the median is reported (default: 300)\n"
        "  --check-heads N     the error is measured on the first N heads, same T (default: 2)\n"
        "  --check-full        measure the error on the full shape (the fp64 reference is slow)\n"
        "  --seed N            input seed (default: 20240611)\n"
        "Output:\n"
        "  --json              a JSON array of records on stdout instead of the table\n"
        "  --json-out FILE     also write the JSON records to FILE (the table still goes to stdout)\n"
        "  --no-progress       no progress lines on stderr\n"
        "  --quick             tiny shapes (T=100,256 H=2 K=V=64, error on the full shape): a smoke test\n"
        "  -h, --help          this text\n"
        "\n"
        "Columns: err on = the shape the error was measured on; rel_err = ||out - ref||/||ref|| (for\n"
        "fwdbwd the largest over dq, dk, dv, dg, dbeta); GFLOP/s = the chunked algorithm's own flop count\n"
        "per second; %peak = against the fp32 FMA peak measured at start (CPU) or the H100 roofline\n"
        "floor (CUDA); x loop = speed-up over a plain fp32 token-by-token loop timed in the same run.\n",
        to);
}

static std::vector<std::string> split_list(const std::string& option, const std::string& value) {
    std::vector<std::string> items;
    size_t start = 0;
    while (start <= value.size()) {
        size_t comma = value.find(',', start);
        if (comma == std::string::npos) comma = value.size();
        std::string item = value.substr(start, comma - start);
        if (item.empty()) throw UsageError(option + ": expected a comma-separated list, got '" + value + "'");
        items.push_back(item);
        start = comma + 1;
    }
    return items;
}

static int64_t parse_int(const std::string& option, const std::string& text, int64_t lo, int64_t hi) {
    char* end = nullptr;
    errno = 0;
    const long long x = std::strtoll(text.c_str(), &end, 10);
    if (text.empty() || *end != '\0' || errno == ERANGE)
        throw UsageError(option + ": expected an integer, got '" + text + "'");
    if (x < lo || x > hi)
        throw UsageError(option + ": expected a value in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                         "], got " + text);
    return x;
}

static std::vector<int64_t> parse_int_list(const std::string& option, const std::string& value, int64_t lo,
                                           int64_t hi) {
    std::vector<int64_t> out;
    for (const std::string& item : split_list(option, value)) out.push_back(parse_int(option, item, lo, hi));
    return out;
}

// Looks each name up in `table`; an unknown name lists the valid ones.
template <class T>
static std::vector<T> parse_names(const std::string& option, const std::string& value,
                                  const std::vector<std::pair<std::string, T>>& table) {
    std::vector<T> out;
    for (const std::string& item : split_list(option, value)) {
        auto it = std::find_if(table.begin(), table.end(), [&](const auto& e) { return e.first == item; });
        if (it == table.end()) {
            std::string valid;
            for (const auto& e : table) valid += (valid.empty() ? "" : ", ") + e.first;
            throw UsageError(option + ": unknown value '" + item + "' (expected one of: " + valid + ")");
        }
        out.push_back(it->second);
    }
    return out;
}

bool parse_bench_options(const std::vector<std::string>& args, BenchOptions& o) {
    std::set<std::string> given;
    std::map<std::string, std::string> values;
    static const std::set<std::string> flags = {"--json", "--quick", "--check-full", "--no-progress"};
    static const std::set<std::string> valued = {"--ops",     "--backends", "--passes",       "--dtype",
                                                 "--T",       "--B",        "--H",            "--HV",
                                                 "--K",       "--V",        "--threads",      "--reps",
                                                 "--seed",    "--decode-calls", "--check-heads",
                                                 "--json-out"};
    for (size_t i = 0; i < args.size(); ++i) {
        std::string a = args[i];
        if (a == "-h" || a == "--help") {
            print_bench_usage(stdout);
            return false;
        }
        std::string value;
        bool has_value = false;
        if (const size_t eq = a.find('='); a.rfind("--", 0) == 0 && eq != std::string::npos) {
            value = a.substr(eq + 1);
            a = a.substr(0, eq);
            has_value = true;
        }
        if (flags.count(a)) {
            if (has_value) throw UsageError(a + ": takes no value, got '" + value + "'");
            given.insert(a);
        } else if (valued.count(a)) {
            if (!has_value) {
                if (i + 1 >= args.size()) throw UsageError(a + ": expected a value after it");
                value = args[++i];
            }
            given.insert(a);
            values[a] = value;
        } else {
            throw UsageError("unknown option '" + args[i] + "' (see hla bench --help)");
        }
    }

    o.quick = given.count("--quick") > 0;
    o.json = given.count("--json") > 0;
    o.check_full = given.count("--check-full") > 0;
    o.progress = given.count("--no-progress") == 0;
    if (o.quick) {
        // T = 100 leaves a partial chunk, 256 is four full chunks of 64.
        o.T = {100, 256};
        o.H = o.HV = 2;
        // 64: the smallest head dim every backend runs (CUDA linear: K, V in {64, 128}; CUDA softmax: 64, 128, 256).
        o.K = o.V = 64;
        o.decode_B = {1, 3};
        o.reps = 3;
        o.decode_calls = 50;
        o.check_full = true;
    } else {
        o.T = {1024, 4096};
        o.decode_B = {1, 8};
    }
    o.B = {1};

    std::vector<std::pair<std::string, OpInfo>> op_table;
    for (const OpInfo& op : linear_ops()) op_table.push_back({op.name, op});
    op_table.push_back({kSoftmaxOpName, OpInfo{kSoftmaxOpName, nullptr}});  // the softmax family: no LinearConfig
    if (values.count("--ops")) {
        o.ops = parse_names("--ops", values["--ops"], op_table);
        o.softmax = std::any_of(o.ops.begin(), o.ops.end(), [](const OpInfo& op) { return op.config == nullptr; });
        o.ops.erase(std::remove_if(o.ops.begin(), o.ops.end(), [](const OpInfo& op) { return op.config == nullptr; }),
                    o.ops.end());
    } else {
        o.ops = linear_ops();
        o.softmax = true;
    }

    const std::vector<std::pair<std::string, Backend>> backend_table = {
        {"cpu", Backend::Cpu}, {"cuda", Backend::Cuda}, {"reference", Backend::Reference}};
    if (values.count("--backends")) {
        o.backends = parse_names("--backends", values["--backends"], backend_table);
        for (Backend b : o.backends)
            if (b == Backend::Cuda && !cuda_available())
                throw UsageError("--backends: cuda is not available here (" +
                                 std::string(
#ifdef HLA_WITH_CUDA
                                     "no usable CUDA device"
#else
                                     "this build of hla has no CUDA support"
#endif
                                     ) +
                                 ")");
    } else {
        o.backends = {Backend::Cpu};
        if (cuda_available()) o.backends.push_back(Backend::Cuda);
    }

    const std::vector<std::pair<std::string, Pass>> pass_table = {
        {"fwd", Pass::Fwd}, {"fwdbwd", Pass::FwdBwd}, {"decode", Pass::Decode}};
    o.passes = values.count("--passes") ? parse_names("--passes", values["--passes"], pass_table)
                                        : std::vector<Pass>{Pass::Fwd, Pass::FwdBwd, Pass::Decode};

    const std::vector<std::pair<std::string, DType>> dtype_table = {
        {"f32", DType::F32}, {"bf16", DType::BF16}, {"f16", DType::F16}};
    o.dtypes = values.count("--dtype") ? parse_names("--dtype", values["--dtype"], dtype_table)
                                       : std::vector<DType>{DType::F32};

    constexpr int64_t kMaxDim = 1 << 16;
    if (values.count("--T")) o.T = parse_int_list("--T", values["--T"], 1, int64_t(1) << 24);
    if (values.count("--B")) o.B = o.decode_B = parse_int_list("--B", values["--B"], 1, 1 << 16);
    if (values.count("--H")) o.H = o.HV = parse_int("--H", values["--H"], 1, kMaxDim);
    if (values.count("--HV")) o.HV = parse_int("--HV", values["--HV"], 1, kMaxDim);
    if (o.HV % o.H != 0)
        throw UsageError("--HV: the value heads must be a multiple of H = " + std::to_string(o.H) + ", got " +
                         std::to_string(o.HV));
    if (values.count("--K")) o.K = parse_int("--K", values["--K"], 1, kMaxDim);
    if (values.count("--V")) o.V = parse_int("--V", values["--V"], 1, kMaxDim);
    if (values.count("--threads")) o.threads = int(parse_int("--threads", values["--threads"], 1, 4096));
    if (values.count("--reps")) o.reps = int(parse_int("--reps", values["--reps"], 1, 1000000));
    if (values.count("--decode-calls"))
        o.decode_calls = int(parse_int("--decode-calls", values["--decode-calls"], 1, 100000000));
    if (values.count("--check-heads")) o.check_heads = parse_int("--check-heads", values["--check-heads"], 1, kMaxDim);
    if (values.count("--json-out")) {
        o.json_out = values["--json-out"];
        if (o.json_out.empty()) throw UsageError("--json-out: expected a file name");
    }
    if (values.count("--seed")) o.seed = uint64_t(parse_int("--seed", values["--seed"], 0, INT64_MAX));
    return true;
}

}  // namespace hla::cli
