"""Evaluation (eval.py): every window's loss, the model's own; a table pairs the runs' windows, averages a variant's
seeds window by window, and gives bootstrap intervals and seed-by-seed signs; losses are cached per run; runs that
cannot share a table are refused; a run trained on token t+2 is scored on t+1 and t+2. All on the CPU in fp32."""
import contextlib
import importlib.util
import io
import json
import math
import os

import numpy as np
import pytest
import torch

import data
import eval as evaluation
import train
from conftest import splits, train_args
from load_qwen import load_model
from model import Ouroboros


def quietly(main, argv):
    """main(argv)'s stdout, parsed as JSON when it is."""
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
        main(argv)
    text = out.getvalue()
    return json.loads(text) if text.startswith("{") else text


def scored(*flags):
    return ["--device", "cpu", "--precision", "fp32", "--json", *flags]


@pytest.fixture(scope="module")
def table(setup, tmp_path_factory):
    """Three tiny runs (controller seeds 0 and 1, static seed 0) and eval.py's table of them, as JSON."""
    tmp, runs = tmp_path_factory.mktemp("table"), []
    for seed, variant in ((0, "controller"), (1, "controller"), (0, "static")):
        runs.append(str(tmp / f"{variant}{seed}"))
        quietly(train.main, train_args(setup, runs[-1], "--steps", "2", "--seed", str(seed), "--variant", variant))
    cmd = ["--run", *runs, "--depths", "1,2", "--windows", "4", "--out", str(tmp / "res"),
           "--against", "static-r8,pruned", *scored()]
    return runs, cmd, tmp / "res", quietly(evaluation.main, cmd)


def held_out(result, run: int, depth="2"):
    return np.array(result["runs"][run]["held_out"]["t+1"][depth])


def windows_of(setup, split, picked, seq_len=32, offset=1):
    model, corpus, cache = setup
    w = data.Windows(splits([corpus], model, 0.05, cache=cache)[data.SIDES.index(split)], seq_len, offset)
    return w.batch(w.spread(picked))


def test_eval_losses_are_each_windows_own(setup, table):
    """The full model's, the pruned baseline's and a run's loss of each window, recomputed one by one."""
    runs, _, _, result = table
    for split in data.SIDES:
        ref = result["reference"][split]["t+1"]
        x, y = windows_of(setup, split, 4)
        assert len(x) == len(ref["full"]) == result["windows"][split] >= 2
        run0, _ = evaluation.load_run(runs[0])
        with torch.no_grad():
            full = load_model(setup[0])
            assert max(abs(full(x[i:i + 1], labels=y[i:i + 1]).item() - ref["full"][i]) for i in range(len(x))) < 1e-5
            pruned = [run0.base(x[i:i + 1], labels=y[i:i + 1]).item() for i in range(len(x))]  # the kept layers
            assert np.abs(np.array(pruned) - ref["pruned"]).max() < 1e-5
            for depth in (1, 2):
                got = [run0(x[i:i + 1], depth=depth, labels=y[i:i + 1]).item() for i in range(len(x))]
                assert np.abs(np.array(got) - result["runs"][0][split]["t+1"][str(depth)]).max() < 1e-5
    assert ref["full"] != ref["pruned"] and list(result["reference"]["train"]) == ["t+1"]
    variants = [(r["variant"], r["seed"]) for r in result["runs"]]
    assert variants == [("controller-causal-r8", 0), ("controller-causal-r8", 1), ("static-r8", 0)]


