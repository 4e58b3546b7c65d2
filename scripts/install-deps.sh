#!/usr/bin/env bash
# Installs the Debian packages hla needs when they are missing (Debian 12). Idempotent and quiet
# when everything is there already.
set -euo pipefail
packages=(cmake make g++ libgtest-dev)
# the Python package (python/): built and tested against Debian's torch; its C++ headers
# (torch/extension.h) and pybind11 are only recommended by python3-torch, which --no-install-recommends
# leaves out
packages+=(python3-torch libtorch-dev pybind11-dev python3-numpy python3-pytest python3-setuptools python3-dev)
# Debian's torch links the generic libblas: OpenBLAS makes its CPU matmuls ~10x faster (tests, hla.mqar)
packages+=(libopenblas0-pthread)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "hla: installing missing Debian packages: ${missing[*]}"
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
