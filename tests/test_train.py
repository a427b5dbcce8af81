"""Training (train.py) on a tiny model and corpus: it lowers the loss; a resumed run is the run never interrupted, bit
for bit; two processes train as one; a bad update is skipped and a diverging run stops with its last good checkpoint;
signals stop every process at the same step; --out and --resume refuse what would damage or change a run. Every run
is pinned to the CPU (train_args), except those marked cuda."""
import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train
from conftest import ROOT, logged_losses, needs_cuda, ouroboros, train_args
from load_qwen import load_ouroboros
from model import OuroborosConfig
from train import TrainConfig, lr_at, parse, placement, read_config

# train.py in a fresh process, its token cache the first argument; SLOW=seconds sleeps before every step (room for a
# signal to land mid-run), PIDS=folder writes each process's pid there as pid<RANK>.
TRAIN = """import os, sys, time
sys.path.insert(0, {root!r})
import data, train
data.CACHE = sys.argv.pop(1)
if os.environ.get("PIDS"):
    with open(os.path.join(os.environ["PIDS"], "pid" + os.environ.get("RANK", "0")), "w") as f:
        f.write(str(os.getpid()))
if os.environ.get("SLOW"):
    lr_at = train.lr_at
    train.lr_at = lambda step, cfg: time.sleep(float(os.environ["SLOW"])) or lr_at(step, cfg)
train.cli(train.main, sys.argv[1:])
"""


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("script") / "train_with_cache.py"
    path.write_text(TRAIN.format(root=ROOT))
    return str(path)


def torchrun(n, script, setup, *argv):
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", port, script,
            setup[2], *argv]


def env(**kw):
    return dict(os.environ, OMP_NUM_THREADS="1", **kw)


def main(argv):
    """train.main(argv); its log (stdout)."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        train.main(argv)
    return out.getvalue()


def checkpoint(run):
    return load_file(os.path.join(run, "checkpoint.safetensors"))


def saved_step(run):
    with safe_open(os.path.join(run, "checkpoint.safetensors"), "pt") as f:
        return int(f.metadata()["step"])


def optimiser_steps(run):
    """How many times AdamW stepped, from its saved state."""
    return {t.item() for k, t in checkpoint(run).items() if k.endswith(".step")}


def assert_same_checkpoint(a, b):
    ta, tb = checkpoint(a), checkpoint(b)
    assert ta.keys() == tb.keys() and any(k.startswith("optim.") for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert saved_step(a) == saved_step(b)


RUN = ("--steps", "6", "--lr", "1e-2")  # the run every resumed run below must end on


def killed_then_resumed(setup, out, monkeypatch, *flags):
    """Train into `out`, killed during step 3 (its checkpoint holds step 2), then --resume: the resumed log."""
    def killed_at_step_3(step, cfg):
        if step == 2:
            raise KeyboardInterrupt  # as a kill would, with nothing saved
        return lr_at(step, cfg)
    monkeypatch.setattr(train, "lr_at", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        main(train_args(setup, out, *flags))
    monkeypatch.setattr(train, "lr_at", lr_at)
    assert saved_step(out) == 2
    with pytest.raises(ValueError, match="exists: pass --resume to continue that run, or another --out"):
        main(train_args(setup, out, *flags))
    return main(train_args(setup, out, *flags, "--resume"))


@pytest.fixture(scope="module")
def whole(setup, tmp_path_factory):
    """(folder, log) of a 6-step run (save every 2) never interrupted."""
    out = str(tmp_path_factory.mktemp("whole") / "run")
    return out, main(train_args(setup, out, *RUN))


# ----------------------------------------------------------------------------------------------
# it trains, and a resumed run is the same run

def test_lr_schedule_warms_up_then_decays_per_optimiser_step():
    cfg = TrainConfig(lr=1.0, warmup=10, steps=110, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55, abs=0.01) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert parse(["--steps", "80"])[0].warmup == 10 and parse(["--steps", "5"])[0].warmup == 0  # min(10, steps // 8)


def test_training_lowers_the_loss(whole):
    out, log = whole
    losses = logged_losses(log)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1
    held = [float(line.split("  held-out ")[1].split()[0]) for line in log.splitlines() if "  held-out " in line]
    assert len(held) == 3 and held[-1] < held[0]  # steps 2, 4, 6
    assert saved_step(out) == 6 and optimiser_steps(out) == {6.0}
    assert all(torch.isfinite(t).all() for t in checkpoint(out).values())


def test_resume_after_a_kill_between_saves_is_exact(setup, whole, tmp_path, monkeypatch):
    """Killed during step 3 (its checkpoint holds step 2): --resume redoes steps 3..6 and ends on exactly the
    tensors, AdamW's moments included, and the logged loss of the run never interrupted."""
    out = str(tmp_path / "run")
    log = killed_then_resumed(setup, out, monkeypatch, *RUN)
    assert "; from step 2" in log and "step     2/6" not in log and "step     3/6" in log
    assert logged_losses(log) == logged_losses(whole[1])[2:]
    assert_same_checkpoint(out, whole[0])


