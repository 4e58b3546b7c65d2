#!/usr/bin/env python3
"""flash-linear-attention's chunked ops, timed on the shapes and inputs of linear_cuda_bench.

The peer numbers in TARGETS.md come from another run. This script times the peer in the run that also
times hla, so the two can be compared: the same card, clocks and torch build. flash-linear-attention is
not installed on the device machine; bring its source (and einops') into the git-ignored
third_party_peers/ folder, carry it, and put it on PYTHONPATH (scripts/gpu-check.sh does).

Shapes and inputs follow bench/linear_cuda_bench.cpp: bf16, H = 16, K = V = 128, q, k, v and dO
normal, gates uniform in [-0.5, -0.01] (log space: per-token scalars for simple GLA and Gated DeltaNet,
per-channel for GLA and KDA), β uniform in [0, 1], the delta rules with q/k L2-normalised in the kernel.
Forward: inference mode, final state written, B=4 T=4096 and B=1 T=16384. Forward + backward: B=4
T=4096, every input's gradient. Each op's first call (Triton's compile and autotune) is timed apart and
printed, as that is what a user waits for once a process.

Output lines: "peer fla <op> <what> B=<b> T=<t>: <ms> ms" (median of the timed calls), or a line saying
why an op was skipped. First calls take 0.5-2.5 minutes an op, so the whole script takes ~10 minutes;
--fwd, --fwdbwd and --ops=a,b limit it.
Usage: PYTHONPATH=third_party_peers python3 bench/fla_peers.py [--quick] [--fwd | --fwdbwd] [--ops=chunk_kda,...]
"""

import sys
import time

from cuda_events import median_ms

QUICK = "--quick" in sys.argv
FORWARD = "--fwdbwd" not in sys.argv
FORWARD_BACKWARD = "--fwd" not in sys.argv
ONLY = next((a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--ops=")), None)
H, K, V = 16, 128, 128


def inputs(torch, B, T, vector_gate, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)

    def normal(*shape):
        return torch.randn(*shape, generator=gen, **bf16)

    def uniform(lo, hi, *shape):
        return (torch.rand(*shape, generator=gen, device="cuda") * (hi - lo) + lo).to(torch.bfloat16)

    q, k, v = normal(B, T, H, K), normal(B, T, H, K), normal(B, T, H, V)
    g = uniform(-0.5, -0.01, *((B, T, H, K) if vector_gate else (B, T, H)))
    beta = uniform(0.0, 1.0, B, T, H)
    d_o = normal(B, T, H, V)
    return q, k, v, g, beta, d_o


def main():
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure means "no peer here"
        print(f"peers: torch not importable ({type(e).__name__}: {e}): skipped")
        return
    if not torch.cuda.is_available():
        print("peers: no CUDA device: skipped")
        return
    try:
        import fla
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.gla import chunk_gla
        from fla.ops.kda import chunk_kda
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:  # noqa: BLE001
        print(f"peers: flash-linear-attention not importable ({type(e).__name__}: {e}): skipped")
        return
    import triton

    print(f"peer versions: fla {fla.__version__}, triton {triton.__version__}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name()}")

    # name -> (vector gate, call(q, k, v, g, beta) -> output tensor, which inputs have gradients)
    ops = {
        "chunk_gated_delta_rule": (False, lambda q, k, v, g, b, fs: chunk_gated_delta_rule(
            q, k, v, g, b, output_final_state=fs, use_qk_l2norm_in_kernel=True)[0], "qkvgb"),
        "chunk_kda": (True, lambda q, k, v, g, b, fs: chunk_kda(
            q, k, v, g, b, output_final_state=fs, use_qk_l2norm_in_kernel=True)[0], "qkvgb"),
        "chunk_simple_gla": (False, lambda q, k, v, g, b, fs: chunk_simple_gla(
            q, k, v, g, output_final_state=fs)[0], "qkvg"),
        "chunk_gla": (True, lambda q, k, v, g, b, fs: chunk_gla(q, k, v, g, output_final_state=fs)[0], "qkvg"),
        "chunk_delta_rule": (False, lambda q, k, v, g, b, fs: chunk_delta_rule(
            q, k, v, b, output_final_state=fs, use_qk_l2norm_in_kernel=True)[0], "qkvb"),
    }
    if ONLY is not None:
        unknown = sorted(set(ONLY) - set(ops))
        if unknown:
            raise SystemExit(f"fla_peers.py: --ops names {unknown}; expected some of {sorted(ops)}")
        ops = {name: op for name, op in ops.items() if name in ONLY}
    iters = 5 if QUICK else 20

    for name, (vector_gate, call, _) in ops.items():
        if not FORWARD or name == "chunk_delta_rule":
            continue  # no forward target of its own; timed below as the fwd+bwd stand-in
        for B, T in [(4, 4096), (1, 16384)]:
            q, k, v, g, beta, _ = inputs(torch, B, T, vector_gate, 1)
            try:
                with torch.inference_mode():
                    t0 = time.time()
                    call(q, k, v, g, beta, True)
                    torch.cuda.synchronize()
                    first_s = time.time() - t0
                    ms = median_ms(lambda: call(q, k, v, g, beta, True), iters)
                print(f"peer fla {name} fwd B={B} T={T}: {ms:.4f} ms  (first call {first_s:.1f} s)")
            except Exception as e:  # noqa: BLE001 - report and go on with the next op
                print(f"peer fla {name} fwd B={B} T={T}: skipped ({type(e).__name__}: {str(e)[:200]})")
            sys.stdout.flush()

    B, T = 4, 4096
    for name, (vector_gate, call, with_grad) in ops.items():
        if not FORWARD_BACKWARD:
            break
        q, k, v, g, beta, d_o = inputs(torch, B, T, vector_gate, 21)
        leaves = {"q": q, "k": k, "v": v, "g": g, "b": beta}
        grads = [leaves[c].requires_grad_(True) for c in with_grad]

        def fwd_bwd():
            o = call(q, k, v, g, beta, False)
            return torch.autograd.grad(o, grads, d_o)

        try:
            t0 = time.time()
            result = fwd_bwd()
            torch.cuda.synchronize()
            first_s = time.time() - t0
            finite = all(bool(torch.isfinite(x).all()) for x in result)
            ms = median_ms(fwd_bwd, max(3, iters // 2))
            print(f"peer fla {name} fwd+bwd B={B} T={T}: {ms:.4f} ms  (first call {first_s:.1f} s, "
                  f"gradients {'finite' if finite else 'NOT finite'})")
        except Exception as e:  # noqa: BLE001
            print(f"peer fla {name} fwd+bwd B={B} T={T}: skipped ({type(e).__name__}: {str(e)[:200]})")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
