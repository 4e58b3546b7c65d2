"""Multi-query associative recall (MQAR, Zoology: Arora et al. 2023): does the mechanism recall?

    python -m hla.mqar            CPU configuration (2 cores, well under 15 minutes)
    python -m hla.mqar --gpu      larger models (head dim 64), more pairs and steps, on CUDA

A sequence lists `pairs` key-value pairs (k1 v1 k2 v2 …); later, at random positions of the rest of
the sequence, the keys appear again in random order and the model must emit the value that followed
each key. Accuracy counts the queried positions whose argmax prediction is the right value.

Every model is the same small pre-norm stack (token embedding, [mixer, SwiGLU MLP] × layers, LayerNorm,
linear head); only the sequence mixer differs: softmax attention, linear attention, GLA, DeltaNet, Gated
DeltaNet, KDA (all libhla, through hla.ops) and a 3:1 Gated DeltaNet : attention hybrid (4 layers).
Each mixer has a short causal depthwise convolution on q, k, v, as the fla / Zoology layers do.

State size (the x axis of the plot) is what a layer carries from token to token at the end of the
sequence, summed over layers: H·K·V per linear layer, 2·T·d per attention layer (its KV cache).
"""
import argparse
import json
import math
import os
import platform
import textwrap
import time
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops

MIXERS = ["attention", "linear_attn", "gla", "deltanet", "gated_deltanet", "kda", "hybrid_gdn_attn"]


# ---- data ------------------------------------------------------------------------------------------

def mqar_batch(batch: int, seq_len: int, pairs, vocab: int, gen: torch.Generator):
    """inputs [B, T] and targets [B, T] (−100 where nothing is asked). `pairs`: one count for the whole
    batch, or a list with one count per sequence. Keys are drawn from the lower half of the vocabulary
    (token 0 excluded: it fills the gaps), values from the upper half."""
    counts = [pairs] * batch if isinstance(pairs, int) else list(pairs)
    assert len(counts) == batch and all(4 * n <= seq_len for n in counts), "need room for the pairs and their queries"
    half = vocab // 2
    inputs = torch.zeros(batch, seq_len, dtype=torch.long)
    targets = torch.full((batch, seq_len), -100, dtype=torch.long)
    for b, n in enumerate(counts):
        keys = torch.randperm(half - 1, generator=gen)[:n] + 1
        values = torch.randint(half, vocab, (n,), generator=gen)
        inputs[b, 0:2 * n:2] = keys
        inputs[b, 1:2 * n:2] = values
        # queries: each key once, at distinct random positions after the context
        pos = torch.randperm(seq_len - 2 * n, generator=gen)[:n] + 2 * n
        order = torch.randperm(n, generator=gen)
        inputs[b, pos] = keys[order]
        targets[b, pos] = values[order]
    return inputs, targets


def training_pairs(pairs: int, curriculum: bool) -> List[tuple]:
    """(count, weight) of the training mixture. With `curriculum`, Zoology's: its MQAR runs train on
    100k sequences of 4 pairs and 20k each of 8, 16, 32 and 64 (up to `pairs`) and test on the hardest.
    Trained on 64 pairs alone, models with a delta-rule layer sit on the loss plateau ln(vocab / 2)
    (uniform over the values) for thousands of steps (bench/results/mqar_gpu.md): the easy sequences
    are what teaches the lookup."""
    if not curriculum:
        return [(pairs, 1.0)]
    counts = [n for n in (4, 8, 16, 32, 64) if n < pairs] + [pairs]
    return [(n, 5.0 if n == 4 else 1.0) for n in counts]


def draw_pairs(mixture: List[tuple], batch: int, gen: torch.Generator) -> List[int]:
    if len(mixture) == 1:
        return [mixture[0][0]] * batch
    weights = torch.tensor([w for _, w in mixture])
    picks = torch.multinomial(weights, batch, replacement=True, generator=gen)
    return [mixture[int(i)][0] for i in picks]


# ---- model -----------------------------------------------------------------------------------------

