"""hla: linear and hybrid attention for PyTorch, backed by libhla (C++/CUDA).

    hla.ops      flash-linear-attention-compatible ops (chunk_*, fused_recurrent_*) with autograd
    hla.layers   GatedDeltaNet, KimiDeltaAttention, LightningAttention, GatedAttention (nn.Module,
                 Hugging Face parameter names, recurrent / KV caches for generation)
"""
# torch first: _C links libc10 / libtorch by name, and only an imported torch puts them in the process
# (`python -m hla.mqar` or a script whose first import is hla failed with "libc10.so: cannot open").
import torch  # noqa: F401

try:
    from . import _C
except ImportError as e:  # pragma: no cover - only reached by a broken install
    raise ImportError(
        "hla: the compiled extension hla._C could not be loaded; build it against the installed torch "
        "with `pip install --no-build-isolation ./python` from the hla checkout (or "
        "`make python-build`). Original error: " + str(e)) from e

from . import ops  # noqa: E402

__version__ = "0.1.0"


def cuda_available() -> bool:
    """Whether this build of libhla has a usable CUDA backend (and a GPU)."""
    return bool(_C.cuda_available())


def num_threads() -> int:
    """Worker threads libhla's CPU ops use (HLA_NUM_THREADS, else the hardware concurrency)."""
    return int(_C.num_threads())


def set_num_threads(n: int) -> None:
    _C.set_num_threads(int(n))


def __getattr__(name):
    # hla.layers imports lazily: `import hla` stays cheap for users of the ops alone.
    if name == "layers":
        import importlib
        return importlib.import_module(".layers", __name__)
    raise AttributeError(f"module 'hla' has no attribute {name!r}")
