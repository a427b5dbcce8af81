"""Train Ouroboros: the controller, gate and step norms on top of a frozen, pruned decoder.

    python train.py                      # offline default: SmolLM2-135M + Python docs, CPU-sized
    python train.py --model DIR --prelude 8 --recurrent 18 --coda 8 --depths 4,8,16 ...
    python train.py --model DIR --dry-run --prelude 8 --recurrent 18 --coda 8
    torchrun --nproc_per_node 2 train.py ...   # DistributedDataParallel

Everything base-model is frozen. Fixes over the authors' code: labels are shifted exactly once
(the loss does not shift again), the controller pools causally by default, trainable weights are
fp32 masters under bf16 autocast, warmup and cosine decay count optimiser steps, and a held-out
split (by document) is never trained on. Good work is never lost: a non-finite update is skipped,
SIGTERM / SIGINT save before exiting, and a failed save leaves the previous checkpoint as it was.
"""
import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from safetensors.torch import save

from data import CACHE, KINDS, ROOT, Windows, load_splits
from load_qwen import cli, default_model, describe, load_checkpoint, load_config, load_ouroboros, parse_depths, pick_device, precision, trainable, write_atomic
from model import OuroborosConfig

# ----------------------------------------------------------------------------------------------
# configuration

@dataclass
class TrainConfig:
    model: str = ""                 # HF-format folder; "" = the offline SmolLM2-135M default
    data: tuple = ()                # files, folders, globs; () = the Python docs
    text_field: str = "text"        # the .jsonl field / parquet column that holds the text
    out: str = ""                   # run folder; "" = runs/<variant>-<pool>-s<seed>
    prelude: int = 8
    recurrent: int = 15
    coda: int = 8
    rank: int = 32
    alpha: float = 16.0
    variant: str = "controller"
    gate: bool = True
    pool: str = "causal"
    depths: str = "4,8"             # drawn uniformly per batch (paper: 4,8,16; 16 is too slow on a CPU)
    seq_len: int = 256
    label_offset: int = 1           # predict token t + label_offset; 2 is the authors' (double-shift) objective
    batch_size: int = 8             # sequences per micro-batch (per process)
    grad_accum: int = 1
    steps: int = 80                 # optimiser steps (CPU default: ~10 min on 2 cores)
    lr: float = 3e-3                # paper: 3e-4 over 300K steps; 10x for a run 4000x shorter
    min_lr_ratio: float = 0.1
    warmup: int | None = None       # None: min(10, steps // 8), so a short run has room to decay
    weight_decay: float = 0.01
    beta2: float = 0.95
    clip: float = 1.0
    held_out: float = 0.05          # fraction of documents held out
    eval_interval: int = 20
    save_interval: int = 20         # also saved at the end and on SIGTERM / SIGINT
    eval_windows: int = 16
    log_interval: int = 5
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"         # auto: bf16 base + autocast on GPUs, fp32 on the CPU
    compile: bool = False
    checkpoint_steps: bool = False  # activation checkpointing per recurrent step
    final_eval: bool = True

    def __post_init__(self):
        if self.warmup is None:
            self.warmup = max(0, min(10, self.steps // 8))
        self.out = self.out or os.path.join(ROOT, "runs", f"{self.variant}-{self.pool}{'' if self.gate else '-nogate'}-s{self.seed}")


def parse_args(argv=None):
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model, help="HF-format Qwen2/Llama folder (default: SmolLM2-135M, offline)")
    p.add_argument("--data", nargs="*", default=[], help=f"files, folders, globs of {' '.join(KINDS)} (default: Python docs)")
    p.add_argument("--text-field", default=d.text_field, help="the .jsonl field / parquet column that holds the text")
    p.add_argument("--out", default=d.out)
    for name in ("prelude", "recurrent", "coda", "rank", "seq_len", "label_offset", "batch_size", "grad_accum", "steps",
                 "eval_interval", "save_interval", "eval_windows", "log_interval", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("alpha", "lr", "min_lr_ratio", "weight_decay", "beta2", "clip", "held_out"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--warmup", type=int, default=None, help="LR warmup steps (default: min(10, steps // 8))")
    p.add_argument("--variant", choices=["controller", "static", "none"], default=d.variant)
    p.add_argument("--no-gate", dest="gate", action="store_false")
    p.add_argument("--pool", choices=["causal", "mean"], default=d.pool)
    p.add_argument("--depths", default=d.depths, help="comma-separated recurrent depths, one drawn per batch")
    p.add_argument("--device", default=d.device, help="auto (cuda, mps, cpu) or a torch device")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=d.precision,
                   help="bf16: bf16 base + autocast, fp32 masters (auto: on GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the recurrent step")
    p.add_argument("--checkpoint-steps", action="store_true", help="recompute each recurrent step in backward")
    p.add_argument("--no-final-eval", dest="final_eval", action="store_false")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--dry-run", action="store_true", help="build on the meta device, print parameters, exit")
    a = p.parse_args(argv)
    cfg = TrainConfig(**{k: (tuple(v) if k == "data" else v) for k, v in vars(a).items()
                         if k in TrainConfig.__dataclass_fields__})
    return cfg, a.resume, a.dry_run


def check(cfg: TrainConfig, resume: bool) -> list:
    """Settings that can only fail, all at once, before anything is loaded or written; -> the depths."""
    problems = [f"--{n.replace('_', '-')} must be at least 1" for n in ("seq_len", "label_offset", "batch_size", "grad_accum",
                "steps", "eval_interval", "save_interval", "eval_windows", "log_interval", "rank") if getattr(cfg, n) < 1]
    if not 0 <= cfg.warmup < max(cfg.steps, 1):
        problems.append(f"--warmup {cfg.warmup} must be in 0..{cfg.steps - 1} (below --steps)")
    if not 0 < cfg.held_out < 1:
        problems.append(f"--held-out {cfg.held_out} must be a fraction between 0 and 1")
    if not cfg.lr > 0 or not 0 <= cfg.min_lr_ratio <= 1:
        problems.append("--lr must be positive and --min-lr-ratio in 0..1")
    try:
        depths = parse_depths(cfg.depths)
    except ValueError as e:
        problems.append(str(e))
    ckpt = os.path.join(cfg.out, "checkpoint.safetensors")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        problems.append(f"--out {cfg.out} is a file: name a folder for the run")
    elif os.path.exists(ckpt) and not resume:
        problems.append(f"{ckpt} exists: pass --resume to continue that run, or --out for a new one")
    elif resume and not os.path.exists(ckpt):
        problems.append(f"--resume: {cfg.out} holds no checkpoint to continue")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))
    return depths


# ----------------------------------------------------------------------------------------------
# checkpoints: trainable tensors and AdamW moments in one safetensors file, replaced atomically (read by load_qwen)

def save_checkpoint(path, model, opt, step, cfg):
    """A failed write (a full disk) raises OSError and leaves the previous checkpoint as it was."""
    tensors = {f"model.{n}": p.detach().cpu() for n, p in trainable(model).items()}
    for n, p in trainable(model).items():
        for k, v in opt.state.get(p, {}).items():
            tensors[f"optim.{n}.{k}"] = v.detach().cpu().reshape(v.shape)
    bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:  # a finite update that overflowed: the non-finite guard in the loop cannot see it coming
        raise ValueError(f"{bad[0]} is not finite after step {step}: the run diverged; lower --lr (now {cfg.lr:g}). "
                         f"{path} was left as it was")
    # serialised here and written by write_atomic: safetensors' save_file reports a full disk as no OSError
    write_atomic(path, save(tensors, metadata={"step": str(step), "config": json.dumps(asdict(cfg))}))


@contextmanager
def deferred_signals():
    """SIGTERM (a cluster's preemption) and SIGINT are noted, not obeyed at once: the loop finishes its
    optimiser step, saves and exits 128 + signal. A second one acts at once, as without this."""
    caught = []

    def note(signum, frame):
        caught.append(signum)
        signal.signal(signum, previous[signum])

    previous = {s: signal.signal(s, note) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------------------------
# training

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr; counted in optimiser steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, cfg: TrainConfig):
    """AdamW on fp32 masters; weight decay on matrices only (not norms, biases, or the step table)."""
    params = trainable(model)
    decay = [p for n, p in params.items() if p.dim() >= 2 and "step_norm" not in n]
    rest = [p for n, p in params.items() if not (p.dim() >= 2 and "step_norm" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, cfg.beta2))


def train(cfg: TrainConfig, resume: bool = False):
    depths = check(cfg, resume)
    ddp = "RANK" in os.environ
    if ddp:  # the process group's threads start with SIGTERM/SIGINT blocked: only the main thread takes them
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    device = pick_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg.model = cfg.model or default_model(CACHE)
    config = load_config(cfg.model)  # read once, passed down
    if cfg.seq_len > (context := config.max_position_embeddings):
        raise SystemExit(f"error: --seq-len {cfg.seq_len} is longer than the model's context ({context} positions)")
    ckpt_path = os.path.join(cfg.out, "checkpoint.safetensors")
    # The data first: a wrong --data or --text-field is reported in seconds, not after loading the weights.
    train_w, held_w = (Windows(t, cfg.seq_len, cfg.label_offset) for t in load_splits(cfg.data, cfg.model, cfg.held_out, cfg.text_field, config))

    dtype, autocast = precision(device, cfg.precision)
    torch.manual_seed(cfg.seed)
    model = load_ouroboros(cfg.model, cfg.prelude, cfg.recurrent, cfg.coda, cfg.rank, cfg.alpha,
                           cfg.variant, cfg.gate, cfg.pool, dtype=dtype, device=device, config=config)
    model.checkpoint_steps = cfg.checkpoint_steps
    if cfg.compile:  # the step index becomes a symbolic int after one recompile: two graphs for any depth
        model.step = torch.compile(model.step)
    log(f"device {device}, model {cfg.model}, {train_w.n:,} training windows / {held_w.n:,} held-out "
        f"of {cfg.seq_len} tokens; {sum(p.numel() for p in trainable(model).values()):,} trainable parameters")

    opt = make_optimizer(model, cfg)
    start = saved = 0  # saved: the step the checkpoint on disk holds (0: none)
    if resume:
        start = saved = load_checkpoint(ckpt_path, model, opt)
        log(f"resumed {ckpt_path} at step {start}")
    kept = lambda: f"{ckpt_path} holds step {saved}" if saved else f"no checkpoint in {cfg.out}"
    if master:
        os.makedirs(cfg.out, exist_ok=True)
        write_atomic(os.path.join(cfg.out, "config.json"), json.dumps(asdict(cfg), indent=2).encode())
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else model

    per_step = cfg.batch_size * cfg.grad_accum * world  # sequences per optimiser step, all processes
    eval_depth, objective = max(depths), "" if cfg.label_offset == 1 else f", token t+{cfg.label_offset}"
    model.train()
    t0, tokens_seen, loss_sum, logged = time.time(), 0, torch.zeros((), device=device), 0
    order_epoch, skipped, in_a_row = None, 0, 0
    with deferred_signals() as caught:
        for step in range(start, cfg.steps):
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                # The data order and the depth are functions of (seed, step, micro): resuming is exact.
                first = (step * cfg.grad_accum + micro) * cfg.batch_size * world + rank * cfg.batch_size
                epoch, offset = divmod(first, train_w.n)
                if epoch != order_epoch:  # a permutation per epoch, not per micro-step
                    order, order_epoch = train_w.order(cfg.seed, epoch), epoch
                idx = [order[(offset + j) % train_w.n] for j in range(cfg.batch_size)]
                x, y = train_w.batch(idx, device)
                depth = depths[torch.randint(len(depths), (), generator=torch.Generator().manual_seed(
                    cfg.seed * 1_000_003 + step * 1009 + micro)).item()]
                sync = not ddp or micro == cfg.grad_accum - 1
                with autocast, (nullcontext() if sync else net.no_sync()):  # all-reduce once per step
                    loss = net(x, depth=depth, labels=y)
                    (loss / cfg.grad_accum).backward()
                step_loss += loss.detach()  # no .item() here: no host-device sync per micro-step
            norm = torch.nn.utils.clip_grad_norm_(trainable(model).values(), cfg.clip)
            # One sync per step decides for every process alike: skip an update whose loss or gradient
            # norm is not finite (the norm is all-reduced already, the loss is not), stop on a signal.
            flags = torch.stack([(~torch.isfinite(norm + step_loss)).float(), torch.tensor(float(bool(caught)), device=device)])
            if ddp:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            skip, stop = flags.tolist()
            done = step + 1
            if skip:  # no optimiser step: the weights and AdamW's moments stay as they were
                skipped, in_a_row = skipped + 1, in_a_row + 1
                log(f"step {done:5d}/{cfg.steps}  update skipped: non-finite loss or gradient norm ({skipped} so far)")
                if in_a_row == 3:
                    raise SystemExit(f"error: steps {done - 2}..{done} all had a non-finite loss or gradient norm: the run "
                                     f"diverged; lower --lr (now {cfg.lr:g}); {kept()}")
            else:
                opt.step()
                in_a_row, logged, loss_sum = 0, logged + 1, loss_sum + step_loss
            opt.zero_grad(set_to_none=True)
            tokens_seen += per_step * cfg.seq_len
            line = None
            if done % cfg.log_interval == 0 or done == cfg.steps:
                if ddp:
                    dist.all_reduce(loss_sum)
                    loss_sum /= world
                speed = tokens_seen / (time.time() - t0)
                eta = (cfg.steps - done) * per_step * cfg.seq_len / speed
                mean = loss_sum.item() / (logged * cfg.grad_accum) if logged else math.nan  # skipped steps left out
                line = (f"step {done:5d}/{cfg.steps}  loss {mean:.4f}  lr {lr:.2e}  {speed:,.0f} tok/s  "
                        f"eta {eta / 60:.1f} min")
                loss_sum, logged = loss_sum.zero_(), 0
            if done % cfg.eval_interval == 0 or done == cfg.steps:
                held = held_w.mean_loss(lambda x, y: model(x, depth=eval_depth, labels=y), cfg.eval_windows,
                                        cfg.batch_size, device, autocast)
                line = (line or f"step {done:5d}/{cfg.steps}") + f"  held-out {held:.4f} (depth {eval_depth}{objective})"
            if line:
                log(line, flush=True)
            # Periodic saves wait for a good update. The final and stop saves do not: a skipped step left
            # the weights as the last good step made them (and save_checkpoint refuses non-finite ones).
            if master and ((done % cfg.save_interval == 0 and not in_a_row) or done == cfg.steps or stop):
                try:
                    save_checkpoint(ckpt_path, model, opt, done, cfg)
                    saved = done
                except OSError as e:  # a full disk need not end a long run, but its last save must succeed
                    if done == cfg.steps or stop:
                        raise SystemExit(f"error: could not save {ckpt_path} at step {done} ({e}); {kept()}")
                    log(f"could not save {ckpt_path} at step {done} ({e}); {kept()}; training goes on", flush=True)
            if stop:
                signum = caught[0] if caught else signal.SIGTERM  # another process caught it
                log(f"stopped by {signal.Signals(signum).name} after step {done}; {kept()}: --resume continues")
                if ddp:  # leave together: a rank that tears down while rank 0 still saves can abort
                    dist.barrier()
                    dist.destroy_process_group()
                sys.exit(128 + signum)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    log(f"trained {cfg.steps - start} steps in {(time.time() - t0) / 60:.1f} min; {kept()}")
    if caught:  # it came after the last step's check (in the held-out eval or the save): no eval.py
        log(f"stopped by {signal.Signals(caught[0]).name} after the last step")
        sys.exit(128 + caught[0])


@cli
def main(argv=None):
    cfg, resume, dry = parse_args(argv)
    if dry:
        print(describe(cfg.model or default_model(CACHE), OuroborosConfig(
            cfg.prelude, cfg.recurrent, cfg.coda, cfg.rank, cfg.alpha, cfg.variant, cfg.gate, cfg.pool)))
        return
    train(cfg, resume)
    if cfg.final_eval and "RANK" not in os.environ:  # eval.py is its own program: train.py never imports it
        sys.exit(subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--run", cfg.out,
                                 "--device", cfg.device, "--precision", cfg.precision]).returncode)


if __name__ == "__main__":
    main(sys.argv[1:])