class ShortConv(nn.Module):
    """Causal depthwise conv (kernel 4) + SiLU over [B, T, C]."""

    def __init__(self, channels: int, kernel: int = 4):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, 1, kernel) / math.sqrt(kernel))

    def forward(self, x):
        T = x.shape[1]
        y = F.conv1d(x.transpose(1, 2), self.weight, padding=self.weight.shape[-1] - 1, groups=x.shape[-1])
        return F.silu(y[..., :T]).transpose(1, 2)


class Mixer(nn.Module):
    """q, k, v projections with short convs, one hla op, output projection."""

    def __init__(self, kind: str, d_model: int, head_dim: int):
        super().__init__()
        self.kind, self.H, self.D = kind, d_model // head_dim, head_dim
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.conv = ShortConv(3 * d_model)
        self.out = nn.Linear(d_model, d_model, bias=False)
        H, D = self.H, self.D
        if kind in ("gla", "kda"):
            self.gate = nn.Sequential(nn.Linear(d_model, 16, bias=False), nn.Linear(16, d_model, bias=True))
        if kind == "gated_deltanet":
            self.gate = nn.Linear(d_model, H, bias=False)
        # Gates start near "remember everything" (log decay −1e-3…−1e-2 per token; zero gate weights),
        # so a short run begins where DeltaNet / linear attention begin and learns to forget. With fla's
        # initialisation (A up to 16, dt up to 0.1, gates O(1)) a 800-step CPU run never gets past
        # forgetting within a few tokens: 1–4% accuracy for GLA and Gated DeltaNet.
        if kind in ("gla", "kda", "gated_deltanet"):
            last = self.gate[-1] if kind in ("gla", "kda") else self.gate
            nn.init.zeros_(last.weight)
        if kind == "gla":
            nn.init.constant_(self.gate[-1].bias, 5.0)  # logsigmoid(5) / 16 ≈ −4e-4
        if kind == "kda":
            nn.init.zeros_(self.gate[-1].bias)
        if kind in ("gated_deltanet", "kda"):
            self.A_log = nn.Parameter(torch.zeros(H))
            n = H if kind == "gated_deltanet" else H * D
            dt = torch.exp(torch.empty(n).uniform_(math.log(1e-3), math.log(1e-2)))
            inv_softplus = dt + torch.log(-torch.expm1(-dt))  # softplus(dt_bias) = dt
            self.dt_bias = nn.Parameter(inv_softplus if kind == "gated_deltanet" else inv_softplus.view(H, D))
        if kind in ("deltanet", "gated_deltanet", "kda"):
            self.beta = nn.Linear(d_model, H, bias=False)

    def state_size(self, seq_len: int) -> int:
        d = self.H * self.D
        return 2 * seq_len * d if self.kind == "attention" else self.H * self.D * self.D

    def forward(self, x):
        B, T, _ = x.shape
        H, D = self.H, self.D
        q, k, v = self.conv(self.qkv(x)).view(B, T, 3, H, D).unbind(2)
        if self.kind == "attention":
            if q.is_cuda:  # libhla's CUDA flash attention takes bf16 / fp16 (head dims 64, 128, 256)
                o, _ = ops.softmax_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
                o = o.float()
            else:
                o, _ = ops.softmax_attention(q, k, v, causal=True)
        elif self.kind == "linear_attn":
            o, _ = ops.linear(ops.make_config("none", "additive", qk_l2norm=True), q, k, v)
        elif self.kind == "gla":
            g = F.logsigmoid(self.gate(x)).view(B, T, H, D) / 16  # fla's gate_logit_normalizer
            o, _ = ops.linear(ops.make_config("vector", "additive", qk_l2norm=True), q, k, v, g)
        elif self.kind == "deltanet":
            o, _ = ops.chunk_delta_rule(q, k, v, torch.sigmoid(self.beta(x)), use_qk_l2norm_in_kernel=True)
        elif self.kind == "gated_deltanet":
            o, _ = ops.chunk_gated_delta_rule(q, k, v, self.gate(x), self.beta(x), use_qk_l2norm_in_kernel=True,
                                              use_gate_in_kernel=True, A_log=self.A_log, dt_bias=self.dt_bias,
                                              use_beta_sigmoid_in_kernel=True)
        elif self.kind == "kda":
            o, _ = ops.chunk_kda(q, k, v, self.gate(x).view(B, T, H, D), self.beta(x), use_qk_l2norm_in_kernel=True,
                                 use_gate_in_kernel=True, A_log=self.A_log, dt_bias=self.dt_bias,
                                 use_beta_sigmoid_in_kernel=True)
        else:
            raise ValueError(self.kind)
        return self.out(o.reshape(B, T, H * D))


