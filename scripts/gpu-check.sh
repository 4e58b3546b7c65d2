#!/usr/bin/env bash
# hla — one run on a GPU machine: build, the CUDA tests, compute-sanitizer (memcheck, racecheck and
# initcheck) on small forward, decode and backward tests, the linear-family benchmark, and PyTorch SDPA (flash-linear-attention with --fla).
# Logs go to $OUT (or the build dir); a short summary table is printed last.
# Usage: scripts/gpu-check.sh [--quick] [--profile] [--fla]
#   --quick     fewer timed iterations in the benchmark
#   --fla       also flash-linear-attention's ops (bench/fla_peers.py; ~10 minutes of Triton autotuning),
#               from third_party_peers/ (git-ignored: copy fla/ and einops/ there and carry the folder)
#   --profile   also ncu --set full on the first launch of each kernel in $NCU_KERNELS (default: the
#               forward's prepare and scan, the dS scan and both tensor-core backward kernels) in the
#               forward + backward rows of the benchmark (B=4 T=4096 H=16 K=V=128, bf16)
set -u
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build-gpu}
LOG=${OUT:-$BUILD}
QUICK="" PROFILE="" FLA=""
for a in "$@"; do
    case $a in
        --quick) QUICK=--quick ;;
        --profile) PROFILE=1 ;;
        --fla) FLA=1 ;;
        *) echo "unknown option $a"; exit 2 ;;
    esac
done
mkdir -p "$LOG"
summary=()
note() { summary+=("$1|$2"); }

echo "== build ($BUILD)"
mkdir -p "$BUILD"
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DHLA_TESTS=ON > "$LOG/gpu-check.configure.log" 2>&1 || { tail -30 "$LOG/gpu-check.configure.log"; exit 1; }
if cmake --build "$BUILD" -j16 > "$LOG/gpu-check.build.log" 2>&1; then
    note build "all targets ok"
else
    # Another family's breakage must not hide this one's results: build what this script needs.
    grep -E "error" "$LOG/gpu-check.build.log" | head -20
    cmake --build "$BUILD" -j16 --target test_linear_cuda linear_cuda_bench > "$LOG/gpu-check.build2.log" 2>&1 \
        || { tail -40 "$LOG/gpu-check.build2.log"; exit 1; }
    note build "full build FAILED (see $LOG/gpu-check.build.log); CUDA targets ok"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

echo "== CUDA tests (linear family)"
if ctest --test-dir "$BUILD" -R 'LinearCuda' --output-on-failure --timeout 900 > "$LOG/gpu-check.ctest.log" 2>&1; then
    note "ctest LinearCuda" "$(grep -E 'tests passed' "$LOG/gpu-check.ctest.log")"
else
    grep -E "Failure|error vs|FAILED|Failed|Expected" "$LOG/gpu-check.ctest.log" | head -60
    note "ctest LinearCuda" "FAILED: $(grep -E 'tests passed' "$LOG/gpu-check.ctest.log")"
fi
tail -5 "$LOG/gpu-check.ctest.log"

echo "== compute-sanitizer"
# initcheck: the workspaces come from a stream-ordered pool kept between calls, so a read of scratch
# before it is written would see an earlier call's data (zeros in a fresh process, which is all a
# single test sees).
SMALL='LinearCuda.SingleToken:LinearCuda.VarlenWithEmptySequences:LinearCuda.DecodeSkipsNegativeSlots'
SMALL+=':LinearCuda.BackwardSingleToken:LinearCuda.BackwardVarlenWithEmptySequences'
SMALL+=':LinearCuda.DecodeCapturedInACudaGraphOnAUserStream'
# sequences of more chunks than a scan has operand stages: every stage refilled, forward and backward
SMALL+=':LinearCuda.NonFiniteTokensStayInTheirSequence:LinearCuda.BackwardManyChunks'
for tool in memcheck racecheck initcheck; do
    if command -v compute-sanitizer > /dev/null 2>&1 || [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
        CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
        "$CS" --tool $tool --error-exitcode 9 "$BUILD/test_linear_cuda" --gtest_filter="$SMALL" > "$LOG/gpu-check.$tool.log" 2>&1
        rc=$?
        tail -3 "$LOG/gpu-check.$tool.log"
        note "$tool" "$([ $rc = 0 ] && echo clean || echo "rc=$rc: $(grep -m1 -E 'ERROR|Error|hazard' "$LOG/gpu-check.$tool.log")")"
    else
        note "$tool" "compute-sanitizer not found"
    fi
done

if [ -n "$PROFILE" ]; then
    echo "== ncu (the first launch of each kernel in \$NCU_KERNELS)"
    : > "$LOG/gpu-check.ncu.log"
    for k in ${NCU_KERNELS:-chunk_prepare_mma_kernel chunk_scan_kernel chunk_dstate_kernel chunk_bwd_mma_kernel chunk_bwd_vec_kernel}; do
        ncu --set full --import-source no -k "regex:$k" --launch-count 1 \
            --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
            "$BUILD/linear_cuda_bench" --quick --fwdbwd >> "$LOG/gpu-check.ncu.log" 2>&1 || note ncu "FAILED ($k)"
    done
    grep -E "chunk_[a-z_]*kernel|Duration|Registers Per|Achieved Occupancy|Issue Slots Busy|Compute \(SM\) Throughput|Memory Throughput|Executed Ipc A|local" "$LOG/gpu-check.ncu.log" | head -80
fi

echo "== benchmark"
"$BUILD/linear_cuda_bench" $QUICK | tee "$LOG/gpu-check.bench.log"

echo "== peers (same process per framework)"
python3 - <<'PY' 2>&1 | tee "$LOG/gpu-check.peers.log" || true
import sys
sys.path.insert(0, "bench")
from cuda_events import median_ms
try:
    import torch
    import torch.nn.functional as F
except Exception as e:
    print(f"peers: torch not importable ({type(e).__name__}): skipped")
    raise SystemExit(0)
for B, T in [(4, 4096), (1, 16384)]:
    q, k, v = (torch.randn(B, 16, T, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), 20)
    print(f"peer sdpa_flash B={B} T={T}: {ms:.4f} ms")
PY
if [ -n "$FLA" ]; then
    PYTHONPATH=$PWD/third_party_peers${PYTHONPATH:+:$PYTHONPATH} python3 bench/fla_peers.py $QUICK 2>&1 | tee -a "$LOG/gpu-check.peers.log"
fi

echo
echo "== summary"
for s in "${summary[@]}"; do printf '%-16s %s\n' "${s%%|*}" "${s#*|}"; done
grep -E "^\| " "$LOG/gpu-check.bench.log" || true
grep -E "^peer " "$LOG/gpu-check.peers.log" || true
