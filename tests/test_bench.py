"""bench.py compares like with like (its transformers-layer reference is the same function as ours)
and its FLOP count, the numerator of MFU, is the one torch counts."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import TransformersLooped, random_ouroboros, train_flops

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=1e4)


def test_transformers_layer_reference_matches_ours_with_mean_pooling():
    ours = random_ouroboros(TINY, torch.float32, torch.device("cpu"), prelude=2, coda=2, rank=4, pool="mean")
    theirs = TransformersLooped(ours)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    a = ours(ids, 3, labels)
    (ga,) = torch.autograd.grad(a, ours.controller.state_proj.weight)
    b = theirs(ids, 3, labels)
    (gb,) = torch.autograd.grad(b, ours.controller.state_proj.weight)
    assert abs(a.item() - b.item()) < 1e-5
    assert torch.allclose(ga, gb, atol=1e-6) and ga.abs().sum() > 0


@pytest.mark.parametrize("pool", ["causal", "mean"])
def test_flop_count_matches_torch_flop_counter(pool):
    """The MFU bench.py reports rests on train_flops; torch counts every matmul actually run."""
    ours = random_ouroboros(TINY, torch.float32, torch.device("cpu"), prelude=2, coda=1, rank=4, pool=pool)
    B, T, depth = 2, 12, 3
    ids = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with counter:
        ours(ids, depth, ids).backward()
    counted = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "mm" in str(op))
    total, _, _ = train_flops(ours.base.config, ours.config, B, T, depth, attention=False)
    assert counted == total
