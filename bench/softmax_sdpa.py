"""PyTorch SDPA on the shapes of bench/softmax_cuda_bench.cpp, timed the same way (CUDA events,
median after a warm-up), so hla's numbers have a baseline from the same machine and the same call.

Prefill uses the flash backend (FlashAttention-2 inside PyTorch); SDPA has no sliding window there,
so the window row is skipped. Decode uses whatever backend SDPA picks for a 1-token query with GQA.
"""
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from cuda_events import median_ms


def attn_flops(B, H, T, D):
    return 4.0 * B * H * T * (T + 1) / 2 * D


def prefill(B, T, HQ, HKV, D, backward, reps, rows):
    q = torch.randn(B, HQ, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
    k = torch.randn(B, HKV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
    v = torch.randn(B, HKV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
    shape = f"B={B} T={T} HQ={HQ} HKV={HKV} D={D}"
    fl = attn_flops(B, HQ, T, D)
    gqa = HQ != HKV
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        try:
            fwd = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa), reps)
        except RuntimeError as e:  # e.g. GQA not taken by the flash backend
            rows.append(("forward", shape, float("nan"), f"unsupported: {str(e)[:40]}"))
            return
        rows.append(("forward", shape, fwd, f"{fl / fwd / 1e9:.1f} TFLOP/s"))
        if backward:
            do = torch.randn_like(q)

            def step():
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
                o.backward(do)

            fb = median_ms(step, reps)
            rows.append(("fwd+bwd", shape, fb, f"{3.5 * fl / fb / 1e9:.1f} TFLOP/s"))


def decode(N, L, HQ, HKV, D, TQ, reps, rows):
    q = torch.randn(N, HQ, TQ, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(N, HKV, L + TQ, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(N, HKV, L + TQ, D, device="cuda", dtype=torch.bfloat16)
    # Bottom-right causal alignment matters only for TQ > 1; a full mask over the cache is the same
    # bytes, which is what decode is bound by.
    ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), reps)
    gbs = 2.0 * N * (L + TQ) * HKV * D * 2 / ms / 1e6
    rows.append(("decode", f"N={N} L={L} HQ={HQ} HKV={HKV} D={D} TQ={TQ}", ms, f"{gbs:.1f} GB/s (KV)"))


def main():
    quick = "--quick" in sys.argv
    bwd_only = "--bwd" in sys.argv  # forward + backward at D = 128 only, as softmax_cuda_bench --bwd
    reps = 5 if quick else 20
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    rows = []
    prefill(4, 4096, 16, 16, 128, True, reps, rows)
    prefill(1, 16384, 16, 16, 128, True, reps, rows)
    if bwd_only:
        for what, shape, ms, rate in rows:
            print(f"SDPA {what:8} | {shape:44} | {ms:9.3f}")
        return
    prefill(2, 4096, 32, 8, 128, False, reps, rows)
    prefill(4, 4096, 16, 16, 64, False, reps, rows)
    prefill(2, 4096, 16, 16, 256, True, reps, rows)
    decode(64, 4096, 32, 8, 128, 1, reps * 2, rows)
    decode(64, 4096, 32, 8, 128, 4, reps * 2, rows)
    decode(8, 32768, 32, 8, 128, 1, reps * 2, rows)
    print(f"\n{'pass':8} | {'shape (bf16, causal) SDPA':44} | {'ms':>9} | rate")
    print("---------|----------------------------------------------|-----------|-----------")
    for what, shape, ms, rate in rows:
        print(f"{what:8} | {shape:44} | {ms:9.3f} | {rate}")


if __name__ == "__main__":
    main()