def test_eval_table_pairs_windows_and_counts_seeds(table):
    """A row: the seeds' pooled loss, the paired difference window by window with its interval, the seeds agreeing
    in sign, the spread over seeds and the gap recovered; and the plot."""
    _, _, res, result = table
    ref = result["reference"]["held_out"]["t+1"]
    md = open(res / "results.md").read()
    (row,) = [line for line in md.split("held-out documents")[1].splitlines()
              if line.startswith("| controller-causal-r8 | 2 | 2 |")]
    pooled, static = np.mean([held_out(result, 0), held_out(result, 1)], 0), held_out(result, 2)
    diff, low, high = evaluation.bootstrap(pooled - static)  # paired: window by window
    assert f"{pooled.mean():.3f} [" in row and f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]" in row
    diff, low, high = evaluation.bootstrap(pooled - np.array(ref["pruned"]))
    assert f"| {diff:+.3f} [{low:+.3f}, {high:+.3f}]" in row  # and against the pruned baseline
    seed_diffs = [np.mean(held_out(result, i) - ref["pruned"]) for i in (0, 1)]
    agree = sum(x > 0 for x in seed_diffs) if diff > 0 else sum(x < 0 for x in seed_diffs)
    assert f", {agree}/2 seeds |" in row
    (summary,) = [r for r in result["summary"]
                  if (r["split"], r["model"], r["depth"]) == ("held_out", "controller-causal-r8", 2)]
    assert np.allclose(list(summary["seed_diffs"]["pruned"].values()), seed_diffs)
    assert np.allclose(summary["seed_diffs"]["static-r8"]["0"], held_out(result, 0).mean() - static.mean())
    assert f"| {np.std([held_out(result, i).mean() for i in (0, 1)], ddof=1):.3f} |" in row
    pruned, full = np.mean(ref["pruned"]), np.mean(ref["full"])
    assert f"{100 * (pruned - pooled.mean()) / (pruned - full):.1f}%" in row
    assert "| Δ vs static-r8 [95% CI] | Δ vs pruned [95% CI] |" in md
    if importlib.util.find_spec("matplotlib"):  # optional: the plot
        assert (res / "results.png").stat().st_size > 1000
    assert json.load(open(res / "results.json"))["runs"] == result["runs"]


def test_eval_caches_losses_per_run(table):
    """A second table reads the losses back (nothing recomputed); other depths recompute the runs, not the
    references, and give the same losses at the depths both have."""
    runs, cmd, res, result = table
    mtime = lambda *path: os.stat(os.path.join(*path)).st_mtime_ns
    cached = mtime(res, "reference-losses.json"), mtime(runs[0], "eval-losses.json")
    assert quietly(evaluation.main, cmd)["runs"] == result["runs"]
    assert cached == (mtime(res, "reference-losses.json"), mtime(runs[0], "eval-losses.json"))
    again = quietly(evaluation.main, [a if a != "1,2" else "2" for a in cmd])
    assert mtime(runs[0], "eval-losses.json") != cached[1] and mtime(res, "reference-losses.json") == cached[0]
    assert again["runs"][0]["held_out"]["t+1"]["2"] == result["runs"][0]["held_out"]["t+1"]["2"]
    assert quietly(evaluation.main, cmd)["runs"] == result["runs"]  # and back


def test_runs_that_cannot_share_a_table_are_refused(setup, table, tmp_path):
    runs, cmd, _, _ = table
    with pytest.raises(ValueError, match="two runs of the same variant and seed: a table takes each once"):
        evaluation.main(cmd + ["--run", runs[2], runs[2]])
    shorter = str(tmp_path / "shorter")
    quietly(train.main, train_args(setup, shorter, "--steps", "1", "--seq-len", "16"))
    with pytest.raises(ValueError, match="runs in one table must share model, data, text_field, held_out, seq_len, "
                                         "prelude, recurrent, coda: evaluate such runs separately"):
        evaluation.main(cmd + ["--run", runs[0], shorter])


def test_the_reference_cache_is_not_shared_by_runs_of_another_seq_len(setup, table, tmp_path):
    """The references' cache (reference-losses.json in --out) is keyed by every setting a table shares. In 7cb7a20
    the key named the model, the data, the dtype, the windows and the layers, but not --seq-len (nor --held-out,
    --text-field): a table of seq-len 16 runs written to the --out of a seq-len 32 table reused the seq-len 32
    windows' losses as its references."""
    runs, _, res, _ = table
    shorter = str(tmp_path / "shorter")
    quietly(train.main, train_args(setup, shorter, "--steps", "1", "--seq-len", "16"))
    result = quietly(evaluation.main, ["--run", shorter, "--depths", "1", "--windows", "4", "--out", str(res),
                                       *scored()])
    x, y = windows_of(setup, "held_out", 4, seq_len=16)
    with torch.no_grad():
        full = load_model(setup[0])
        want = [full(x[i:i + 1], labels=y[i:i + 1]).item() for i in range(len(x))]
    assert np.abs(np.array(want) - result["reference"]["held_out"]["t+1"]["full"]).max() < 1e-5


