"""Coda adapters (extras/coda_lora.py), attached through the reference's `adapters` hook: they start as the identity
(at step 0 the model is the controller-only model of the same seed), the cache decodes through them, a resumed run
is exact and trains them."""
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_checkpoint, ouroboros, randomise_trainable, train_args
from eval import load_run, name
from test_decode import fed, ids
from test_train import assert_same_checkpoint, killed_then_resumed, main

SPLIT = dict(prelude=2, recurrent=3, coda=2)  # of 7 layers
HOOK = "extras.coda_lora:r8"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "qwen")
    make_checkpoint(path, layers=7)
    return path


def seeded(ckpt, **oc):
    torch.manual_seed(0)
    return ouroboros(ckpt, **SPLIT, **oc)


def adapters(model):
    return {n: p for n, p in model.trainable().items() if n.endswith((".A", ".B"))}


@pytest.mark.parametrize("hook,per_layer", [(HOOK, 7), ("extras.coda_lora:r8_attn", 4)])
def test_adapters_start_as_the_identity_and_leave_the_controller_as_the_seed_made_it(ckpt, hook, per_layer):
    plain, adapted = seeded(ckpt), seeded(ckpt, adapters=hook)
    lora = adapters(adapted)
    assert len(lora) == 2 * per_layer * SPLIT["coda"] and all(n.startswith("base.layers.") for n in lora)
    assert all((p == 0).all() for n, p in lora.items() if n.endswith(".B"))
    assert all(torch.equal(p, adapted.trainable()[n]) for n, p in plain.trainable().items())  # the same controller
    randomise_trainable(plain, scale=0.1)
    with torch.no_grad():
        for n, p in plain.trainable().items():
            adapted.trainable()[n].copy_(p)
        x = ids(2, 16)
        assert torch.equal(plain(x, depth=3), adapted(x, depth=3))
        for p in lora.values():
            p.add_(0.1 * torch.randn_like(p))
        assert (plain(x, depth=3) - adapted(x, depth=3)).abs().max() > 1e-3  # trained, they change the logits


def test_cached_decoding_through_the_adapters_gives_the_plain_forward_logits(ckpt):
    model = seeded(ckpt, adapters=HOOK)
    randomise_trainable(model, scale=0.1)
    x = ids(2, 20)
    with torch.no_grad():
        want = model(x, depth=3)
        for how in ("whole", "chunks", "tokens"):
            model.setup_caches(2, 24, 3)
            assert (fed(lambda t, pos: model(t, 3, pos=pos), x, how) - want).abs().max() <= 1e-4, how


def test_a_run_with_adapters_trains_them_and_resumes_exactly(setup, tmp_path, monkeypatch):
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    flags = ("--adapters", HOOK, "--steps", "6", "--lr", "1e-2")
    main(train_args(setup, whole, *flags))
    killed_then_resumed(setup, cut, monkeypatch, *flags)
    assert_same_checkpoint(whole, cut)
    saved = load_file(os.path.join(whole, "checkpoint.safetensors"))
    trained_b = [k for k in saved if k.startswith("model.") and k.endswith(".B")]
    assert trained_b and all(saved[k].abs().max() > 0 for k in trained_b)  # B left zero
    assert name(load_run(whole)[1]) == "controller-causal-r8+coda_lora-r8"  # eval.py tells it from the controller alone
