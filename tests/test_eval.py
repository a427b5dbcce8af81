"""eval.py and report.py: every window's loss recomputed independently, the paired intervals and
seed-by-seed signs on known answers, the loss caches, and the runs a table refuses."""
import contextlib
import dataclasses
import io
import json
import math
import os

import numpy as np
import pytest
import torch

import data
import eval as evaluation
import report
import run
import train
from conftest import splits, train_args
from load_qwen import load_model
from model import Ouroboros
from run import settings


@pytest.fixture(autouse=True)
def private_cache(setup, monkeypatch):
    monkeypatch.setattr(data, "CACHE", setup[2])


@pytest.fixture(scope="module")
def table(setup, tmp_path_factory):
    """Three tiny runs (controller seeds 0 and 1, static seed 0) and eval.py's table of them, as JSON."""
    tmp, runs = tmp_path_factory.mktemp("table"), []
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as out:
        mp.setattr(data, "CACHE", setup[2])
        for seed, variant in ((0, "controller"), (1, "controller"), (0, "static")):
            runs.append(str(tmp / f"{variant}{seed}"))
            train.main(train_args(setup, runs[-1], "--steps", "2", "--seed", str(seed), "--variant", variant))
        cmd = ["--run", *runs, "--depths", "1,2", "--windows", "4", "--out", str(tmp / "res"), "--json",
               "--precision", "fp32", "--against", "static-r8,pruned"]
        out.seek(0)
        out.truncate()
        evaluation.main(cmd)
    return runs, cmd, tmp / "res", json.loads(out.getvalue())


def held_out(result, run: int, depth="2"):
    return np.array(result["runs"][run]["held_out"]["t+1"][depth])


def test_eval_losses_are_each_windows_own(setup, table):
    """The full model's and a run's loss of each held-out window, recomputed independently."""
    runs, _, _, result = table
    ref = result["reference"]["held_out"]["t+1"]
    model, corpus, cache = setup
    held = data.Windows(splits([corpus], model, 0.05, cache=cache)[1], 32)
    x, y = held.batch(held.spread(4))
    run0, _ = run.load_run(runs[0])
    with torch.no_grad():
        full = load_model(model)
        assert max(abs(full(x[i:i + 1], labels=y[i:i + 1]).item() - ref["full"][i]) for i in range(4)) < 1e-5
        got = [run0(x[i:i + 1], depth=2, labels=y[i:i + 1]).item() for i in range(4)]
        assert np.abs(np.array(got) - held_out(result, 0)).max() < 1e-5
    assert ref["full"] != ref["pruned"] and list(result["reference"]["train"]) == ["t+1"]
    variants = [(r["variant"], r["seed"]) for r in result["runs"]]
    assert variants == [("controller-causal-r8", 0), ("controller-causal-r8", 1), ("static-r8", 0)]


def test_eval_table_pairs_windows_and_counts_seeds(table):
    """A row: the seeds' pooled loss, the paired difference window by window with its interval, the
    seeds agreeing in sign, the spread over seeds and the gap recovered; and the plot."""
    _, _, res, result = table
    ref = result["reference"]["held_out"]["t+1"]
    md = open(res / "results.md").read()
    row = [line for line in md.split("held-out documents")[1].splitlines()
           if line.startswith("| controller-causal-r8 | 2 | 2 |")][0]
    pooled, static = np.mean([held_out(result, 0), held_out(result, 1)], 0), held_out(result, 2)
    diff, low, high = report.bootstrap(pooled - static)  # paired: window by window
    assert f"{pooled.mean():.3f} [" in row and f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]" in row
    diff, low, high = report.bootstrap(pooled - np.array(ref["pruned"]))
    assert f"| {diff:+.3f} [{low:+.3f}, {high:+.3f}]" in row  # and vs the pruned baseline
    seed_diffs = [np.mean(held_out(result, i) - ref["pruned"]) for i in (0, 1)]
    assert f", {sum(x > 0 for x in seed_diffs) if diff > 0 else sum(x < 0 for x in seed_diffs)}/2 seeds |" in row
    (summary,) = [r for r in result["summary"]
                  if (r["split"], r["model"], r["depth"]) == ("held_out", "controller-causal-r8", 2)]
    assert np.allclose(list(summary["seed_diffs"]["pruned"].values()), seed_diffs)
    assert np.allclose(summary["seed_diffs"]["static-r8"]["0"], held_out(result, 0).mean() - static.mean())
    assert f"| {np.std([held_out(result, i).mean() for i in (0, 1)], ddof=1):.3f} |" in row
    pruned, full = np.mean(ref["pruned"]), np.mean(ref["full"])
    assert f"{100 * (pruned - pooled.mean()) / (pruned - full):.1f}%" in row
    assert "| Δ vs static-r8 [95% CI] | Δ vs pruned [95% CI] |" in md and (res / "results.png").stat().st_size > 1000


