"""The training loop, resume, DDP and the guards, on a tiny model and corpus (eval.py: test_eval.py;
the data pipeline: test_data.py)."""
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
import run
import train
from conftest import logged_losses, ouroboros, train_args
from load_qwen import CheckpointError
from run import load_checkpoint, placement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def private_cache(setup, monkeypatch):
    monkeypatch.setattr(data, "CACHE", setup[2])


def test_loss_is_shifted_exactly_once(setup):
    """The training loss must be the loss of predicting token t+1. The authors' code shifted the
    already-shifted labels again and trained on t+2; this test fails for that mistake."""
    model = ouroboros(setup[0], prelude=1, recurrent=2, coda=1, rank=8)
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
    cfg = run.TrainConfig(lr=1.0, warmup=10, steps=110, min_lr_ratio=0.1)
    lrs = [train.lr_at(s, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55, abs=0.01) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_training_lowers_the_loss_and_resume_is_exact(setup, tmp_path, monkeypatch, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train.main(train_args(setup, a, "--steps", "6", "--lr", "1e-2"))
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
        train.main(train_args(setup, b, "--steps", "6", "--lr", "1e-2"))
    monkeypatch.setattr(train, "save_checkpoint", real)
    with pytest.raises(ValueError, match="pass --resume"):
        train.main(train_args(setup, b, "--steps", "6", "--lr", "1e-2"))
    capsys.readouterr()
    train.main(train_args(setup, b, "--steps", "6", "--lr", "1e-2", "--resume"))
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
    import load_qwen
    reads, real = [], load_qwen.load_config
    for module in (train, data, load_qwen):
        monkeypatch.setattr(module, "load_config", lambda path: reads.append(path) or real(path))
    train.main(train_args(setup, str(tmp_path / "run"), "--steps", "1", "--warmup", "0"))
    assert reads == [setup[0]]


def test_checkpoint_from_another_variant_is_refused(setup, tmp_path):
    out = str(tmp_path / "run")
    train.main(train_args(setup, out, "--steps", "2"))
    model = ouroboros(setup[0], prelude=1, recurrent=2, coda=1, rank=8, variant="static")
    with pytest.raises(CheckpointError, match="same --variant"):
        load_checkpoint(os.path.join(out, "checkpoint.safetensors"), model)
    ckpt = os.path.join(out, "checkpoint.safetensors")
    model = ouroboros(setup[0], prelude=1, recurrent=2, coda=1, rank=8)
    good = load_file(ckpt)
    name = next(k for k in good if k.endswith(".exp_avg"))
    nan = torch.full_like(good["model.gate.proj.bias"], math.nan)
    for k, t in [(name, good[name][:1]), ("model.gate.proj.bias", nan),
                 ("optim.gate.proj.bias.unknown", torch.zeros(1))]:
        save_file({**good, k: t}, ckpt, metadata={"step": "2"})
        with pytest.raises(CheckpointError, match=f"{k} .* unexpected, of the wrong shape or not finite"):
            load_checkpoint(ckpt, model)
    open(ckpt, "wb").write(b"broken")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(ckpt, model)


def test_ddp_on_two_processes_matches_one_process(setup, tmp_path, capsys):
    """torchrun, gloo, 2 x batch 2 must train as 1 x batch 4 (same windows, gradients averaged).
    Compared through the losses and each tensor's relative change, not element-wise: AdamW turns
    summation-order noise in near-zero gradients into lr-sized steps on those few elements."""
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    train.main(train_args(setup, single, "--batch-size", "4", "--steps", "4", "--lr", "1e-2"))
    want = logged_losses(capsys.readouterr().out)
    script = tmp_path / "run_ddp.py"  # train.main with the test's private token cache
    script.write_text("import sys, data, train\ndata.CACHE = sys.argv[1]\ntrain.main(sys.argv[2:])\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(script), setup[2], *train_args(setup, ddp, "--batch-size", "2", "--steps", "4", "--lr", "1e-2")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = logged_losses(done.stdout)
    assert len(got) == len(want) == 4 and want[-1] < want[0]
    assert max(abs(a - b) for a, b in zip(got, want)) <= 2e-4  # printed to 4 decimals
    a, b = (load_file(os.path.join(d, "checkpoint.safetensors")) for d in (single, ddp))
    init = dict(ouroboros(setup[0], prelude=1, recurrent=2, coda=1, rank=8).named_parameters())
    for k in (k for k in a if k.startswith("model.")):
        change = (a[k] - init[k[len("model."):]]).norm()
        assert (a[k] - b[k]).norm() <= 0.01 * change + 1e-7, k






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
    with pytest.raises(ValueError, match=r"steps 4..6 all had a non-finite loss .* lower --lr .* holds step 2"):
        train.main(train_args(setup, out, "--steps", "8"))
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
    train.main(train_args(setup, out, "--steps", "4"))
    log = capsys.readouterr().out
    assert "non-finite loss or gradient norm (1 so far)" in log
    assert all(math.isfinite(x) for x in logged_losses(log)[2:])
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
    train.main(train_args(setup, out, "--steps", "4", "--eval-interval", "100"))
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
        train.main(train_args(setup, out))
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
    monkeypatch.setattr(run, "open", disk_fills_after_step_2, raising=False)  # write_atomic's writes
    with pytest.raises(OSError, match=r"could not save .* at step 5 .*No space left.* holds step 2"):
        train.main(train_args(setup, str(out), "--steps", "5"))
    log = capsys.readouterr().out
    assert "could not save" in log and "holds step 2; training goes on" in log and "step     5/5  loss" in log
    assert sorted(os.listdir(out)) == ["checkpoint.safetensors", "config.json", "lock"]  # no .tmp left behind
    assert open(out / "checkpoint.safetensors", "rb").read() == saved[2]
    assert json.load(open(out / "config.json"))["warmup"] == 0


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
    cmd = [sys.executable, str(script), setup[2], *train_args(setup, cut, "--steps", "8", "--lr", "1e-2")]
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
    train.main(train_args(setup, cut, "--steps", "8", "--lr", "1e-2", "--resume"))
    train.main(train_args(setup, whole, "--steps", "8", "--lr", "1e-2"))
    a, b = (load_file(os.path.join(d, "checkpoint.safetensors")) for d in (whole, cut))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bf16_path_on_the_cpu_trains_fp32_masters_over_a_frozen_bf16_base(setup, tmp_path, monkeypatch, capsys):
    """--precision bf16 runs what a GPU runs: bf16 base weights, bf16 autocast, fp32 trainable masters."""
    _, dtype, autocast = placement("cpu", "bf16")
    assert dtype == torch.bfloat16 and autocast.fast_dtype == torch.bfloat16 and autocast._enabled
    real, built = train.load_ouroboros, []
    monkeypatch.setattr(train, "load_ouroboros", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    train.main(train_args(setup, str(tmp_path / "run"), "--steps", "6", "--lr", "1e-2", "--precision", "bf16"))
    losses = logged_losses(capsys.readouterr().out)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05
    model = built[0]
    trained = model.trainable()
    assert trained and all(p.dtype == torch.float32 for p in trained.values())
    torch.manual_seed(0)  # the run's seed: the same initial trainable tensors
    fresh = ouroboros(setup[0], dtype=torch.bfloat16, prelude=1, recurrent=2, coda=1, rank=8)
    frozen = {n: p for n, p in model.named_parameters() if n not in trained}
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen.values())
    for n, p in fresh.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    start = dict(fresh.named_parameters())
    assert all(not torch.equal(p, start[n]) for n, p in trained.items())


def test_sigterm_to_one_torchrun_process_stops_all_at_the_same_step(setup, tmp_path):
    """Only rank 1 gets SIGTERM; rank 0 learns of it through the per-step flag, stops after the same
    step, saves that step and exits 143 (a rank that stopped alone would leave the other hanging)."""
    out = str(tmp_path / "ddp")
    script = tmp_path / "slow_train.py"
    script.write_text("import os, sys\n"
                      "open(os.path.join(sys.argv[2], 'pid' + os.environ['RANK']), 'w').write(str(os.getpid()))\n"
                      "sys.argv.pop(2)\n" + SLOW_TRAIN)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
           str(script), setup[2], str(tmp_path), *train_args(setup, out, "--batch-size", "2", "--steps", "12")]
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
