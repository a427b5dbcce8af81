"""Training loop, resume, DDP and evaluation, on a tiny model and corpus (the data pipeline: test_data.py)."""
import errno
import io
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import data
import eval as evaluation
import load_qwen
import train
from conftest import make_corpus, make_model_folder
from load_qwen import CheckpointError, load_checkpoint, load_model, load_ouroboros, precision
from model import Ouroboros

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    model = make_model_folder(str(tmp / "model"))
    corpus = make_corpus(str(tmp / "corpus"))
    return model, corpus, str(tmp / "cache")


@pytest.fixture(autouse=True)
def private_cache(setup, monkeypatch):
    monkeypatch.setattr(data, "CACHE", setup[2])


def args(setup, out, *extra):
    model, corpus, _ = setup
    return ["--model", model, "--data", corpus, "--out", out, "--prelude", "1", "--recurrent", "2", "--coda", "1",
            "--seq-len", "32", "--batch-size", "4", "--steps", "4", "--eval-interval", "2", "--save-interval", "2",
            "--eval-windows", "4", "--log-interval", "1", "--depths", "1,2,3", "--no-final-eval", "--rank", "8",
            *extra]


def test_loss_is_shifted_exactly_once(setup):
    """The training loss must be the loss of predicting token t+1. The authors' code shifted the
    already-shifted labels again and trained on t+2; this test fails for that mistake."""
    model = load_ouroboros(setup[0], 1, 2, 1, rank=8)
    tokens = np.random.default_rng(0).integers(0, 264, 200).astype(np.uint32)
    x, y = data.Windows(tokens, 32).batch([0, 1])
    with torch.no_grad():
        loss = model(x, depth=2, labels=y)  # what the training loop computes
        logits = model(x, depth=2)
    window = torch.from_numpy(tokens[:66].astype(np.int64))
    once = F.cross_entropy(logits[0], window[1:33])
    once = (once + F.cross_entropy(logits[1], window[33:65])) / 2
    twice = F.cross_entropy(logits[0, :-1], window[2:33])
    assert abs(loss.item() - once.item()) < 1e-5
    assert abs(loss.item() - twice.item()) > 1e-2


