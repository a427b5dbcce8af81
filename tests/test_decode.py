"""Cached decoding and adaptive depth: the KV cache gives the full forward's logits, exactly."""
import argparse
import json

import numpy as np
import pytest
import torch

import data
import eval as evaluation
import exits
import generate
import run
import train
from conftest import make_checkpoint, make_corpus, make_model_folder, ouroboros, randomise_trainable
from load_qwen import load_model
from decode import decode, latent_diff, new_cache

SPLIT = dict(prelude=2, recurrent=3, coda=2)  # of 7 layers
TOL = 1e-4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "qwen")
    make_checkpoint(path, layers=7)
    return path


def ids(*shape, seed=0):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def chunked(decode, x, cuts):
    """Logits (and steps) of x decoded in chunks ending at `cuts`, then one token at a time."""
    out, start = [], 0
    for end in list(cuts) + list(range(cuts[-1] + 1, x.shape[1] + 1)):
        out.append(decode(x[:, start:end]))
        start = end
    return [torch.cat(parts, dim=1) for parts in zip(*out)]


@pytest.mark.parametrize("variant,gate,depth", [(v, g, 3) for v in ("controller", "static", "none")
                                                for g in (True, False)] + [("controller", True, 1)])
def test_cached_decoding_gives_the_full_forward_logits(ckpt, variant, gate, depth):
    model = ouroboros(ckpt, **SPLIT, variant=variant, gate=gate)
    randomise_trainable(model, scale=0.1)  # at 0.3 the no-gate loop is chaotic: rounding alone moves logits by 1e-3
    x = ids(2, 20)
    with torch.no_grad():
        want = model(x, depth=depth)
        assert (want - model(x, depth=depth + 1)).abs().max() > 1e-2  # the steps matter: one more shows
        one_go, steps = decode(model, x, new_cache(model, 2, 20, depth))
        cache = new_cache(model, 2, 20, depth)
        pieces, steps_pieces = chunked(lambda t: decode(model, t, cache), x, cuts=[7, 12])  # prompt, chunk, tokens
    assert (one_go - want).abs().max() <= TOL
    assert (pieces - want).abs().max() <= TOL
    assert steps.eq(depth).all() and steps_pieces.eq(depth).all() and cache.pos == 20


def test_full_model_cached_decoding(ckpt):
    model = load_model(ckpt)
    x = ids(2, 20)
    with torch.no_grad():
        want = model(x)
        cache = new_cache(model, 2, 20)
        got, = chunked(lambda t: (model(t, cache=cache),), x, cuts=[5])
    assert (got - want).abs().max() <= TOL


def test_pruned_cached_decoding(ckpt):
    model = ouroboros(ckpt, **SPLIT)
    x = ids(1, 16)
    with torch.no_grad():
        want = model.pruned(x)
        cache = new_cache(model, 1, 16, depth=1)
        got, = chunked(lambda t: (model.pruned(t, cache=cache),), x, cuts=[4])
    assert (got - want).abs().max() <= TOL


def test_cache_size_overflow_and_mean_pool_refused(ckpt):
    model = ouroboros(ckpt, **SPLIT)
    # K and V, (2 prelude + 2 steps + 2 coda) slots, 2 KV heads of 16, fp32
    assert new_cache(model, 1, 8, 2).bytes_per_token() == 2 * 6 * 2 * 16 * 4
    with pytest.raises(ValueError, match="do not fit a cache of 8"):
        decode(model, ids(1, 9), new_cache(model, 1, 8, 2))
    mean = ouroboros(ckpt, **SPLIT, pool="mean")
    with pytest.raises(ValueError, match="sees the future.*--no-cache"):
        decode(mean, ids(1, 8), new_cache(mean, 1, 8, 2))
    x = ids(1, 8)  # the pruned baseline never calls the controller: it decodes a mean-pool run
    with torch.no_grad():
        assert (mean.pruned(x, cache=new_cache(mean, 1, 8, depth=1)) - mean.pruned(x)).abs().max() <= TOL


def options(**kw):
    return argparse.Namespace(**{"run": "run", "pruned": False, "no_cache": False, "depth": 3, "exit": None, **kw})


def test_greedy_tokens_identical_with_and_without_cache(ckpt):
    model = ouroboros(ckpt, **SPLIT)
    randomise_trainable(model, scale=0.1)
    prompt, greedy = ids(1, 6), lambda logits: logits.argmax(-1, keepdim=True)
    runs = [generate.generate(generate.decoder(model, options(no_cache=no_cache), 30), prompt, 24, greedy)
            for no_cache in (False, True)]
    assert runs[0][:2] == runs[1][:2]
    assert len(set(runs[0][0])) > 3 and runs[0][1] == [3] * 24  # not one token repeated


