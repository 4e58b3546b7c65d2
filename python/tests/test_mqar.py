"""hla.mqar: the task generator asks exactly what the context answers, and every model of the
benchmark runs end to end (a few steps on a tiny configuration; the real run is `python -m hla.mqar`)."""
import json

import pytest
import torch

from hla import mqar


@pytest.mark.parametrize("counts", [[8] * 4, [4, 16, 8, 1]])
def test_batch_queries_each_key_once_with_its_value(counts):
    gen = torch.Generator().manual_seed(0)
    T = 64
    x, y = mqar.mqar_batch(4, T, counts[0] if len(set(counts)) == 1 else counts, 128, gen)
    for b, pairs in enumerate(counts):
        keys, values = x[b, 0:2 * pairs:2], x[b, 1:2 * pairs:2]
        answer = dict(zip(keys.tolist(), values.tolist()))
        assert len(answer) == pairs and all(1 <= k < 64 for k in answer) and all(v >= 64 for v in values.tolist())
        asked = (y[b] != -100).nonzero().flatten()
        assert len(asked) == pairs and bool((asked >= 2 * pairs).all())
        assert sorted(x[b, asked].tolist()) == sorted(answer)
        assert all(answer[int(x[b, p])] == int(y[b, p]) for p in asked)
        rest = torch.ones(T, dtype=torch.bool)
        rest[:2 * pairs] = False
        rest[asked] = False
        assert bool((x[b, rest] == 0).all())


def test_curriculum_is_zoologys_mixture_up_to_the_tested_pairs():
    assert mqar.training_pairs(64, True) == [(4, 5.0), (8, 1.0), (16, 1.0), (32, 1.0), (64, 1.0)]
    assert mqar.training_pairs(20, True) == [(4, 5.0), (8, 1.0), (16, 1.0), (20, 1.0)]
    assert mqar.training_pairs(64, False) == [(64, 1.0)]
    gen = torch.Generator().manual_seed(0)
    drawn = mqar.draw_pairs(mqar.training_pairs(64, True), 9000, gen)
    share = {n: drawn.count(n) / len(drawn) for n in (4, 8, 16, 32, 64)}
    assert abs(share[4] - 5 / 9) < 0.03 and all(abs(share[n] - 1 / 9) < 0.02 for n in (8, 16, 32, 64))


def test_every_mixer_trains_a_few_steps(tmp_path):
    out = tmp_path / "mqar"
    mqar.main(["--seq-len", "32", "--pairs", "4", "--vocab", "64", "--steps", "3", "--batch", "4", "--head-dim", "16",
               "--d-models", "32", "--eval-batches", "1", "--out", str(out)])
    results = json.loads((tmp_path / "mqar.json").read_text())["results"]
    assert [r["mixer"] for r in results] == mqar.MIXERS
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["state_size"] > 0 for r in results)
    assert (tmp_path / "mqar.md").read_text().count("|") > 10


def test_training_depends_on_the_seed_only():
    # --compare-devices relies on it: the same seed gives the same initialisation, batches and losses.
    args = mqar.argparse.Namespace(seed=3, vocab=64, head_dim=16, lr=3e-3, steps=40, batch=4, seq_len=32, pairs=4)
    _, a = mqar.train("deltanet", 32, args, torch.device("cpu"), 3)
    _, b = mqar.train("deltanet", 32, args, torch.device("cpu"), 3)
    assert a == b and len(a) == 3 and all(x > 0 for x in a)
