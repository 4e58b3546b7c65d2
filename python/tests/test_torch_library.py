"""torch >= 2.4: the linear ops are torch.library custom ops (fake tensors, autograd registration),
so torch.compile keeps them in one graph. Skipped on older torch (Debian's 1.13 on CI)."""
import pytest
import torch

from hla import ops
from hla.ops import _linear

pytestmark = pytest.mark.skipif(_linear._LIBRARY_FORWARD is None,
                                reason="torch < 2.4 (or HLA_TORCH_LIBRARY=0): plain autograd.Function path")


def _inputs(requires_grad=True):
    gen = torch.Generator().manual_seed(0)
    B, T, H, K, V = 2, 9, 2, 8, 8
    x = dict(q=torch.randn(B, T, H, K, generator=gen), k=torch.randn(B, T, H, K, generator=gen),
             v=torch.randn(B, T, H, V, generator=gen),
             g=torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=gen)),
             beta=torch.rand(B, T, H, generator=gen), initial_state=torch.randn(B, H, K, V, generator=gen))
    return {k: t.requires_grad_(requires_grad) for k, t in x.items()}


def test_opcheck_linear_forward():
    x = _inputs()
    cfg = ops.make_config("scalar", "delta", qk_l2norm=True)
    args = (x["q"], x["k"], x["v"], x["g"], x["beta"], None, None, x["initial_state"], None, *cfg, True)
    torch.library.opcheck(_linear._LIBRARY_FORWARD, args)


def test_compile_fullgraph_matches_eager():
    x = _inputs(requires_grad=False)

    def f(q, k, v, g, beta, h0):
        o, ht = ops.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                           use_qk_l2norm_in_kernel=True)
        return o * 2, ht

    eager = f(*x.values())
    compiled = torch.compile(f, fullgraph=True, backend="eager")(*x.values())
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)