def test_lr_schedule_warms_up_then_decays_per_optimiser_step():
    cfg = train.TrainConfig(lr=1.0, warmup=10, steps=110, min_lr_ratio=0.1)
    lrs = [train.lr_at(s, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55, abs=0.01) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_training_lowers_the_loss_and_resume_is_exact(setup, tmp_path, monkeypatch, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train.main(args(setup, a, "--steps", "6", "--lr", "1e-2"))
    log_a = capsys.readouterr().out
    losses = logged_losses(log_a)
    assert len(losses) == 6 and losses[-1] < losses[0]

    real = train.save_checkpoint

    def killed_after_step_2(path, model, opt, step, cfg):
        real(path, model, opt, step, cfg)
        if step == 2:
            raise KeyboardInterrupt  # as if the run were killed right after its checkpoint

    monkeypatch.setattr(train, "save_checkpoint", killed_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        train.main(args(setup, b, "--steps", "6", "--lr", "1e-2"))
    monkeypatch.setattr(train, "save_checkpoint", real)
    with pytest.raises(SystemExit, match="pass --resume"):
        train.main(args(setup, b, "--steps", "6", "--lr", "1e-2"))
    capsys.readouterr()
    train.main(args(setup, b, "--steps", "6", "--lr", "1e-2", "--resume"))
    log_b = capsys.readouterr().out
    assert "resumed" in log_b
    last = lambda log: [l.split("lr")[0] for l in log.splitlines() if l.startswith("step     6")]
    assert last(log_a) == last(log_b)  # same losses after resuming
    ta, tb = (load_file(os.path.join(d, "checkpoint.safetensors")) for d in (a, b))
    assert ta.keys() == tb.keys() and any(k.startswith("optim.") for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_config_json_is_read_once_per_run(setup, tmp_path, monkeypatch):
    """train.py reads it once and passes it down: to the model loader and the data pipeline."""
    reads, real = [], load_qwen.load_config
    for module in (train, data, load_qwen):
        monkeypatch.setattr(module, "load_config", lambda path: reads.append(path) or real(path))
    train.main(args(setup, str(tmp_path / "run"), "--steps", "1", "--warmup", "0"))
    assert reads == [setup[0]]


def test_checkpoint_from_another_variant_is_refused(setup, tmp_path):
    out = str(tmp_path / "run")
    train.main(args(setup, out, "--steps", "2"))
    model = load_ouroboros(setup[0], 1, 2, 1, rank=8, variant="static")
    with pytest.raises(CheckpointError, match="same --variant"):
        load_checkpoint(os.path.join(out, "checkpoint.safetensors"), model)
    ckpt = os.path.join(out, "checkpoint.safetensors")
    model = load_ouroboros(setup[0], 1, 2, 1, rank=8)
    good = load_file(ckpt)
    name = next(k for k in good if k.endswith(".exp_avg"))
    for k, t in [(name, good[name][:1]), ("model.gate.proj.bias", torch.full_like(good["model.gate.proj.bias"], math.nan)),
                 ("optim.gate.proj.bias.unknown", torch.zeros(1))]:
        save_file({**good, k: t}, ckpt, metadata={"step": "2"})
        with pytest.raises(CheckpointError, match=f"{k} .* unexpected, of the wrong shape or not finite"):
            load_checkpoint(ckpt, model)
    open(ckpt, "wb").write(b"broken")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(ckpt, model)


def logged_losses(text):
    return [float(l.split("  loss ")[1].split()[0]) for l in text.splitlines() if l.startswith("step") and "  loss " in l]


def test_ddp_on_two_processes_matches_one_process(setup, tmp_path, capsys):
    """torchrun, gloo, 2 x batch 2 must train as 1 x batch 4 (same windows, gradients averaged).
    Compared through the losses and each tensor's relative change, not element-wise: AdamW turns
    summation-order noise in near-zero gradients into lr-sized steps on those few elements."""
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    train.main(args(setup, single, "--batch-size", "4", "--steps", "4", "--lr", "1e-2"))
    want = logged_losses(capsys.readouterr().out)
    script = tmp_path / "run_ddp.py"  # train.main with the test's private token cache
    script.write_text("import sys, data, train\ndata.CACHE = sys.argv[1]\ntrain.main(sys.argv[2:])\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(script), setup[2], *args(setup, ddp, "--batch-size", "2", "--steps", "4", "--lr", "1e-2")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = logged_losses(done.stdout)
    assert len(got) == len(want) == 4 and want[-1] < want[0]
    assert max(abs(a - b) for a, b in zip(got, want)) <= 2e-4  # printed to 4 decimals
    a, b = (load_file(os.path.join(d, "checkpoint.safetensors")) for d in (single, ddp))
    init = dict(load_ouroboros(setup[0], 1, 2, 1, rank=8).named_parameters())
    for k in (k for k in a if k.startswith("model.")):
        change = (a[k] - init[k[len("model."):]]).norm()
        assert (a[k] - b[k]).norm() <= 0.01 * change + 1e-7, k


def test_eval_writes_table_json_and_plot(setup, tmp_path, capsys):
    runs = []
    for seed, variant in ((0, "controller"), (1, "controller"), (0, "static")):
        out = str(tmp_path / f"{variant}{seed}")
        train.main(args(setup, out, "--steps", "2", "--seed", str(seed), "--variant", variant))
        runs.append(out)
    capsys.readouterr()
    res = tmp_path / "res"
    cmd = ["--run", *runs, "--depths", "1,2", "--windows", "4", "--out", str(res), "--json", "--precision", "fp32",
           "--against", "static-r8,pruned"]
    evaluation.main(cmd)
    result = json.loads(capsys.readouterr().out)
    ref = result["reference"]["held_out"]["t+1"]
    model, corpus, cache = setup  # the reference and a run, recomputed independently on the same windows
    held = data.Windows(data.load_splits([corpus], model, 0.05, cache=cache)[1], 32)
    x, y = held.batch(held.spread(4))
    run0, _ = load_qwen.load_run(runs[0])
    with torch.no_grad():
        full = load_model(model)
        assert max(abs(full(x[i:i + 1], labels=y[i:i + 1]).item() - ref["full"][i]) for i in range(4)) < 1e-5
        assert max(abs(run0(x[i:i + 1], depth=2, labels=y[i:i + 1]).item() - result["runs"][0]["held_out"]["t+1"]["2"][i])
                   for i in range(4)) < 1e-5
    assert ref["full"] != ref["pruned"] and list(result["reference"]["train"]) == ["t+1"]
    assert [(r["variant"], r["seed"]) for r in result["runs"]] == [("controller-causal-r8", 0), ("controller-causal-r8", 1),
                                                                   ("static-r8", 0)]
    table = open(res / "results.md").read()
    row = [l for l in table.split("held-out documents")[1].splitlines() if l.startswith("| controller-causal-r8 | 2 | 2 |")][0]
    pooled = np.mean([result["runs"][i]["held_out"]["t+1"]["2"] for i in (0, 1)], 0)
    static = np.array(result["runs"][2]["held_out"]["t+1"]["2"])
    diff, low, high = evaluation.bootstrap(pooled - static)  # paired: window by window
    assert f"{pooled.mean():.3f} [" in row and f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]" in row
    diff, low, high = evaluation.bootstrap(pooled - np.array(ref["pruned"]))
    assert f"| {diff:+.3f} [{low:+.3f}, {high:+.3f}]" in row  # and vs the pruned baseline
    seed_diffs = [np.mean(np.array(result["runs"][i]["held_out"]["t+1"]["2"]) - ref["pruned"]) for i in (0, 1)]
    assert f", {sum(x > 0 for x in seed_diffs) if diff > 0 else sum(x < 0 for x in seed_diffs)}/2 seeds |" in row
    (summary,) = [r for r in result["summary"] if (r["split"], r["model"], r["depth"]) == ("held_out", "controller-causal-r8", 2)]
    assert np.allclose(list(summary["seed_diffs"]["pruned"].values()), seed_diffs)
    assert np.allclose(summary["seed_diffs"]["static-r8"]["0"], np.mean(result["runs"][0]["held_out"]["t+1"]["2"]) - static.mean())
    seeds = [np.mean(result["runs"][i]["held_out"]["t+1"]["2"]) for i in (0, 1)]
    assert f"| {np.std(seeds, ddof=1):.3f} |" in row
    pruned, full = np.mean(ref["pruned"]), np.mean(ref["full"])
    assert f"{100 * (pruned - pooled.mean()) / (pruned - full):.1f}%" in row
    assert "| Δ vs static-r8 [95% CI] | Δ vs pruned [95% CI] |" in table and (res / "results.png").stat().st_size > 1000
    # The losses are cached: a second table reads them back (nothing is recomputed) and says the same.
    cached = (res / "reference-losses.json").stat().st_mtime_ns, (tmp_path / "controller0" / "eval-losses.json").stat().st_mtime_ns
    evaluation.main(cmd)
    assert json.loads(capsys.readouterr().out)["runs"] == result["runs"]
    assert cached == ((res / "reference-losses.json").stat().st_mtime_ns,
                      (tmp_path / "controller0" / "eval-losses.json").stat().st_mtime_ns)
    evaluation.main([a if a != "1,2" else "2" for a in cmd])  # other depths: the runs are recomputed, not the references
    again = json.loads(capsys.readouterr().out)
    assert (tmp_path / "controller0" / "eval-losses.json").stat().st_mtime_ns != cached[1]
    assert (res / "reference-losses.json").stat().st_mtime_ns == cached[0]
    assert again["runs"][0]["held_out"]["t+1"]["2"] == result["runs"][0]["held_out"]["t+1"]["2"]
    with pytest.raises(SystemExit, match="--against gate: no run of that variant; give pruned, full or one of "
                                         "controller-causal-r8, static-r8"):
        evaluation.main(cmd[:-1] + ["gate"])
    with pytest.raises(SystemExit, match="are both static-r8, both seed 0: a variant's runs must differ in --seed only"):
        evaluation.main(cmd + ["--run", runs[2], runs[2]])
    train.main(args(setup, str(tmp_path / "longer"), "--steps", "3", "--variant", "static"))
    with pytest.raises(SystemExit, match="are both static-r8, trained with different steps"):
        evaluation.main(cmd + ["--run", runs[2], str(tmp_path / "longer")])


def test_label_offset_2_trains_on_token_t_plus_2(setup, tmp_path, monkeypatch, capsys):
    """--label-offset 2 (the authors' objective, on purpose): every training batch's labels are the tokens
    two ahead of the inputs (this fails for next-token labels), the run records it, and eval.py scores
    the run on both its own objective and the next token."""
    seen = []
    forward = Ouroboros.forward
    monkeypatch.setattr(Ouroboros, "forward", lambda self, x, depth, labels=None: (
        torch.is_grad_enabled() and seen.append((x, labels))) or forward(self, x, depth, labels))
    out = str(tmp_path / "t2")
    train.main(args(setup, out, "--steps", "2", "--label-offset", "2"))
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
    held = data.Windows(data.load_splits([corpus], model, 0.05, cache=cache)[1], 32, 2)
    x, (y1, y2) = held.batch(held.spread(2), offsets=[1, 2])
    run, _ = load_qwen.load_run(out)
    with torch.no_grad():
        for name, y in (("t+1", y1), ("t+2", y2)):
            got = result["runs"][0]["held_out"][name]["2"]
            assert max(abs(run(x[i:i + 1], depth=2, labels=y[i:i + 1]).item() - got[i]) for i in range(2)) < 1e-5


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
    result = {"model": "m", "split": "1 + [1] + 1", "windows": 4, "seq_len": 8, "depths": [1],
              "reference": {"train": ref, "held_out": ref},
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


def test_bootstrap_interval_on_known_answers():
    """Constant differences: the interval is that constant. Normal data: the interval has the textbook
    width (2 x 1.96 sd / sqrt(n)) and covers the true mean about 95% of the time."""
    assert evaluation.bootstrap([0.25] * 40) == (0.25, 0.25, 0.25)
    rng = np.random.default_rng(1)
    m, lo, hi = evaluation.bootstrap(rng.normal(0.3, 1.0, 4000), samples=4000)
    assert lo < 0.3 < hi and abs((hi - lo) - 2 * 1.96 / math.sqrt(4000)) < 0.1 * (hi - lo)
    covered = 0
    for seed in range(200):
        lo, hi = evaluation.bootstrap(rng.normal(0.3, 1.0, 60), samples=2000, seed=seed)[1:]
        covered += lo < 0.3 < hi
    assert 180 <= covered <= 198  # 95% of 200 is 190; the percentile bootstrap runs a little narrow at n = 60


def test_dry_run_qwen25_3b_counts(tmp_path, capsys):
    """The paper's 3B configuration: 9,214,592 trainable parameters (its 9.2M less two unused vectors)."""
    cfg = {"model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
           "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6,
           "rope_theta": 1000000.0, "tie_word_embeddings": True, "max_position_embeddings": 32768,
           "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 70, "hidden_act": "silu"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    train.main(["--model", str(tmp_path), "--dry-run", "--prelude", "8", "--recurrent", "18", "--coda", "8", "--rank", "32"])
    out = capsys.readouterr().out
    total = [l for l in out.splitlines() if l.startswith("total")][0]
    assert total.split()[-1] == "9,214,592"
    assert "19 removed" in out and "1,662,976" in out  # the SVD bases: 7 targets x r x (in + out)


@pytest.mark.parametrize("extra,message", [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--warmup", "4"], r"--warmup 4 must be in 0..3"),
    (["--held-out", "1.5"], "--held-out 1.5 must be a fraction"),
    (["--depths", "4,x"], "give comma-separated integers"),
    (["--depths", "65"], "each depth must be in 1..64"),
    (["--seq-len", "100000"], "longer than the model's context"),
    (["--recurrent", "0"], "error: recurrent layer 0 must lie between"),
    (["--data", "/nonexistent/*.txt"], "matches no files"),
    (["--device", "cuda:99"], "--device cuda:99: no such device here"),
    (["--lr", "nan"], "--lr must be positive"),
])
def test_impossible_settings_fail_with_one_clear_error(setup, tmp_path, extra, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=message):
        train.main(args(setup, str(out), *extra))
    assert not (out / "checkpoint.safetensors").exists()


def test_eval_of_a_run_without_checkpoint(setup, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(vars(train.TrainConfig(model=setup[0], data=(setup[1],), prelude=1, recurrent=2, coda=1, rank=8))))
    with pytest.raises(SystemExit, match="has not saved a checkpoint"):
        evaluation.main(["--run", str(out), "--depths", "1", "--windows", "2"])


def test_eval_reports_a_bad_run_config_in_one_line(setup, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model": setup[0], "seed": 0}))
    with pytest.raises(SystemExit, match="config.json lacks data, held_out, .*: it was not written by train.py"):
        evaluation.main(["--run", str(out), "--depths", "1", "--windows", "2"])
    (out / "config.json").write_text(json.dumps(vars(train.TrainConfig(model=setup[0], data=(setup[1],)))))
    with pytest.raises(SystemExit, match="error: prelude 8 \\+ coda 8 must leave room"):
        evaluation.main(["--run", str(out), "--depths", "1", "--windows", "2"])


# ----------------------------------------------------------------------------------------------
# never losing good work: non-finite updates, signals, failed saves, defaults that fit

def snapshots(monkeypatch):
    """Wrap train.save_checkpoint: {step: the file's bytes right after that save}."""
    real, saved = train.save_checkpoint, {}

    def save(path, model, opt, step, cfg):
        real(path, model, opt, step, cfg)
        saved[step] = open(path, "rb").read()
    monkeypatch.setattr(train, "save_checkpoint", save)
    return saved


def optim_steps(path):
    return {t.item() for k, t in load_file(path).items() if k.endswith(".step")}


def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path, monkeypatch, capsys):
    """The LR jumps to 1e6 after step 2 (as with --lr 1e6): the next loss is NaN, three skipped
    updates in a row stop the run, and the checkpoint on disk is still step 2's, finite."""
    out = str(tmp_path / "run")
    saved = snapshots(monkeypatch)
    real_lr = train.lr_at
    monkeypatch.setattr(train, "lr_at", lambda step, cfg: real_lr(step, cfg) if step < 2 else 1e6)
    with pytest.raises(SystemExit, match=r"steps 4..6 all had a non-finite loss .* lower --lr .* holds step 2"):
        train.main(args(setup, out, "--steps", "8"))
    log = capsys.readouterr().out
    assert log.count("update skipped") == 3 and "step     3/8  loss" in log  # step 3 itself was finite
    ckpt = os.path.join(out, "checkpoint.safetensors")
    assert list(saved) == [2] and open(ckpt, "rb").read() == saved[2]
    assert all(torch.isfinite(t).all() for t in load_file(ckpt).values())


def test_one_non_finite_step_is_skipped_without_touching_adamw(setup, tmp_path, monkeypatch, capsys):
    """A NaN loss at step 2 only: that update is skipped (AdamW's step count shows opt.step() ran 3
    times in 4 steps), the run goes on, its log loss leaves the NaN out, and it saves finite tensors."""
    real = train.load_ouroboros
    calls = []

    def poisoned(*a, **k):
        model = real(*a, **k)
        forward = model.forward

        def once_nan(*args, **kwargs):
            calls.append(1)
            out = forward(*args, **kwargs)
            return out * float("nan") if len(calls) == 2 else out
        model.forward = once_nan
        return model
    monkeypatch.setattr(train, "load_ouroboros", poisoned)
    out = str(tmp_path / "run")
    train.main(args(setup, out, "--steps", "4"))
    log = capsys.readouterr().out
    assert "non-finite loss or gradient norm (1 so far)" in log and all(math.isfinite(x) for x in logged_losses(log)[2:])
    ckpt = os.path.join(out, "checkpoint.safetensors")
    assert optim_steps(ckpt) == {3.0}
    assert all(torch.isfinite(t).all() for t in load_file(ckpt).values())


def test_a_skipped_last_step_still_saves_the_final_step(setup, tmp_path, monkeypatch, capsys):
    """A NaN loss at the last of 4 steps: that update is skipped, and the final save still writes
    step 4 (the weights of step 3, the last good update: AdamW stepped 3 times), not step 2's file."""
    real = train.load_ouroboros

    def poisoned(*a, **k):
        model = real(*a, **k)
        forward, calls = model.forward, []

        def last_nan(*args, **kwargs):
            calls.append(1)  # held-out evals only at the end: calls 1..4 are the 4 training steps
            return forward(*args, **kwargs) * (float("nan") if len(calls) == 4 else 1.0)
        model.forward = last_nan
        return model
    monkeypatch.setattr(train, "load_ouroboros", poisoned)
    out = str(tmp_path / "run")
    train.main(args(setup, out, "--steps", "4", "--eval-interval", "100"))
    assert "step     4/4  update skipped" in capsys.readouterr().out
    ckpt = os.path.join(out, "checkpoint.safetensors")
    with safe_open(ckpt, "pt") as f:
        assert f.metadata()["step"] == "4"
    assert optim_steps(ckpt) == {3.0}


def test_a_signal_after_the_last_step_check_is_honoured(setup, tmp_path, monkeypatch):
    """SIGTERM during the final save (after the last per-step check): the checkpoint holds the final
    step, and the run exits 143 instead of going on to eval.py."""
    real = train.save_checkpoint

    def save(path, model, opt, step, cfg):
        real(path, model, opt, step, cfg)
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # deferred: noted, not obeyed at once
    monkeypatch.setattr(train, "save_checkpoint", save)
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        train.main(args(setup, out))
    assert e.value.code == 128 + signal.SIGTERM
    assert optim_steps(os.path.join(out, "checkpoint.safetensors")) == {4.0}


def test_a_failed_save_keeps_the_previous_checkpoint(setup, tmp_path, monkeypatch, capsys):
    """The disk fills up at step 4: one line, the step-2 checkpoint intact, no temporary file left,
    training goes on. The final save failing too ends the run with an error. --steps 5 with the
    default warmup (0 for a run this short) also runs."""
    out = tmp_path / "run"
    saved = snapshots(monkeypatch)

    class FullDisk(io.FileIO):  # what a full disk does to a write: part of it lands, then ENOSPC
        def write(self, b):
            super().write(bytes(b)[:100])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def disk_fills_after_step_2(file, mode="r", **kw):
        full = file.endswith("checkpoint.safetensors.tmp") and 2 in saved
        return FullDisk(file, mode) if full else open(file, mode, **kw)
    monkeypatch.setattr(load_qwen, "open", disk_fills_after_step_2, raising=False)  # write_atomic's writes
    with pytest.raises(SystemExit, match=r"error: could not save .* at step 5 .*No space left.* holds step 2"):
        train.main(args(setup, str(out), "--steps", "5"))
    log = capsys.readouterr().out
    assert "could not save" in log and "holds step 2; training goes on" in log and "step     5/5  loss" in log
    assert sorted(os.listdir(out)) == ["checkpoint.safetensors", "config.json"]  # no .tmp left behind
    assert open(out / "checkpoint.safetensors", "rb").read() == saved[2]
    assert json.load(open(out / "config.json"))["warmup"] == 0


def test_warmup_follows_short_runs_but_not_the_default_run():
    assert train.parse_args([])[0].warmup == 10                      # the default run is unchanged
    assert [train.parse_args(["--steps", n])[0].warmup for n in ("5", "40", "1000")] == [0, 5, 10]
    assert train.parse_args(["--steps", "5", "--warmup", "2"])[0].warmup == 2
    with pytest.raises(SystemExit, match="--warmup 5 must be in 0..4"):
        train.check(train.parse_args(["--steps", "5", "--warmup", "5"])[0], False)


SLOW_TRAIN = """import sys, time, data, train
data.CACHE = sys.argv[1]
lr_at = train.lr_at
train.lr_at = lambda step, cfg: time.sleep(0.3) or lr_at(step, cfg)  # room for the signal to land mid-run
train.main(sys.argv[2:])
"""


def test_sigterm_saves_and_resume_equals_an_uninterrupted_run(setup, tmp_path, capsys):
    """A real train.py process gets SIGTERM after its step-2 checkpoint: it finishes the step it is in,
    saves, exits 143; --resume then ends on exactly the tensors of a run never interrupted."""
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    script = tmp_path / "slow_train.py"
    script.write_text(SLOW_TRAIN)
    cmd = [sys.executable, str(script), setup[2], *args(setup, cut, "--steps", "8", "--lr", "1e-2")]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step     2/8"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped = int(rest.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert 2 <= stopped < 8 and "Traceback" not in err
    assert optim_steps(os.path.join(cut, "checkpoint.safetensors")) == {float(stopped)}
    train.main(args(setup, cut, "--steps", "8", "--lr", "1e-2", "--resume"))
    train.main(args(setup, whole, "--steps", "8", "--lr", "1e-2"))
    a, b = (load_file(os.path.join(d, "checkpoint.safetensors")) for d in (whole, cut))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bf16_path_on_the_cpu_trains_fp32_masters_over_a_frozen_bf16_base(setup, tmp_path, monkeypatch, capsys):
    """--precision bf16 runs what a GPU runs: bf16 base weights, bf16 autocast, fp32 trainable masters."""
    dtype, autocast = precision(torch.device("cpu"), "bf16")
    assert dtype == torch.bfloat16 and autocast.fast_dtype == torch.bfloat16 and autocast._enabled
    real, built = train.load_ouroboros, []
    monkeypatch.setattr(train, "load_ouroboros", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    train.main(args(setup, str(tmp_path / "run"), "--steps", "6", "--lr", "1e-2", "--precision", "bf16"))
    losses = logged_losses(capsys.readouterr().out)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05
    model = built[0]
    trained = train.trainable(model)
    assert trained and all(p.dtype == torch.float32 for p in trained.values())
    torch.manual_seed(0)  # the run's seed: the same initial trainable tensors
    fresh = load_ouroboros(setup[0], 1, 2, 1, rank=8, dtype=torch.bfloat16)
    frozen = {n: p for n, p in model.named_parameters() if n not in trained}
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen.values())
    for n, p in fresh.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    start = dict(fresh.named_parameters())
    assert all(not torch.equal(p, start[n]) for n, p in trained.items())


def test_out_naming_a_file_and_every_bad_setting_at_once(setup, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    with pytest.raises(SystemExit) as e:
        train.main(args(setup, str(file), "--steps", "0", "--save-interval", "0", "--depths", "x"))
    msg = str(e.value)
    assert msg.count("\n") == 0 and all(m in msg for m in (
        "is a file", "--steps must be at least 1", "--save-interval must be at least 1", "comma-separated"))
    assert file.read_text() == "keep me"
    with pytest.raises(SystemExit, match="holds no checkpoint to continue"):
        train.main(args(setup, str(tmp_path / "new"), "--resume"))


def test_sigterm_to_one_torchrun_process_stops_all_at_the_same_step(setup, tmp_path):
    """Only rank 1 gets SIGTERM; rank 0 learns of it through the per-step flag, stops after the same
    step, saves that step and exits 143 (a rank that stopped alone would leave the other hanging)."""
    out = str(tmp_path / "ddp")
    script = tmp_path / "slow_train.py"
    script.write_text("import os, sys\nopen(os.path.join(sys.argv[2], 'pid' + os.environ['RANK']), 'w').write(str(os.getpid()))\n"
                      "sys.argv.pop(2)\n" + SLOW_TRAIN)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
           str(script), setup[2], str(tmp_path), *args(setup, out, "--batch-size", "2", "--steps", "12")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step     2/12"):
            os.kill(int((tmp_path / "pid1").read_text()), signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "exitcode  : 143" in err, rest + err[:1500]
    stopped = int(rest.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert 2 <= stopped < 12
    assert optim_steps(os.path.join(out, "checkpoint.safetensors")) == {float(stopped)}