def test_eval_caches_losses_and_refuses_runs_that_cannot_share_a_table(setup, table, tmp_path, capsys):
    """A second table reads the losses back (nothing recomputed); other depths recompute the runs, not
    the references. An unknown --against, a repeated seed or other training settings are refused."""
    runs, cmd, res, result = table
    mtime = lambda *path: os.stat(os.path.join(*path)).st_mtime_ns
    cached = mtime(res, "reference-losses.json"), mtime(runs[0], "eval-losses.json")
    evaluation.main(cmd)
    assert json.loads(capsys.readouterr().out)["runs"] == result["runs"]
    assert cached == (mtime(res, "reference-losses.json"), mtime(runs[0], "eval-losses.json"))
    evaluation.main([a if a != "1,2" else "2" for a in cmd])  # other depths: the runs are recomputed
    again = json.loads(capsys.readouterr().out)
    assert mtime(runs[0], "eval-losses.json") != cached[1] and mtime(res, "reference-losses.json") == cached[0]
    assert again["runs"][0]["held_out"]["t+1"]["2"] == result["runs"][0]["held_out"]["t+1"]["2"]
    with pytest.raises(ValueError, match="--against gate: no run of that variant; give pruned, full or one of "
                                         "controller-causal-r8, static-r8"):
        evaluation.main(cmd[:-1] + ["gate"])
    with pytest.raises(ValueError, match="are both static-r8, both seed 0: a variant's runs must differ in --seed"):
        evaluation.main(cmd + ["--run", runs[2], runs[2]])
    train.main(train_args(setup, str(tmp_path / "longer"), "--steps", "3", "--variant", "static"))
    with pytest.raises(ValueError, match="are both static-r8, trained with different steps"):
        evaluation.main(cmd + ["--run", runs[2], str(tmp_path / "longer")])