@pytest.fixture(scope="module")
def t2(setup, tmp_path_factory):
    """(folder, the training batches (inputs, labels), log) of a run trained on token t+2."""
    out, seen = str(tmp_path_factory.mktemp("t2") / "t2"), []
    forward = Ouroboros.forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Ouroboros, "forward", lambda self, x, depth, labels=None, **kw: (
            torch.is_grad_enabled() and seen.append((x, labels))) or forward(self, x, depth, labels, **kw))
        log = quietly(train.main, train_args(setup, out, "--steps", "2", "--label-offset", "2"))
    return out, seen, log


def test_label_offset_2_trains_and_is_scored_on_token_t_plus_2_and_t_plus_1(setup, t2):
    """--label-offset 2 (the authors' objective, on purpose): every training batch's labels are the tokens two ahead
    of the inputs (this fails for next-token labels), the run records it, and eval.py scores it on its own objective
    and on the next token, each with its own labels."""
    out, seen, log = t2
    assert len(seen) == 2  # the training batches (the held-out loss runs without grad)
    for x, y in seen:
        assert torch.equal(y[:, :-2], x[:, 2:]) and not torch.equal(y[:, :-1], x[:, 1:])
    assert json.load(open(os.path.join(out, "config.json")))["label_offset"] == 2
    assert "(depth 3, token t+2)" in log  # the logged held-out loss says which token
    result = quietly(evaluation.main, ["--run", out, "--depths", "2", "--windows", "2", *scored()])
    assert result["runs"][0]["variant"] == "controller-causal-r8-t+2"
    assert list(result["runs"][0]["held_out"]) == list(result["reference"]["held_out"]) == ["t+1", "t+2"]
    model, corpus, cache = setup
    held = data.Windows(splits([corpus], model, 0.05, cache=cache)[1], 32, 2)
    x, y2 = held.batch(held.spread(2))  # eval.py's windows, and the next-token labels of the same inputs
    y1 = data.Windows(held.tokens, 32, 1).batch(held.spread(2))[1]
    trained, _ = evaluation.load_run(out)
    with torch.no_grad():
        for name, y in (("t+1", y1), ("t+2", y2)):
            got = result["runs"][0]["held_out"][name]["2"]
            assert max(abs(trained(x[i:i + 1], depth=2, labels=y[i:i + 1]).item() - got[i]) for i in range(2)) < 1e-5
    md = evaluation.markdown(result)
    assert "**held-out documents, token t+2**" in md and "**held-out documents, token t+1**" in md


