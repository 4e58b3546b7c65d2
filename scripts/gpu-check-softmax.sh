#!/usr/bin/env bash
# hla — one GPU run for the softmax family: build, CPU + CUDA tests, compute-sanitizer on the small
# cases, the benchmark and PyTorch SDPA on the same shapes. Logs go to $OUT (or the build dir); a short
# table is printed last.
# Usage: scripts/gpu-check-softmax.sh [--quick] [--prebuilt] [--profile]
#   --quick     memcheck only (racecheck is the slow one) and 5 timed runs a shape
#   --prebuilt  use the binaries already in $BUILD (built elsewhere and carried): no device build time
#   --profile   ncu --set full on one launch of each kernel in $NCU_KERNELS (default: the forward and
#               the backward) at B=4 T=4096 H=16 D=128
set -u
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build-gpu}
LOG=${OUT:-$BUILD}
QUICK="" PREBUILT="" PROFILE=""
for a in "$@"; do
    case $a in
        --quick) QUICK=--quick ;;
        --prebuilt) PREBUILT=1 ;;
        --profile) PROFILE=1 ;;
        *) echo "unknown option $a"; exit 2 ;;
    esac
done
mkdir -p "$BUILD" "$LOG"
summary=()
note() { summary+=("$1|$2"); }
targets="test_softmax test_softmax_cuda softmax_cuda_bench"

if [ -z "$PREBUILT" ]; then
    echo "== build ($BUILD)"
    cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DHLA_TESTS=ON > "$LOG/softmax.configure.log" 2>&1 \
        || { tail -30 "$LOG/softmax.configure.log"; exit 1; }
    if cmake --build "$BUILD" -j16 --target $targets > "$LOG/softmax.build.log" 2>&1; then
        note build "ok"
    else
        grep -E "error" "$LOG/softmax.build.log" | head -20
        # Another family's CUDA sources must not hide this one's results: build the library from the
        # softmax kernels only (a throwaway edit of this machine's copy).
        sed -i 's#src/core/cuda/\*.cu src/ops/\*/cuda/\*.cu#src/core/cuda/*.cu src/ops/softmax/cuda/*.cu#' CMakeLists.txt
        cmake -S . -B "$BUILD" > /dev/null 2>&1
        cmake --build "$BUILD" -j16 --target $targets > "$LOG/softmax.build2.log" 2>&1 \
            || { grep -E "error" "$LOG/softmax.build2.log" | head -30; tail -20 "$LOG/softmax.build2.log"; exit 1; }
        note build "full build failed; softmax-only CUDA build ok"
    fi
else
    note build "prebuilt binaries in $BUILD"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true

echo "== tests"
for t in test_softmax test_softmax_cuda; do
    [ -x "$BUILD/$t" ] || { note "$t" "not built"; continue; }
    if "$BUILD/$t" > "$LOG/$t.log" 2>&1; then
        note "$t" "$(grep -E '^\[  PASSED' "$LOG/$t.log")"
    else
        grep -E "Failure|rel_rms|FAILED|error" "$LOG/$t.log" | head -60
        note "$t" "FAILED: $(grep -cE '^\[  FAILED' "$LOG/$t.log") lines"
    fi
done

echo "== compute-sanitizer on the CUDA tests (small cases)"
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
tools=${SANITIZERS:-memcheck racecheck}
[ -n "$QUICK" ] && tools="memcheck"
if [ -x "$CS" ]; then
    for tool in $tools; do
        # Every CUDA softmax test under both tools by default: the forward, backward and decode
        # kernels all share tiles between warps through shared memory ($SANITIZER_FILTER narrows it).
        # A time cap keeps a slow tool from eating the call; a capped run still lists what it saw.
        t0=$SECONDS
        if timeout "${SANITIZER_TIMEOUT:-240}" "$CS" --tool $tool --error-exitcode 9 "$BUILD/test_softmax_cuda" \
            --gtest_filter="${SANITIZER_FILTER:-SoftmaxCuda*}" > "$LOG/softmax.$tool.log" 2>&1; then
            note "$tool" "clean ($(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$LOG/softmax.$tool.log" | tail -1)), $((SECONDS - t0)) s"
        else
            grep -E "ERROR|Invalid|hazard|at 0x|Failure" "$LOG/softmax.$tool.log" | head -15
            note "$tool" "ERRORS (see softmax.$tool.log)"
        fi
    done
fi

if [ -n "$PROFILE" ]; then
    echo "== ncu (the first launch of each kernel in \$NCU_KERNELS)"
    : > "$LOG/softmax.ncu.log"
    for k in ${NCU_KERNELS:-softmax_bwd_kernel softmax_fwd_kernel}; do
        ncu --set full --import-source no -k "regex:$k" --launch-count 1 \
            --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
            "$BUILD/softmax_cuda_bench" --profile >> "$LOG/softmax.ncu.log" 2>&1 || note ncu "FAILED ($k)"
    done
    grep -E "softmax_(fwd|bwd)_kernel|Duration|Registers Per|Achieved Occupancy|Issue Slots Busy|Compute \(SM\) Throughput|Memory Throughput|L1/TEX Hit|Shared Memory|Executed Ipc A|local" "$LOG/softmax.ncu.log" | head -60
fi

echo "== benchmark"
"$BUILD/softmax_cuda_bench" $QUICK > "$LOG/softmax.bench.log" 2>&1 || note bench "FAILED"
python3 bench/softmax_sdpa.py $QUICK > "$LOG/softmax.sdpa.log" 2>&1 || note sdpa "FAILED: $(tail -1 "$LOG/softmax.sdpa.log")"

echo
echo "== summary"
for s in "${summary[@]}"; do printf '%-22s %s\n' "${s%%|*}" "${s#*|}"; done
echo
cat "$LOG/softmax.bench.log"
echo
cat "$LOG/softmax.sdpa.log"
