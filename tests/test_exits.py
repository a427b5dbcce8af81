"""Adaptive depth: every step trained, the oracle and the exit head's labels on known answers, the
learned exit saved with the run, decoded through the cache as recomputing gives it, and a stopped
token that computes nothing more."""
import json

import pytest
import torch

import data
import decode
import exits
import generate
import run
import train
from conftest import ouroboros, randomise_trainable, train_args


@pytest.fixture(autouse=True)
def private_cache(setup, monkeypatch):
    monkeypatch.setattr(data, "CACHE", setup[2])


def test_oracle_and_labels_on_a_hand_built_loss_table():
    """Four tokens, three steps: the first step within epsilon of the last, and 1 from there on."""
    losses = torch.tensor([[5.0, 2.00, 3.0, 1.0],
                           [4.0, 2.04, 2.5, 3.0],
                           [3.0, 2.00, 2.0, 2.0]])
    assert exits.first_within(losses, 0.05).tolist() == [3, 1, 3, 1]  # 2.04 - 2.00 <= 0.05; a lower early loss
    assert exits.first_within(losses, 0.5).tolist() == [3, 1, 2, 1]
    assert exits.labels(losses, 0.05).tolist() == [[0, 1, 0, 1], [0, 1, 0, 1], [1, 1, 1, 1]]
    assert exits.first_within(losses[:, None], 0.05).shape == (1, 4)  # any shape after the step dimension


def test_every_step_readout_is_the_mean_over_the_depths(setup):
    model = ouroboros(setup[0], prelude=1, recurrent=2, coda=1, rank=8)
    randomise_trainable(model)
    x, y = (torch.randint(0, 264, (2, 16), generator=torch.Generator().manual_seed(s)) for s in (0, 1))
    every = model(x, depth=3, labels=y, every=True)
    assert abs(every.item() - sum(model(x, depth=d, labels=y).item() for d in (1, 2, 3)) / 3) < 1e-5
    every.backward()
    assert model.step_norm.weight.grad[:3].abs().sum(-1).min() > 0  # every step's norm learns


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    """A tiny run trained with every step's readout, and its exit head."""
    out = str(tmp_path_factory.mktemp("exit") / "run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "CACHE", setup[2])
        train.main(train_args(setup, out, "--steps", "3", "--readout", "every", "--depths", "3"))
        exits.main(["--run", out, "--windows", "4"])
    return out


def test_the_exit_head_is_saved_with_the_run_and_refused_once_it_is_stale(setup, trained, tmp_path):
    model, cfg = run.load_run(trained)
    exits.attach_exit_head(model, trained)
    assert cfg.readout == "every" and model.exit_head is not None
    h = torch.randn(1, 5, 64)
    lam = model.exit_head(h, h + 0.1 * torch.randn_like(h), 2)
    assert lam.shape == (1, 5) and ((0 < lam) & (lam < 1)).all()
    train.main(["--out", trained, "--resume", "--steps", "4"])  # trains on: the head belongs to step 3
    with pytest.raises(ValueError, match="exit.safetensors was trained on step 3, the checkpoint holds step 4"):
        exits.attach_exit_head(run.load_run(trained)[0], trained)
    exits.main(["--run", trained, "--windows", "4"])  # trained again, for the checkpoint it has now
    assert exits.attach_exit_head(run.load_run(trained)[0], trained).exit_head is not None


def test_cached_decoding_with_the_learned_exit_is_what_recomputing_gives(trained, capsys):
    """Greedy tokens and the steps of each, carrying the cache from token to token or decoding the whole
    sequence again from a fresh cache for every token, with a threshold that stops some tokens early."""
    got = []
    for extra in ([], ["--no-cache"]):
        generate.main(["--run", trained, "--prompt", "the cat sat on", "--depth", "3", "--max-new-tokens", "8",
                       "--temperature", "0", "--exit", "learned", "0.45", "--json", *extra])
        got.append(json.loads(capsys.readouterr().out))
    assert got[0]["ids"] == got[1]["ids"] and got[0]["depths"] == got[1]["depths"]
    assert len(got[0]["ids"]) == 8 and {1, 3} <= set(got[0]["depths"])  # some tokens stopped early, some did not


def test_a_stopped_token_computes_no_further_step_at_batch_1(trained, monkeypatch):
    model = exits.attach_exit_head(run.load_run(trained)[0], trained)
    calls = []
    step = model.step
    monkeypatch.setattr(model, "step", lambda *a, **k: calls.append(a[1]) or step(*a, **k))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        cache = decode.new_cache(model, 1, 4, 3)
        _, steps = decode.decode(model, ids, cache, ("latent-diff", float("inf")))  # stops after step 1
    assert steps.tolist() == [[1, 1, 1, 1]] and calls == [0, 0, 0, 0]
    calls.clear()
    with torch.no_grad():
        _, steps = decode.decode(model, ids, decode.new_cache(model, 1, 4, 3), ("learned", 2.0))
    assert calls == [0] * 4 and steps.tolist() == [[1] * 4]  # 1 - lambda < 2 always: one step each