def test_label_offset_2_trains_on_token_t_plus_2(setup, tmp_path, monkeypatch, capsys):
    """--label-offset 2 (the authors' objective, on purpose): every training batch's labels are the tokens
    two ahead of the inputs (this fails for next-token labels), the run records it, and eval.py scores
    the run on both its own objective and the next token."""
    seen = []
    forward = Ouroboros.forward
    monkeypatch.setattr(Ouroboros, "forward", lambda self, x, depth, labels=None, **kw: (
        torch.is_grad_enabled() and seen.append((x, labels))) or forward(self, x, depth, labels, **kw))
    out = str(tmp_path / "t2")
    train.main(train_args(setup, out, "--steps", "2", "--label-offset", "2"))
    assert len(seen) == 2  # the training batches (the held-out loss runs without grad)
    for x, y in seen:
        assert torch.equal(y[:, :-2], x[:, 2:]) and not torch.equal(y[:, :-1], x[:, 1:])
    assert json.load(open(os.path.join(out, "config.json")))["label_offset"] == 2
    assert "(depth 3, token t+2)" in capsys.readouterr().out  # the logged held-out loss says which token
    evaluation.main(["--run", out, "--depths", "2", "--windows", "2", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["runs"][0]["variant"] == "controller-causal-r8-t+2"
    assert list(result["runs"][0]["held_out"]) == list(result["reference"]["held_out"]) == ["t+1", "t+2"]
    model, corpus, cache = setup  # each objective's losses, recomputed with its own labels
    held = data.Windows(splits([corpus], model, 0.05, cache=cache)[1], 32, 2)
    x, (y1, y2) = held.batch(held.spread(2), offsets=[1, 2])
    trained, _ = run.load_run(out)
    with torch.no_grad():
        for name, y in (("t+1", y1), ("t+2", y2)):
            got = result["runs"][0]["held_out"][name]["2"]
            assert max(abs(trained(x[i:i + 1], depth=2, labels=y[i:i + 1]).item() - got[i]) for i in range(2)) < 1e-5


def test_windows_label_offset():
    w = data.Windows(np.arange(100, dtype=np.uint16), 10, offset=2)
    assert w.n == 9
    x, y = w.batch([3])
    assert x.tolist() == [list(range(30, 40))] and y.tolist() == [list(range(32, 42))]
    x, (y1, y2) = w.batch([3, 8], offsets=[1, 2])
    assert torch.equal(y1[:, :-1], x[:, 1:]) and torch.equal(y2[:, :-2], x[:, 2:]) and y2[1, -1] == 91


def test_seed_by_seed_signs_in_the_table():
    """Each paired difference is also taken seed by seed, over the seeds both rows have (a reference has
    every seed); the table counts those that share the pooled difference's sign."""
    def run(variant, seed, loss):
        losses = {"t+1": {"1": [loss] * 4}}
        return {"variant": variant, "seed": seed, "train": losses, "held_out": losses}
    ref = {"t+1": {"full": [2.0] * 4, "pruned": [7.0] * 4}}
    result = {"model": "m", "split": "1 + [1] + 1", "windows": {"train": 4, "held_out": 4}, "seq_len": 8, "depths": [1],
              "reference": {"train": ref, "held_out": ref},
              "runs": [run("a", 0, 5.0), run("a", 1, 5.3), run("a", 2, 4.0),  # a's seed 2 has no partner in b
                       run("b", 0, 5.1), run("b", 1, 5.2), run("c", 0, 9.0)]}
    result["summary"] = report.summary(result, against=["b", "pruned"])
    a = [r for r in result["summary"] if (r["split"], r["model"]) == ("held_out", "a")][0]
    assert a["diffs"]["b"][0] == pytest.approx((5.0 + 5.3 + 4.0) / 3 - 5.15)  # pooled: negative
    assert a["seed_diffs"]["b"] == pytest.approx({0: -0.1, 1: 0.1})
    assert a["seed_diffs"]["pruned"] == pytest.approx({0: -2.0, 1: -1.7, 2: -3.0})
    rows = report.markdown(result).split("held-out documents")[1].splitlines()
    row = lambda name: [line for line in rows if line.startswith(f"| {name} |")][0]
    assert "*, 1/2 seeds |" in row("a") and "*, 3/3 seeds |" in row("a")
    assert "*, 2/2 seeds |" in row("b")
    assert "seeds |" not in row("c")  # one shared seed with b, one run: nothing to count


def test_bootstrap_interval_on_known_answers():
    """Constant differences: the interval is that constant. Normal data: the interval has the textbook
    width (2 x 1.96 sd / sqrt(n)) and covers the true mean about 95% of the time."""
    assert report.bootstrap([0.25] * 40) == (0.25, 0.25, 0.25)
    rng = np.random.default_rng(1)
    m, lo, hi = report.bootstrap(rng.normal(0.3, 1.0, 4000), samples=4000)
    assert lo < 0.3 < hi and abs((hi - lo) - 2 * 1.96 / math.sqrt(4000)) < 0.1 * (hi - lo)
    covered = 0
    for seed in range(200):
        lo, hi = report.bootstrap(rng.normal(0.3, 1.0, 60), samples=2000, seed=seed)[1:]
        covered += lo < 0.3 < hi
    assert 180 <= covered <= 198  # 95% of 200 is 190; the percentile bootstrap runs a little narrow at n = 60


def test_eval_of_a_run_without_checkpoint(setup, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    cfg = settings({"model": setup[0], "data": [setup[1]], "prelude": 1, "recurrent": 2, "coda": 1, "rank": 8})
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    with pytest.raises(ValueError, match="has not saved a checkpoint"):
        evaluation.main(["--run", str(out), "--depths", "1", "--windows", "2"])


def test_eval_reports_a_bad_run_config_in_one_line(setup, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model": setup[0], "seed": 0}))
    with pytest.raises(ValueError, match="config.json lacks data, text_field, held_out, .*: it was not written by"):
        evaluation.main(["--run", str(out), "--depths", "1", "--windows", "2"])
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(settings({"model": setup[0], "data": [setup[1]]}))))
    with pytest.raises(ValueError, match="prelude 8 \\+ coda 8 must leave room"):
        evaluation.main(["--run", str(out), "--depths", "1", "--windows", "2"])
