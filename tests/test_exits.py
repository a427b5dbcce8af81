"""Adaptive depth (extras/exits.py): every step trained, the oracle and the exit head's labels on known answers,
the learned exit saved with the run, decoding with an exit per token against fixed depths, per-sequence decoding
and recomputing, the evaluation's rows against what decoding gives, and a stopped token that computes nothing
more."""
import glob
import json
import os

import numpy as np
import pytest
import torch

import data
import exits
import train
from conftest import make_checkpoint, ouroboros, randomise_trainable, train_args
from eval import load_run
from model import through

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLIT = dict(prelude=2, recurrent=3, coda=2)  # of 7 layers
TOL = 1e-4


@pytest.fixture(scope="module")
def looped(tmp_path_factory):
    """Ouroboros of a tiny random 7-layer checkpoint, its trainable parts off their initial values."""
    path = str(tmp_path_factory.mktemp("ckpt") / "qwen")
    make_checkpoint(path, layers=7)
    model = ouroboros(path, **SPLIT)
    randomise_trainable(model, scale=0.1)
    return model


def ids(*shape, seed=0):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def decoded(model, x, depth, exit, cuts=()):
    """(logits, steps) of x decoded with the exit through fresh caches, in chunks ending at `cuts`, then the rest."""
    model.setup_caches(len(x), x.shape[1], depth)
    out, start = [], 0
    for end in [*cuts, x.shape[1]]:
        out.append(exits.decode(model, x[:, start:end], torch.arange(start, end), exit))
        start = end
    return torch.cat([o[0] for o in out], 1), torch.cat([o[1] for o in out], 1)


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


def test_exit_that_never_fires_is_fixed_depth_and_one_that_always_fires_is_depth_one(looped):
    x = ids(2, 12)
    got_never, s_never = decoded(looped, x, 3, ("latent-diff", 0.0), cuts=[5])
    got_always, s_always = decoded(looped, x, 3, ("latent-diff", float("inf")), cuts=[5])
    with torch.no_grad():
        fixed, one = looped(x, depth=3), looped(x, depth=1)
    assert (fixed - one).abs().max() > 1e-2  # the steps matter
    assert (got_never - fixed).abs().max() <= TOL and s_never.eq(3).all()
    assert (got_always - one).abs().max() <= TOL and s_always.eq(1).all()
    caches = looped.step_caches  # steps 2 and 3 hold step 1's K/V
    assert torch.equal(caches[2].k, caches[0].k) and torch.equal(caches[1].v, caches[0].v)


def test_adaptive_depth_per_row_in_a_batch_is_per_sequence_decoding(looped):
    """A batch of windows decoded with per-token exits gives each sequence's own numbers (decoded alone, where a
    stopped token computes nothing more), and a stopped token's K/V at later steps are its last computed step's."""
    x, depth = ids(3, 14), 4
    with torch.no_grad():
        h, rope = looped.base.embed(x)
        h = through(looped.prelude, h, rope)
        threshold = exits.latent_diff(h, looped.step(h, 0, rope)).median().item()  # about half stop after step 1
    exit = ("latent-diff", threshold)
    batch, steps = decoded(looped, x, depth, exit, cuts=[1])
    k, v = [c.k.clone() for c in looped.step_caches], [c.v.clone() for c in looped.step_caches]
    assert steps.min() == 1 and steps.max() > 1
    for b in range(3):
        logits, s = decoded(looped, x[b:b + 1], depth, exit, cuts=[1])
        assert (logits[0] - batch[b]).abs().max() <= TOL and torch.equal(s[0], steps[b])
    for cuts in ([], [6]):  # a whole chunk with exits, the prompt included, is token-by-token decoding
        got, s = decoded(looped, x, depth, exit, cuts=cuts)
        assert (got - batch).abs().max() <= TOL and torch.equal(s, steps)
    for b, t in (steps < depth).nonzero().tolist():
        e = steps[b, t].item()
        for j in range(e, depth):
            assert torch.equal(k[j][b, :, t], k[e - 1][b, :, t]) and torch.equal(v[j][b, :, t], v[e - 1][b, :, t])


def test_adaptive_tables_render_as_committed():
    """The committed adaptive.md of every results/exits run is its adaptive.json rendered, byte for byte."""
    files = sorted(glob.glob(os.path.join(ROOT, "results", "exits", "*", "adaptive.json")))
    assert files
    for file in files:
        with open(file) as f:
            result = json.load(f)
        with open(file[:-len(".json")] + ".md") as f:
            assert exits.adaptive_markdown(result) + "\n" == f.read(), file


# ----------------------------------------------------------------------------------------------
# A tiny run trained with every step's readout, and its exit head

@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("exit") / "run")
    train.main(train_args(setup, out, "--steps", "3", "--readout", "every", "--depths", "3"))
    exits.main(["head", "--run", out, "--windows", "4", "--device", "cpu"])
    return out


def test_the_exit_head_is_saved_with_the_run_and_refused_once_it_is_stale(trained):
    model, cfg = load_run(trained)
    exits.attach_exit_head(model, trained)
    assert cfg.readout == "every" and model.exit_head is not None
    h = torch.randn(1, 5, 64)
    lam = model.exit_head(h, h + 0.1 * torch.randn_like(h), 2)
    assert lam.shape == (1, 5) and ((0 < lam) & (lam < 1)).all()
    train.main(["--out", trained, "--resume", "--steps", "4"])  # trains on: the head belongs to step 3
    with pytest.raises(ValueError, match="exit.safetensors was trained on step 3, the checkpoint holds step 4"):
        exits.attach_exit_head(load_run(trained)[0], trained)
    exits.main(["head", "--run", trained, "--windows", "4", "--device", "cpu"])  # again, for the checkpoint it has
    assert exits.attach_exit_head(load_run(trained)[0], trained).exit_head is not None