def test_sigterm_finishes_the_step_saves_and_resume_is_exact(setup, whole, script, tmp_path):
    """A real train.py process gets SIGTERM after step 2: it finishes the step it is in, saves, exits 143; --resume
    then ends on exactly the tensors of the run never interrupted."""
    out = str(tmp_path / "cut")
    proc = subprocess.Popen([sys.executable, script, setup[2], *train_args(setup, out, *RUN)], env=env(SLOW="0.3"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step     2/6"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped = int(rest.split("stopped by SIGTERM after step ")[1].split(":")[0])
    assert 2 <= stopped < 6 and "Traceback" not in err
    assert saved_step(out) == stopped and optimiser_steps(out) == {float(stopped)}
    main(train_args(setup, out, *RUN, "--resume"))
    assert_same_checkpoint(out, whole[0])


def test_bf16_on_the_cpu_trains_fp32_masters_over_a_frozen_bf16_base(setup, tmp_path, monkeypatch):
    """--precision bf16 runs what a GPU runs: bf16 base weights, bf16 autocast, fp32 trainable masters."""
    _, dtype, autocast = placement("cpu", "bf16")
    assert dtype == torch.bfloat16 and autocast.fast_dtype == torch.bfloat16 and autocast._enabled
    assert placement("cpu", "auto")[1] == torch.float32  # auto is fp32 on a CPU
    real, built = train.load_ouroboros, []
    monkeypatch.setattr(train, "load_ouroboros", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    losses = logged_losses(main(train_args(setup, str(tmp_path / "run"), "--lr", "1e-2", "--precision", "bf16")))
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.05
    check_fp32_masters_over_bf16(built[0], setup)


def check_fp32_masters_over_bf16(model, setup):
    """What trains is fp32 and moved; what is frozen is bf16 and exactly a fresh load's (the same seed, the same
    device: the controller's initialisation and the SVD are the device's own)."""
    trained = model.trainable()
    assert trained and all(p.dtype == torch.float32 for p in trained.values())
    torch.manual_seed(0)  # the run's seed: the same initial trainable tensors
    oc = OuroborosConfig(prelude=1, recurrent=2, coda=1, rank=8)
    fresh = load_ouroboros(setup[0], oc, torch.bfloat16, model.base.embed_tokens.weight.device)
    frozen = {n: p for n, p in model.named_parameters() if n not in trained}
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen.values())
    for n, p in fresh.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    start = dict(fresh.named_parameters())
    assert all(not torch.equal(p, start[n]) for n, p in trained.items())


# ----------------------------------------------------------------------------------------------
# DistributedDataParallel

def test_ddp_on_two_processes_matches_one_process(setup, whole, script, tmp_path):
    """torchrun, gloo, 2 x batch 2 trains as 1 x batch 4 (the same windows, gradients averaged). Compared through
    the losses and each tensor's relative change, not element-wise: AdamW turns summation-order noise in near-zero
    gradients into lr-sized steps on those few elements."""
    out = str(tmp_path / "ddp")
    done = subprocess.run(torchrun(2, script, setup, *train_args(setup, out, *RUN, "--batch-size", "2")), env=env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got, want = logged_losses(done.stdout), logged_losses(whole[1])
    assert len(got) == len(want) == 6
    assert max(abs(a - b) for a, b in zip(got, want)) <= 2e-4  # printed to 4 decimals
    a, b = checkpoint(whole[0]), checkpoint(out)
    init = dict(ouroboros(setup[0], prelude=1, recurrent=2, coda=1, rank=8).named_parameters())
    for k in (k for k in a if k.startswith("model.")):
        change = (a[k] - init[k[len("model."):]]).norm()
        assert (a[k] - b[k]).norm() <= 0.01 * change + 1e-7, k


def test_sigterm_to_one_torchrun_process_stops_all_at_the_same_step(setup, script, tmp_path):
    """Only rank 1 gets SIGTERM; rank 0 learns of it through the per-step flag, stops after the same step, saves it
    and exits 143 (a rank that stopped alone would leave the other hanging)."""
    out = str(tmp_path / "ddp")
    proc = subprocess.Popen(torchrun(2, script, setup, *train_args(setup, out, "--batch-size", "2", "--steps", "12")),
                            env=env(SLOW="0.3", PIDS=str(tmp_path)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stdout:
        if line.startswith("step     2/12"):
            os.kill(int((tmp_path / "pid1").read_text()), signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "exitcode  : 143" in err, rest + err[-1500:]
    stopped = saved_step(out)  # rank 0 saved the step it stopped after, the last it logged
    assert 2 <= stopped < 12 and optimiser_steps(out) == {float(stopped)}
    assert [line for line in rest.splitlines() if line.startswith("step")][-1].startswith(f"step {stopped:5d}/12")
    # and says so, though it was not signalled itself (7cb7a20's rank 0 logged "trained 12 steps" and exited 0)
    assert f"stopped by SIGTERM after step {stopped}" in rest, rest


# ----------------------------------------------------------------------------------------------
# never losing good work: non-finite updates, signals

@pytest.fixture
def poison(monkeypatch):
    """poison(steps): the training forwards of those optimiser steps (1-based) return NaN."""
    def arm(steps):
        real = train.load_ouroboros

        def poisoned(*a, **k):
            model = real(*a, **k)
            forward, calls = model.forward, []

            def nan_at(*args, **kwargs):
                if torch.is_grad_enabled():  # the training forwards; held-out losses run without grad
                    calls.append(1)
                return forward(*args, **kwargs) * (float("nan") if torch.is_grad_enabled() and len(calls) in steps
                                                   else 1.0)
            model.forward = nan_at
            return model
        monkeypatch.setattr(train, "load_ouroboros", poisoned)
    return arm


def test_a_non_finite_step_is_skipped_without_touching_adamw(setup, tmp_path, poison):
    """A NaN loss at step 2 only: that update is skipped (AdamW stepped 3 times in 4 steps), the run goes on, its
    logged losses leave the NaN out, and it saves finite tensors."""
    poison({2})
    out = str(tmp_path / "run")
    log = main(train_args(setup, out))
    assert "step     2/4  update skipped: a non-finite loss or gradient norm" in log
    losses = dict(zip((1, 3, 4), [loss for loss in logged_losses(log) if loss == loss]))  # leaving a NaN out
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses.values())
    assert saved_step(out) == 4 and optimiser_steps(out) == {3.0}
    assert all(torch.isfinite(t).all() for t in checkpoint(out).values())


def test_a_skipped_step_logs_no_loss_of_its_own(setup, tmp_path, poison):
    """An interval whose every update was skipped has no loss to log: none, or nan, but not a number no step had
    (7cb7a20 logged 0.0000, the empty sum over max(good, 1) steps)."""
    poison({2})
    log = main(train_args(setup, str(tmp_path / "run")))
    (line,) = [line for line in log.splitlines() if line.startswith("step     2/4  ") and "update skipped" not in line]
    assert "  loss " not in line or math.isnan(logged_losses(line)[0]), line


def test_three_non_finite_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(setup, tmp_path, poison):
    poison({3, 4, 5})
    out = str(tmp_path / "run")
    saved = {}
    real = train.save_checkpoint

    def save(path, model, opt, step):
        real(path, model, opt, step)
        saved[step] = open(path, "rb").read()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "save_checkpoint", save)
        with pytest.raises(ValueError, match=r"steps 3..5 were all non-finite: the run diverged; lower --lr"):
            main(train_args(setup, out, "--steps", "8"))
    assert list(saved) == [2]  # step 4 was not saved: it came after a skipped update
    assert open(os.path.join(out, "checkpoint.safetensors"), "rb").read() == saved[2]


def test_a_skipped_last_step_still_saves_the_final_step(setup, tmp_path, poison):
    """A NaN loss at the last of 4 steps: that update is skipped, and the final save still writes step 4 (the weights
    of step 3, the last good update: AdamW stepped 3 times), not step 2's file."""
    poison({4})
    out = str(tmp_path / "run")
    assert "step     4/4  update skipped" in main(train_args(setup, out, "--eval-interval", "100"))
    assert saved_step(out) == 4 and optimiser_steps(out) == {3.0}


def test_a_signal_after_the_last_steps_check_is_honoured(setup, tmp_path, monkeypatch):
    """SIGTERM during the final save (after the last per-step check): the checkpoint holds the final step, and the
    run exits 143."""
    real = train.save_checkpoint

    def save(path, model, opt, step):
        real(path, model, opt, step)
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # deferred: noted, not obeyed at once
    monkeypatch.setattr(train, "save_checkpoint", save)
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        main(train_args(setup, out))
    assert e.value.code == 128 + signal.SIGTERM
    assert saved_step(out) == 4 and optimiser_steps(out) == {4.0}


# ----------------------------------------------------------------------------------------------
# --out and --resume

def snapshot(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def test_out_is_a_new_or_empty_folder_or_a_run_of_train_pys_own(setup, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    model_before = snapshot(setup[0])
    for out in (str(file), str(notes), setup[0]):  # a file, a folder of other files, a model folder
        with pytest.raises(ValueError, match=f"--out {out} is not a run of train.py, nor a new or empty folder"):
            main(train_args(setup, out))
    assert file.read_text() == "keep me" and os.listdir(notes) == ["todo.txt"] and snapshot(setup[0]) == model_before
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new" / "run"):
        main(train_args(setup, str(out), "--steps", "1"))
        assert sorted(os.listdir(out)) == ["checkpoint.safetensors", "config.json"]
    os.remove(tmp_path / "empty" / "checkpoint.safetensors")  # a run killed before its first save: started again
    main(train_args(setup, str(tmp_path / "empty"), "--steps", "1"))
    assert saved_step(str(tmp_path / "empty")) == 1
    os.remove(tmp_path / "new" / "run" / "checkpoint.safetensors")
    with pytest.raises(ValueError, match="--resume: .*new/run holds no checkpoint"):
        main(train_args(setup, str(tmp_path / "new" / "run"), "--resume"))


@pytest.mark.parametrize("flags,named", [
    (["--rank", "4"], "--rank 8"), (["--prelude", "0"], "--prelude 1"), (["--recurrent", "3"], "--recurrent 2"),
    (["--seed", "1"], "--seed 0"), (["--lr", "0.02"], "--lr 0.01"), (["--seq-len", "16"], "--seq-len 32"),
    (["--variant", "static"], "--variant controller"), (["--label-offset", "2"], "--label-offset 1"),
    (["--depths", "1,3"], "--depths [1, 2, 3]"), (["--no-gate"], "--gate True"), (["--pool", "mean"], "--pool causal"),
    (["--batch-size", "2"], "--batch-size 4"), (["--held-out", "0.2"], "--held-out 0.05"),
    (["--readout", "every"], "--readout last"), (["--data", "elsewhere"], "--data"), (["--model", "other"], "--model"),
])
def test_resume_refuses_a_change_to_what_the_run_computes_and_names_it(setup, whole, flags, named):
    before = snapshot(whole[0])
    with pytest.raises(ValueError, match=f"--resume: {whole[0]} was trained with {re.escape(named)}.*; only more --steps and "
                                         "--checkpoint-steps, --compile, --device, .* may change"):
        train.main(train_args(setup, whole[0], "--resume", "--steps", "7", *flags))
    assert snapshot(whole[0]) == before


def test_resume_accepts_more_steps_and_the_free_settings(setup, whole):
    stored = read_config(whole[0])
    cfg, resume = parse(["--out", whole[0], "--resume", "--steps", "9", "--log-interval", "3", "--eval-interval", "9",
                            "--eval-windows", "2", "--save-interval", "3", "--device", "cpu", "--precision", "fp32",
                            "--checkpoint-steps"])  # nothing else given: the run's own settings
    assert resume and cfg.steps == 9 and (cfg.log_interval, cfg.checkpoint_steps, cfg.precision) == (3, True, "fp32")
    fixed = set(vars(stored)) - train.FREE
    assert {k: getattr(cfg, k) for k in fixed} == {k: getattr(stored, k) for k in fixed}
    assert (cfg.lr, cfg.rank, cfg.depths) == (0.01, 8, [1, 2, 3])


def test_a_run_whose_config_lacks_a_setting_added_since_or_has_one_removed_loads_and_resumes(setup, whole, tmp_path):
    out = str(tmp_path / "older")
    shutil.copytree(whole[0], out)
    file = os.path.join(out, "config.json")
    raw = json.load(open(file))
    for added in ("readout", "label_offset", "tf32", "compile"):
        del raw[added]
    raw["kv_dtype"] = "auto"  # and one since removed
    json.dump(raw, open(file, "w"))
    cfg = read_config(out)
    assert (cfg.readout, cfg.label_offset, cfg.tf32, cfg.lr) == ("last", 1, False, 0.01)
    log = main(["--out", out, "--resume", "--steps", "7", "--device", "cpu"])
    assert "; from step 6" in log and "step     7/7  loss" in log and saved_step(out) == 7


# ----------------------------------------------------------------------------------------------
# on a GPU

@needs_cuda
@pytest.mark.cuda
def test_cuda_trains_fp32_masters_under_bf16_autocast(setup, tmp_path, monkeypatch):
    real, built = train.load_ouroboros, []
    monkeypatch.setattr(train, "load_ouroboros", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    log = main(train_args(setup, str(tmp_path / "run"), "--lr", "1e-2", "--device", "cuda"))  # auto: bf16 on a GPU
    assert "device cuda:0" in log
    losses = logged_losses(log)
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.05
    assert all(p.device.type == "cuda" for p in built[0].parameters())
    check_fp32_masters_over_bf16(built[0], setup)


@needs_cuda
@pytest.mark.cuda
def test_cuda_resume_is_bit_exact(setup, tmp_path, monkeypatch):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    main(train_args(setup, a, *RUN, "--device", "cuda"))
    killed_then_resumed(setup, b, monkeypatch, *RUN, "--device", "cuda")
    assert_same_checkpoint(a, b)


@needs_cuda
@pytest.mark.cuda
def test_cuda_one_process_torchrun(setup, script, tmp_path):
    """torchrun on one GPU: the process takes cuda:LOCAL_RANK. (World size 1: train.py starts no process group.)"""
    out = str(tmp_path / "run")
    done = subprocess.run(torchrun(1, script, setup, *train_args(setup, out, "--device", "cuda")), env=env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "device cuda:0" in done.stdout and len(logged_losses(done.stdout)) == 4 and saved_step(out) == 4