class Block(nn.Module):
    def __init__(self, kind: str, d_model: int, head_dim: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.mixer = Mixer(kind, d_model, head_dim)
        self.mlp_in = nn.Linear(d_model, 4 * d_model, bias=False)
        self.mlp_out = nn.Linear(2 * d_model, d_model, bias=False)

    def forward(self, x):
        x = x + self.mixer(self.norm1(x))
        a, b = self.mlp_in(self.norm2(x)).chunk(2, dim=-1)
        return x + self.mlp_out(F.silu(a) * b)


class Model(nn.Module):
    def __init__(self, kind: str, vocab: int, d_model: int, head_dim: int, layers: int = 2):
        super().__init__()
        kinds = ["gated_deltanet"] * 3 + ["attention"] if kind == "hybrid_gdn_attn" else [kind] * layers
        self.embed = nn.Embedding(vocab, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(k, d_model, head_dim) for k in kinds)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def state_size(self, seq_len: int) -> int:
        return sum(b.mixer.state_size(seq_len) for b in self.blocks)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# ---- training --------------------------------------------------------------------------------------

def train(kind: str, d_model: int, args, device, steps: int):
    """The model after `steps` training steps (of a schedule of args.steps), and the loss of each step.
    The initialisation and the batches depend on args.seed only, not on the device."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = Model(kind, args.vocab, d_model, args.head_dim).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    losses = []
    mixture = training_pairs(args.pairs, getattr(args, "curriculum", False))
    for step in range(steps):
        x, y = mqar_batch(args.batch, args.seq_len, draw_pairs(mixture, args.batch, gen), args.vocab, gen)
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return model, losses


def compare_devices(kind: str, d_model: int, args, steps: int) -> List[tuple]:
    """(step, CPU loss, CUDA loss) for the same initialisation and batches: equal up to fp32 rounding
    growth when hla's CUDA and CPU backends train alike (softmax attention runs in bf16 on CUDA, so its
    mixers drift further)."""
    _, cpu = train(kind, d_model, args, torch.device("cpu"), steps)
    _, cuda = train(kind, d_model, args, torch.device("cuda"), steps)
    return list(zip(range(steps), cpu, cuda))


def run(kind: str, d_model: int, args, device) -> dict:
    start = time.time()
    model, losses = train(kind, d_model, args, device, args.steps)
    loss = losses[-1]
    train_s = time.time() - start
    model.eval()
    egen = torch.Generator().manual_seed(args.seed + 1000)
    correct = total = 0
    with torch.no_grad():
        for _ in range(args.eval_batches):
            x, y = mqar_batch(args.batch, args.seq_len, args.pairs, args.vocab, egen)
            pred = model(x.to(device)).argmax(-1).cpu()
            mask = y != -100
            correct += int((pred[mask] == y[mask]).sum())
            total += int(mask.sum())
    return dict(mixer=kind, d_model=d_model, state_size=model.state_size(args.seq_len), accuracy=correct / total,
                final_loss=loss, train_s=round(train_s, 1),
                params=sum(p.numel() for p in model.parameters()))


def table(results: List[dict]) -> str:
    lines = ["| mixer | d_model | state size (floats) | accuracy | train s |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['mixer']} | {r['d_model']} | {r['state_size']:,} | {100 * r['accuracy']:.1f}% | "
                     f"{r['train_s']} |")
    return "\n".join(lines)


def plot(results: List[dict], path: str, title: str) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (apt-get install python3-matplotlib): no plot written"
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, kind in enumerate(MIXERS):
        rs = sorted((r for r in results if r["mixer"] == kind), key=lambda r: r["state_size"])
        # linear mixers of one width share a state size: spread them a little so every marker shows
        spread = 1 + 0.04 * (i - len(MIXERS) // 2)
        if rs:
            ax.plot([r["state_size"] * spread for r in rs], [100 * r["accuracy"] for r in rs], "o-", label=kind)
    ax.set_xscale("log")
    sizes = [r["state_size"] for r in results]
    ax.set_xlim(min(sizes) / 2, max(sizes) * 2)
    ax.set_xlabel("state size (floats carried between tokens)")
    ax.set_ylabel("MQAR accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(textwrap.fill(title, 90), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return None


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m hla.mqar", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="larger configuration on CUDA")
    p.add_argument("--mixers", default=",".join(MIXERS))
    p.add_argument("--d-models", default=None, help="comma-separated widths (default: 64 CPU, 128 GPU)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--pairs", type=int, default=None, help="key-value pairs tested (default 16 CPU, 64 GPU)")
    p.add_argument("--curriculum", action=argparse.BooleanOptionalAction, default=None,
                   help="train on Zoology's mixture of 4, 8, 16, 32 and 64 pairs up to --pairs (default: on with --gpu)")
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="mqar", help="writes OUT.json, OUT.md and OUT.png")
    p.add_argument("--compare-devices", type=int, default=0, metavar="STEPS",
                   help="instead of the benchmark: train STEPS steps from one initialisation on the CPU and on "
                        "CUDA and print both losses per step (a check that the CUDA backend trains like the CPU)")
    args = p.parse_args(argv)
    gpu = args.gpu
    device = torch.device("cuda" if gpu else "cpu")
    args.pairs = args.pairs or (64 if gpu else 16)
    args.curriculum = gpu if args.curriculum is None else args.curriculum
    # vocab 256 on both: with Zoology's 8192 the delta-rule models were still at chance after 3000 steps
    # of batch 64 (bench/results/mqar_gpu.md); Zoology trains ~45k steps, more than a run here can take.
    args.vocab = args.vocab or 256
    args.head_dim = args.head_dim or (64 if gpu else 32)
    args.steps = args.steps or (2000 if gpu else 800)
    args.batch = args.batch or (64 if gpu else 16)
    d_models = [int(d) for d in (args.d_models or ("128" if gpu else "64")).split(",")]
    if args.compare_devices:
        if not torch.cuda.is_available():
            raise SystemExit("hla.mqar --compare-devices: needs a CUDA GPU")
        for kind in args.mixers.split(","):
            for d in d_models:
                rows = compare_devices(kind, d, args, args.compare_devices)
                worst = max(abs(b - a) / abs(a) for _, a, b in rows)
                print(f"{kind} d={d}: largest relative loss difference CUDA vs CPU {worst:.2e}")
                for step, a, b in rows:
                    print(f"  step {step:4d}  cpu {a:.6f}  cuda {b:.6f}  rel {abs(b - a) / abs(a):.2e}")
        return
    results = []
    for kind in args.mixers.split(","):
        for d in d_models:
            r = run(kind, d, args, device)
            results.append(r)
            print(f"{kind:>16}  d={d:<4} state={r['state_size']:>9,}  acc={100 * r['accuracy']:5.1f}%  "
                  f"loss={r['final_loss']:.3f}  {r['train_s']}s", flush=True)
    trained_on = "+".join(str(n) for n, _ in training_pairs(args.pairs, args.curriculum))
    config = (f"T={args.seq_len}, {args.pairs} pairs tested (trained on {trained_on}), vocab {args.vocab}, head dim {args.head_dim}, "
              f"{args.steps} steps x batch {args.batch}, lr {args.lr}, {'cuda' if gpu else 'cpu'} "
              f"({platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}")
    md = f"MQAR accuracy — {config}\n\n{table(results)}\n"
    print("\n" + md)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(config=config, results=results), f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    note = plot(results, args.out + ".png", "MQAR — " + config)
    print(note or f"wrote {os.path.abspath(args.out)}.{{json,md,png}}")


if __name__ == "__main__":
    main()