def test_cached_decoding_with_the_learned_exit_is_what_recomputing_gives(trained, capsys):
    """Greedy tokens and the steps of each, carrying the cache from token to token or decoding the whole
    sequence again from a fresh cache for every token, with a threshold that stops some tokens early."""
    got = []
    for extra in ([], ["--no-cache"]):
        exits.main(["generate", "--run", trained, "--prompt", "the cat sat on", "--depth", "3", "--max-new-tokens",
                    "8", "--temperature", "0", "--exit", "learned", "0.45", "--json", "--device", "cpu", *extra])
        got.append(json.loads(capsys.readouterr().out))
    assert got[0]["ids"] == got[1]["ids"] and got[0]["depths"] == got[1]["depths"]
    assert len(got[0]["ids"]) == 8 and {1, 3} <= set(got[0]["depths"])  # some tokens stopped early, some did not


def test_a_stopped_token_computes_no_further_step_at_batch_1(trained, monkeypatch):
    model = exits.attach_exit_head(load_run(trained)[0], trained)
    calls, step = [], model.step
    monkeypatch.setattr(model, "step", lambda *a, **k: calls.append(a[1]) or step(*a, **k))
    x = torch.tensor([[5, 6, 7, 8]])
    _, steps = decoded(model, x, 3, ("latent-diff", float("inf")))  # stops after step 1
    assert steps.tolist() == [[1, 1, 1, 1]] and calls == [0, 0, 0, 0]
    calls.clear()
    _, steps = decoded(model, x, 3, ("learned", 2.0))  # 1 - lambda < 2 always: one step each
    assert calls == [0] * 4 and steps.tolist() == [[1] * 4]
    calls.clear()
    _, steps = decoded(model, x, 3, ("latent-diff", 0.0))  # never: every step of every token
    assert calls == [0, 1, 2] * 4 and steps.eq(3).all()


def test_eval_rows_are_what_decoding_gives(trained, tmp_path, capsys):
    """The adaptive table on the evaluation half of the held-out documents: each fixed depth's losses are the
    plain forward's, window by window; decoded through the cache, an exit that never fires gives the deepest
    depth's and one that always fires depth 1's; the oracle stays within its epsilon."""
    common = ["eval", "--run", trained, "--depth", "3", "--windows", "3", "--out", str(tmp_path), "--json",
              "--device", "cpu"]
    exits.main(common + ["--latent-diff", "0,0.05,inf", "--learned", "0.5"])
    result = json.loads(capsys.readouterr().out)
    rows = result["parts"]["evaluation"]
    fixed = {r["at"]: np.array(r["loss"]) for r in rows if r["kind"] == "fixed"}
    latent = {r["at"]: r for r in rows if r["kind"] == "latent-diff"}
    assert sorted(fixed) == [1, 2, 3] and sorted(latent) == [0, 0.05, float("inf")]
    assert [r["at"] for r in rows if r["kind"] == "learned"] == [0.5]
    model, cfg = load_run(trained)
    held = exits.halves(data.load_splits(cfg)[1], cfg.seq_len, 2)[1]
    x, y = held.batch(held.spread(3))
    with torch.no_grad():
        for d in (1, 2, 3):
            plain = [model(x[i:i + 1], depth=d, labels=y[i:i + 1]).item() for i in range(len(x))]
            assert np.abs(np.array(plain) - fixed[d]).max() <= 1e-5
    assert latent[0]["steps"] == [3.0] * len(x) and latent[float("inf")]["steps"] == [1.0] * len(x)
    assert np.abs(np.array(latent[0]["loss"]) - fixed[3]).max() <= TOL
    assert np.abs(np.array(latent[float("inf")]["loss"]) - fixed[1]).max() <= TOL
    for r in (r for r in rows if r["kind"] == "oracle"):
        assert all(1 <= s <= 3 for s in r["steps"]) and (np.array(r["loss"]) <= fixed[3] + r["at"] + 1e-6).all()
    assert (tmp_path / "adaptive.md").read_text() == exits.adaptive_markdown(result) + "\n"
    assert result["command"].startswith(f"python extras/exits.py eval --run {trained}")


def test_bad_input_is_one_clear_error(trained, tmp_path):
    with pytest.raises(ValueError, match="--latent-diff 'x': give comma-separated numbers"):
        exits.main(["eval", "--run", trained, "--latent-diff", "x"])
    with pytest.raises(ValueError, match="--exit entropy 0.1: give a criterion"):
        exits.main(["generate", "--run", trained, "--prompt", "x", "--exit", "entropy", "0.1"])
    with pytest.raises(ValueError, match="--depth 65 must be in 1..64"):
        exits.main(["generate", "--run", trained, "--prompt", "x", "--exit", "learned", "0.1", "--depth", "65"])
    with open(os.path.join(trained, "config.json")) as f:
        config = json.load(f)
    (tmp_path / "config.json").write_text(json.dumps(config | {"pool": "mean"}))
    with pytest.raises(ValueError, match=r"not causal \(pool='mean' sees the future\).*measure a causal run"):
        exits.main(["eval", "--run", str(tmp_path)])
