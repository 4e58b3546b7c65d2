// hla — the command-line tool. For now one command: `hla bench` (see bench.hpp).
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "cli/bench.hpp"
#include "cli/bench_options.hpp"

namespace {

void print_usage(std::FILE* to) {
    std::fputs(
        "usage: hla <command> [options]\n"
        "\n"
        "hla: linear and hybrid attention kernels.\n"
        "\n"
        "Commands:\n"
        "  bench     error against the fp64 reference and speed of every linear-family op\n"
        "            (hla bench --help for its options)\n"
        "\n"
        "Options:\n"
        "  -h, --help     this text\n"
        "  --version      the version\n",
        to);
}

}  // namespace

int main(int argc, char** argv) {
    using namespace hla::cli;
    if (argc < 2) {
        print_usage(stderr);
        return 2;
    }
    const std::string command = argv[1];
    if (command == "-h" || command == "--help" || command == "help") {
        print_usage(stdout);
        return 0;
    }
    if (command == "--version") {
        std::printf("hla 0.1.0\n");
        return 0;
    }
    if (command != "bench") {
        std::fprintf(stderr, "hla: unknown command '%s' (see hla --help)\n", command.c_str());
        return 2;
    }
    BenchOptions options;
    try {
        if (!parse_bench_options(std::vector<std::string>(argv + 2, argv + argc), options)) return 0;
    } catch (const UsageError& e) {
        std::fprintf(stderr, "hla bench: %s\n", e.what());
        return 2;
    }
    try {
        return run_bench(options);
    } catch (const UsageError& e) {
        std::fprintf(stderr, "hla bench: %s\n", e.what());
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "hla bench: %s\n", e.what());
        return 1;
    }
}
