"""How the package installs and loads, independently of what the ops compute."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import hla

PYTHON_DIR = Path(__file__).resolve().parents[1]


def test_import_hla_first_in_a_fresh_interpreter():
    # hla must load torch's libraries itself: a user's first import may be hla, not torch.
    result = subprocess.run([sys.executable, "-c", "import hla; print(hla.__version__)"], cwd=PYTHON_DIR,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == hla.__version__


def test_extension_uses_the_shared_cxx_runtime():
    # A private static copy of libstdc++ inside _C (a toolchain that ships only libstdc++.a) crashed the
    # interpreter on the first hla::Error; setup.py links the libstdc++ torch runs with.
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    dynamic = subprocess.run([readelf, "-d", hla._C.__file__], capture_output=True, text=True, check=True).stdout
    needed = [line for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert any("libstdc++.so" in line for line in needed), "\n".join(needed)
