"""bench.py compares like with like: its transformers-layer reference is the same function as ours."""
import torch

from bench import TransformersLooped, random_ouroboros

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=1e4)


def test_transformers_layer_reference_matches_ours_with_mean_pooling():
    ours = random_ouroboros(TINY, 2, 2, 4, torch.float32, torch.device("cpu"), pool="mean")
    theirs = TransformersLooped(ours)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    a = ours(ids, 3, labels)
    (ga,) = torch.autograd.grad(a, ours.diagonals.state_proj.weight)
    b = theirs(ids, 3, labels)
    (gb,) = torch.autograd.grad(b, ours.diagonals.state_proj.weight)
    assert abs(a.item() - b.item()) < 1e-5
    assert torch.allclose(ga, gb, atol=1e-6) and ga.abs().sum() > 0
