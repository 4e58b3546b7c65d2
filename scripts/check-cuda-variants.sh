#!/usr/bin/env bash
# hla — a CUDA build with fewer variants (CMake HLA_CUDA_LINEAR_DTYPES, HLA_CUDA_SOFTMAX_HEAD_DIMS) must
# still link: every call into a variant-specific kernel has to sit behind the same switch as the kernel.
# (Seen: the tensor-core backward was called, but not compiled, in a build without bf16.) Builds the
# `hla` command for two complementary single-variant configurations; skipped where nvcc is missing.
# Usage: scripts/check-cuda-variants.sh [build dir]   (default: build-variants)
set -eu
cd "$(dirname "$0")/.."
BUILD=${1:-build-variants}
JOBS=${JOBS:-$(nproc)}
if ! command -v nvcc > /dev/null 2>&1 && [ ! -x /usr/local/cuda/bin/nvcc ] && [ ! -x /usr/bin/nvcc ]; then
    echo "check-cuda-variants: nvcc not found, skipped"
    exit 0
fi
mkdir -p "$BUILD"
for variant in "f32 64" "bf16 128"; do
    set -- $variant
    echo "check-cuda-variants: linear dtypes $1, softmax head dims $2"
    cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DHLA_CUDA=ON -DHLA_TESTS=OFF \
        -DHLA_CUDA_LINEAR_DTYPES="$1" -DHLA_CUDA_SOFTMAX_HEAD_DIMS="$2" > "$BUILD/check-variants.configure.log" 2>&1 \
        || { cat "$BUILD/check-variants.configure.log"; exit 1; }
    cmake --build "$BUILD" --target hla_cli -j "$JOBS" > "$BUILD/check-variants.build.log" 2>&1 \
        || { grep -E "error|undefined" "$BUILD/check-variants.build.log" | head -20; echo "check-cuda-variants: FAILED ($1, $2)"; exit 1; }
done
echo "check-cuda-variants: both configurations link"