def test_runs_of_both_objectives_in_one_table_are_scored_on_the_same_windows(setup, table, t2, tmp_path, monkeypatch):
    """In 7cb7a20 the references' windows were cut for the largest label offset in the table (seq_len + 2 tokens), a
    t+1 run's for its own (seq_len + 1). When a split holds 1 + k * seq_len tokens the two have k - 1 and k windows,
    spread() picked other windows from each, and the table paired a t+1 run's losses with the references' of other
    windows. Here each split is cut to such a length."""
    cut = {}
    real = evaluation.load_splits

    def streams_of_1_plus_k_windows(cfg):
        cut.update(zip(data.SIDES, [t[:1 + 32 * ((len(t) - 1) // 32)] for t in real(cfg)]))
        return [cut[s] for s in data.SIDES]
    monkeypatch.setattr(evaluation, "load_splits", streams_of_1_plus_k_windows)
    result = quietly(evaluation.main, ["--run", table[0][0], t2[0], "--depths", "1", "--windows", "2",
                                       "--out", str(tmp_path), *scored()])
    w = data.Windows(cut["train"], 32, 2)  # the references' windows
    x, y = data.Windows(w.tokens, 32, 1).batch(w.spread(2))
    y = [y]
    run0, _ = evaluation.load_run(table[0][0])
    with torch.no_grad():
        full = load_model(setup[0])
        ref = [full(x[i:i + 1], labels=y[0][i:i + 1]).item() for i in range(2)]
        mine = [run0(x[i:i + 1], depth=1, labels=y[0][i:i + 1]).item() for i in range(2)]
    assert np.abs(np.array(ref) - result["reference"]["train"]["t+1"]["full"]).max() < 1e-5
    assert np.abs(np.array(mine) - result["runs"][0]["train"]["t+1"]["1"]).max() < 1e-5


def test_the_windows_counted_are_those_scored(setup, table, tmp_path):
    """--windows beyond a split's size: each split scores what it holds, and the table says how many it scored."""
    runs = table[0]
    result = quietly(evaluation.main, ["--run", runs[0], "--depths", "1", "--windows", "100000",
                                       "--out", str(tmp_path), *scored()])
    n = result["windows"]
    for split in data.SIDES:
        x, _ = windows_of(setup, split, 100000)
        assert n[split] == len(x) == len(result["reference"][split]["t+1"]["full"])
        assert len(result["runs"][0][split]["t+1"]["1"]) == n[split]
    assert 0 < n["held_out"] < n["train"] < 100000
    md = open(tmp_path / "results.md").read()
    assert "100000" not in md and f"{n['train']} and {n['held_out']} windows" in md


# ----------------------------------------------------------------------------------------------
# the statistics, on known answers

def test_seed_by_seed_signs_in_the_table():
    """Each paired difference is also taken seed by seed, over the seeds both rows have (a reference has every
    seed); the table counts those that share the pooled difference's sign."""
    def run(variant, seed, loss):
        losses = {"t+1": {"1": [loss] * 4}}
        return {"variant": variant, "seed": seed, "train": losses, "held_out": losses}
    ref = {"t+1": {"full": [2.0] * 4, "pruned": [7.0] * 4}}
    result = {"model": "m", "split": "1 + [1] + 1", "windows": {"train": 4, "held_out": 4}, "seq_len": 8,
              "depths": [1], "reference": {"train": ref, "held_out": ref},
              "runs": [run("a", 0, 5.0), run("a", 1, 5.3), run("a", 2, 4.0),  # a's seed 2 has no partner in b
                       run("b", 0, 5.1), run("b", 1, 5.2), run("c", 0, 9.0)]}
    result["summary"] = evaluation.summary(result, against=["b", "pruned"])
    a = [r for r in result["summary"] if (r["split"], r["model"]) == ("held_out", "a")][0]
    assert a["diffs"]["b"][0] == pytest.approx((5.0 + 5.3 + 4.0) / 3 - 5.15)  # pooled: negative
    assert a["seed_diffs"]["b"] == pytest.approx({0: -0.1, 1: 0.1})
    assert a["seed_diffs"]["pruned"] == pytest.approx({0: -2.0, 1: -1.7, 2: -3.0})
    rows = evaluation.markdown(result).split("held-out documents")[1].splitlines()
    row = lambda name: [line for line in rows if line.startswith(f"| {name} |")][0]
    assert "*, 1/2 seeds |" in row("a") and "*, 3/3 seeds |" in row("a")
    assert "*, 2/2 seeds |" in row("b")
    assert "seeds |" not in row("c")  # one shared seed with b, one run: nothing to count
    assert "4 windows x 8 tokens" in evaluation.markdown(result)


def test_bootstrap_interval_on_known_answers():
    """Constant differences: the interval is that constant. Normal data: the interval has the textbook width
    (2 x 1.96 sd / sqrt(n)) and covers the true mean about 95% of the time."""
    assert evaluation.bootstrap([0.25] * 40) == (0.25, 0.25, 0.25)
    rng = np.random.default_rng(1)
    m, lo, hi = evaluation.bootstrap(rng.normal(0.3, 1.0, 4000), samples=4000)
    assert lo < 0.3 < hi and abs((hi - lo) - 2 * 1.96 / math.sqrt(4000)) < 0.1 * (hi - lo)
    covered = 0
    for seed in range(200):
        lo, hi = evaluation.bootstrap(rng.normal(0.3, 1.0, 60), samples=2000, seed=seed)[1:]
        covered += lo < 0.3 < hi
    assert 180 <= covered <= 198  # 95% of 200 is 190; the percentile bootstrap runs a little narrow at n = 60
