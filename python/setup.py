"""Builds `hla`, the PyTorch extension over libhla, against whatever torch is installed.

    pip install --no-build-isolation ./python        # builds libhla with CMake, then the extension
    HLA_LIBRARY=$PWD/build/libhla.a pip install --no-build-isolation ./python   # links an existing libhla

--no-build-isolation: the extension must be compiled against the torch already installed, which an
isolated build environment would not see.

libhla is built from the checkout this file sits in (HLA_ROOT overrides the path). When torch has
CUDA and nvcc is found, libhla gets its CUDA backend; HLA_CUDA=ON/OFF forces the choice. HLA_CMAKE_ARGS
adds options to libhla's configure, e.g. fewer CUDA variants for a faster build:

    HLA_CMAKE_ARGS="-DHLA_CUDA_LINEAR_DTYPES=bf16 -DHLA_CUDA_SOFTMAX_HEAD_DIMS=128" pip install ...
"""
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension
import torch

HERE = Path(__file__).resolve().parent
ROOT = Path(os.environ.get("HLA_ROOT", HERE.parent)).resolve()


def _cuda_home():
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and Path(candidate, "bin", "nvcc").exists():
            return Path(candidate)
    nvcc = shutil.which("nvcc")
    return Path(nvcc).resolve().parent.parent if nvcc else None


def _build_libhla():
    """Configures and builds the static libhla with the C++ ABI of this torch; returns its path."""
    build = HERE / "build" / "libhla"
    want_cuda = os.environ.get("HLA_CUDA")
    if want_cuda is None:
        want_cuda = "ON" if (torch.version.cuda and _cuda_home()) else "OFF"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    configure = [
        "cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DHLA_TESTS=OFF",
        f"-DHLA_CUDA={want_cuda}", f"-DCMAKE_CXX_FLAGS=-D_GLIBCXX_USE_CXX11_ABI={abi}",
        # nvcc's host compiler needs the same ABI: a template such as hla::detail::fail instantiated in a
        # .cu file with the other ABI is an ODR clash (seen: a crash formatting every CUDA-side error).
        f"-DCMAKE_CUDA_FLAGS=-Xcompiler=-D_GLIBCXX_USE_CXX11_ABI={abi}",
    ]
    if want_cuda == "ON" and _cuda_home():
        configure.append(f"-DCMAKE_CUDA_COMPILER={_cuda_home() / 'bin' / 'nvcc'}")
    configure += shlex.split(os.environ.get("HLA_CMAKE_ARGS", ""))
    subprocess.check_call(configure)
    jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
    subprocess.check_call(["cmake", "--build", str(build), "--target", "hla", "-j", jobs])
    return build / "libhla.a"


def _uses_cuda_runtime(lib):
    """Whether the static library calls the CUDA runtime (it was built with HLA_CUDA)."""
    try:
        symbols = subprocess.run(["nm", "-u", str(lib)], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return False
    return any(line.split()[-1].startswith("cuda") for line in symbols.splitlines() if line.strip())


def _uses_cxx11_abi(lib):
    """Whether the static library was compiled with libstdc++'s new (C++11) ABI, read off a function
    that returns std::string (hla::TensorView::shape_string carries [abi:cxx11] under the new ABI).
    None when that cannot be told."""
    try:
        symbols = subprocess.run(["nm", "-C", "--defined-only", str(lib)], capture_output=True, text=True,
                                 check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    lines = [line for line in symbols.splitlines() if "TensorView::shape_string" in line]
    return None if not lines else any("[abi:cxx11]" in line for line in lines)


def _loaded_libstdcxx():
    """Path of the libstdc++ this torch runs with (the one mapped into this very process), or None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "/libstdc++.so" in path:
                    return path
    except OSError:
        pass
    return None


class BuildHla(BuildExtension):
    """Finds or builds libhla only when the extension is really built (not for egg_info & co)."""

    def build_extensions(self):
        lib = os.environ.get("HLA_LIBRARY")
        lib = Path(lib).resolve() if lib else _build_libhla()
        if not lib.exists():
            sys.exit(f"hla setup: libhla not found at {lib}")
        abi = bool(torch._C._GLIBCXX_USE_CXX11_ABI)
        if _uses_cxx11_abi(lib) not in (None, abi):
            # mixing the two libstdc++ ABIs breaks hla::Error messages and any std::string crossing
            sys.exit(f"hla setup: {lib} was built with _GLIBCXX_USE_CXX11_ABI={int(not abi)} but this torch uses "
                     f"{int(abi)}; unset HLA_LIBRARY so setup.py builds a matching libhla")
        for ext in self.extensions:
            ext.extra_objects.append(str(lib))
            # relink when libhla or its public headers change (setuptools only watches `depends`)
            ext.depends += [str(lib)] + [str(h) for h in sorted((ROOT / "include" / "hla").glob("*.hpp"))]
            if _uses_cuda_runtime(lib):
                # libhla's CUDA backend links the static CUDA runtime (CMake: CUDA::cudart_static).
                cuda = _cuda_home()
                if cuda is None:
                    sys.exit("hla setup: libhla was built with CUDA but no CUDA toolkit was found (set CUDA_HOME)")
                ext.extra_objects.append(str(cuda / "lib64" / "libcudart_static.a"))
                ext.libraries += ["dl", "rt"]
            # Link the C++ runtime that torch itself uses, by path. Some toolchains (seen: the GPU
            # machine's /opt/gcc 13) ship only a static libstdc++ on their link path; the extension then
            # carries a private copy of libstdc++ whose locale and exception state is never set up, and
            # the first hla::Error crashed the interpreter. Named first, the shared library resolves
            # every libstdc++ symbol, so nothing is taken from a static archive.
            libstdcxx = _loaded_libstdcxx()
            if libstdcxx:
                ext.extra_link_args.append(libstdcxx)
        super().build_extensions()


setup(
    name="hla",
    version="0.1.0",
    description="Linear and hybrid attention for PyTorch: flash-linear-attention-compatible ops backed by libhla",
    packages=find_packages(include=["hla", "hla.*"]),
    ext_modules=[
        CppExtension(
            "hla._C",
            ["hla/csrc/binding.cpp"],
            include_dirs=[str(ROOT / "include")],
            # torch 1.13's headers use std::iterator, deprecated in C++17: keep the build log readable
            extra_compile_args=["-O2", "-std=c++17", "-Wno-deprecated-declarations"],
            libraries=["pthread"],
        )
    ],
    cmdclass={"build_ext": BuildHla.with_options(use_ninja=False)},
    python_requires=">=3.9",
    zip_safe=False,
)