def test_exit_that_never_fires_is_fixed_depth_and_one_that_always_fires_is_depth_one(ckpt):
    model = ouroboros(ckpt, **SPLIT)
    randomise_trainable(model, scale=0.1)
    x = ids(2, 12)
    never, always = new_cache(model, 2, 12, 3), new_cache(model, 2, 12, 3)
    with torch.no_grad():
        got_never, s_never = chunked(lambda t: decode(model, t, never, ("latent-diff", 0.0)), x, cuts=[5])
        got_always, s_always = chunked(lambda t: decode(model, t, always, ("latent-diff", float("inf"))), x, cuts=[5])
        fixed, one = model(x, depth=3), model(x, depth=1)
    assert (got_never - fixed).abs().max() <= TOL and s_never.eq(3).all()
    # every token stops after step 1: nothing after it is computed, and the logits are depth 1's
    assert (got_always - one).abs().max() <= TOL and s_always.eq(1).all()
    P = SPLIT["prelude"]  # steps 2 and 3 hold step 1's K/V
    assert torch.equal(always.k[P + 2], always.k[P]) and torch.equal(always.v[P + 1], always.v[P])


def test_adaptive_depth_per_row_in_a_batch_is_per_sequence_decoding(ckpt):
    """A batch of windows decoded token by token with per-token exits gives each sequence's own
    numbers, and a stopped token's K/V at later steps are its last computed step's."""
    model = ouroboros(ckpt, **SPLIT)
    randomise_trainable(model, scale=0.1)
    x, depth, P = ids(3, 14), 4, 2
    with torch.no_grad():
        h, cos, sin = model.embed_prelude(x)
        threshold = latent_diff(h, model.step(h, 0, cos, sin)).median().item()  # about half stop after step 1
        exit = ("latent-diff", threshold)
        cache = new_cache(model, 3, 14, depth)
        batch, steps = chunked(lambda t: decode(model, t, cache, exit), x, cuts=[1])
        for b in range(3):
            alone = new_cache(model, 1, 14, depth)
            logits, s = chunked(lambda t: decode(model, t, alone, exit), x[b:b + 1], cuts=[1])
            assert (logits[0] - batch[b]).abs().max() <= 1e-5 and torch.equal(s[0], steps[b])
    assert steps.min() == 1 and steps.max() > 1
    for cuts in ([14], [6]):  # a whole chunk with exits, the prompt included, is token-by-token decoding
        whole = new_cache(model, 3, 14, depth)
        with torch.no_grad():
            got, s = chunked(lambda t: decode(model, t, whole, exit), x, cuts=cuts)
        assert (got - batch).abs().max() <= TOL and torch.equal(s, steps)
    for b, t in (steps < depth).nonzero().tolist():
        e = steps[b, t].item()
        for k in range(e, depth):
            assert torch.equal(cache.k[P + k, b, :, t], cache.k[P + e - 1, b, :, t])
            assert torch.equal(cache.v[P + k, b, :, t], cache.v[P + e - 1, b, :, t])


def test_a_cpu_cache_attends_in_fp32_whatever_the_weights_and_autocast(ckpt):
    """bf16 weights on a CPU: the K/V are kept in fp32 and one query attends in fp32 even under bf16
    autocast (which would cast attention to bf16), its output back in the query's dtype."""
    model = ouroboros(ckpt, torch.bfloat16, **SPLIT)
    cache = new_cache(model, 1, 8, 2)
    assert cache.k.dtype == cache.v.dtype == torch.float32
    assert new_cache(model, 1, 8, 2, torch.bfloat16).k.dtype == torch.bfloat16  # the path before, on request
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 5, 16, generator=g).to(torch.bfloat16) for n in (4, 2, 2))
    with torch.autocast("cpu", torch.bfloat16):
        got = cache.attend(0, q, k, v)
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True,
                                                            enable_gqa=True).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    x = ids(1, 8)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):  # and decoding bf16 stays near its plain forward
        fresh = new_cache(model, 1, 8, 2)
        got, _ = chunked(lambda t: decode(model, t, fresh), x, cuts=[4])
        want = model(x, depth=2)
    assert (got.float() - want.float()).abs().max() < 0.1


@pytest.mark.parametrize("native,decoding,dtype", [(True, True, torch.bfloat16), (False, True, torch.float32),
                                                   (True, False, torch.float32)])
def test_auto_precision_decodes_in_bf16_only_on_a_cpu_that_has_it(monkeypatch, native, decoding, dtype):
    monkeypatch.setattr(run, "native_bf16_cpu", lambda: native)
    where, got, autocast = run.placement("cpu", "auto", decoding)
    assert got == dtype and autocast._enabled == (dtype == torch.bfloat16)  # training stays fp32 on a CPU
    assert run.placement("cpu", "fp32", decoding)[1] == torch.float32


# ----------------------------------------------------------------------------------------------
# generate.py, end to end on a tiny trained run

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    model, corpus = make_model_folder(str(tmp / "model")), make_corpus(str(tmp / "corpus"))
    out = {"cache": str(tmp / "cache")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "CACHE", str(tmp / "cache"))
        for pool in ("causal", "mean"):
            out[pool] = str(tmp / pool)
            train.main(["--model", model, "--data", corpus, "--out", out[pool], "--prelude", "1", "--recurrent", "2",
                        "--coda", "1", "--seq-len", "32", "--batch-size", "2", "--steps", "2", "--warmup", "1",
                        "--eval-interval", "2", "--eval-windows", "2", "--depths", "2", "--rank", "8", "--pool", pool,
                        "--no-final-eval"])
    return out


def test_generate_cli_json_cached_equals_uncached(runs, capsys):
    outs = []
    for extra in ([], ["--no-cache"]):
        generate.main(["--run", runs["causal"], "--prompt", "the cat sat", "--depth", "3", "--max-new-tokens", "8",
                       "--json", "--seed", "1", "--precision", "fp32", *extra])  # auto may be bf16 on some CPUs
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0]["ids"] == outs[1]["ids"] and len(outs[0]["ids"]) >= 1
    assert outs[0]["depths"] == [3] * len(outs[0]["ids"])
    generate.main(["--run", runs["causal"], "--prompt", "the cat", "--exit", "latent-diff", "0.5", "--json"])
    assert all(1 <= d <= 8 for d in json.loads(capsys.readouterr().out)["depths"])


def test_generate_refuses_mean_pool_with_cache_but_samples_it_without(runs, capsys):
    with pytest.raises(ValueError, match="pool='mean'.*sees the future.*--no-cache"):
        generate.main(["--run", runs["mean"], "--prompt", "the cat"])
    generate.main(["--run", runs["mean"], "--prompt", "the cat", "--no-cache", "--max-new-tokens", "3"])
    assert "tok/s" in capsys.readouterr().err
    generate.main(["--run", runs["mean"], "--prompt", "the cat", "--pruned", "--max-new-tokens", "3"])
    assert "pruned baseline, cached" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--exit", "latent-diff", "0.1"], "need --run"),
    (["--run", "R", "--exit", "entropy", "0.1"], "give a criterion"),
    (["--run", "R", "--pruned", "--depth", "4"], "no --depth"),
    (["--run", "nowhere"], "nowhere/config.json not found"),
    (["--run", "nowhere", "--depth", "0"], "--depth 0 must be at least 1"),  # before anything is read
    (["--run", "nowhere", "--model", "M"], "--model and --run"),
])
def test_generate_bad_input_is_one_clear_error(argv, message):
    with pytest.raises(ValueError, match=message):
        generate.main(["--prompt", "x", *argv])


def test_generate_refuses_a_depth_beyond_the_runs_step_norms(runs):
    with pytest.raises(ValueError, match="--depth 65: .* has step norms for 64 steps at most"):
        generate.main(["--run", runs["causal"], "--prompt", "x", "--depth", "65"])


def test_eval_adaptive_rows_are_what_decoding_gives(runs, tmp_path, monkeypatch, capsys):
    """The adaptive table on the evaluation half of the held-out documents: each fixed depth's losses
    are the plain forward's, window by window; decoded through the cache, an exit that never fires
    gives the deepest depth's and one that always fires depth 1's; the oracle stays within its epsilon."""
    monkeypatch.setattr(data, "CACHE", runs["cache"])
    common = ["--run", runs["causal"], "--depths", "1,3", "--windows", "3", "--out", str(tmp_path), "--json"]
    evaluation.main(common + ["--adaptive", "0,0.05,inf"])
    result = json.loads(capsys.readouterr().out)
    rows = result["parts"]["evaluation"]
    fixed = {r["at"]: np.array(r["loss"]) for r in rows if r["kind"] == "fixed"}
    exits_ = {r["at"]: r for r in rows if r["kind"] == "latent-diff"}
    assert sorted(fixed) == [1, 2, 3] and sorted(exits_) == [0, 0.05, float("inf")]
    model, cfg = run.load_run(runs["causal"])
    held = exits.halves(data.load_splits(cfg)[1], cfg.seq_len, 2)[1]
    x, y = held.batch(held.spread(3))
    with torch.no_grad():
        for d in (1, 2, 3):
            plain = [model(x[i:i + 1], depth=d, labels=y[i:i + 1]).item() for i in range(len(x))]
            assert np.abs(np.array(plain) - fixed[d]).max() <= 1e-5
    assert exits_[0]["steps"] == [3.0] * len(x) and exits_[float("inf")]["steps"] == [1.0] * len(x)
    assert np.abs(np.array(exits_[0]["loss"]) - fixed[3]).max() <= 1e-4
    assert np.abs(np.array(exits_[float("inf")]["loss"]) - fixed[1]).max() <= 1e-4
    for r in (r for r in rows if r["kind"] == "oracle"):
        assert all(1 <= s <= 3 for s in r["steps"]) and (np.array(r["loss"]) <= fixed[3] + r["at"] + 1e-6).all()
    assert (tmp_path / "adaptive.md").read_text().startswith(f"`{runs['causal']}`")
    with pytest.raises(ValueError, match="--adaptive 'x': give comma-separated numbers"):
        evaluation.main(common + ["--adaptive", "x"])
    with pytest.raises(ValueError, match="--adaptive measures one run"):
        evaluation.main(common + ["--adaptive", "0.1", "--run", runs["causal"], runs["mean"]])
    with pytest.raises(ValueError, match=r"--adaptive .*pool='mean'.*measure a pool='causal' run"):
        evaluation.main(common + ["--adaptive", "0.1", "--run", runs["mean"]])
