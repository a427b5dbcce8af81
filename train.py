"""Train Ouroboros: the controller, gate and step norms on top of a frozen, pruned decoder.

    python train.py                      # offline default: SmolLM2-135M + Python docs, CPU-sized
    python train.py --model DIR --prelude 8 --recurrent 18 --coda 8 --depths 4,8,16 ...
    python train.py --model DIR --dry-run --prelude 8 --recurrent 18 --coda 8
    torchrun --nproc_per_node 2 train.py ...   # DistributedDataParallel

Everything pretrained is frozen. Fixes over the authors' code: labels are shifted exactly once (the
loss does not shift again), the controller pools causally by default, trainable weights are fp32
masters under bf16 autocast, warmup and cosine decay count optimiser steps, and a held-out split (by
document) is never trained on. Good work is never lost: a non-finite update is skipped, SIGTERM /
SIGINT save before exiting, and a failed save leaves the previous checkpoint as it was.
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

from controller import TARGETS
from data import Windows, load_splits
from load_qwen import default_model, load_config, load_ouroboros
from model import Ouroboros, OuroborosConfig, Transformer, projection
from run import (ROOT, SETTINGS, Parser, TrainConfig, add_flags, claim, cli, load_checkpoint, placement, problems,
                 save_checkpoint, settings, write_atomic)


# The configuration: a flag for every setting declared in run.py (TrainConfig, OuroborosConfig inside it).
# A flag left out is absent, so that a new run takes the setting's default and --resume the run's own.
FLAGS = add_flags(Parser(add_help=False), defaults=False)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr; counted in optimiser steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class State:
    """What the loop works with, made by prepare(), and what its guards keep count of."""
    cfg: TrainConfig
    model: Ouroboros
    net: torch.nn.Module  # the model, or its DDP wrapper
    opt: torch.optim.Optimizer
    train: Windows
    held: Windows
    device: torch.device
    autocast: torch.autocast
    rank: int = 0
    world: int = 1
    log: callable = print  # rank 0 logs, the others are silent
    saved: int = 0         # the step the checkpoint on disk holds (0: none)
    skipped: int = 0
    in_a_row: int = 0      # non-finite updates since the last good one


def prepare(cfg: TrainConfig, resume: bool) -> State:
    """Processes, device, data, model, optimiser, the resumed checkpoint and the run's config.json."""
    rank, world = 0, 1
    if "RANK" in os.environ:  # torchrun. The group's threads start with SIGTERM and SIGINT blocked: only
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # the main thread takes them
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
        rank, world = dist.get_rank(), dist.get_world_size()
    device, dtype, autocast = placement(cfg.device, cfg.precision)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    config = load_config(cfg.model)  # read once, passed down; what it rules out fails before the data is read
    cfg.ouroboros.split(config.num_hidden_layers)
    widths = (config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim)
    if cfg.ouroboros.rank > (narrowest := min(widths)):
        raise ValueError(f"--rank {cfg.ouroboros.rank} must be at most {narrowest} for this model (the width of its "
                         "narrowest projection)")
    if cfg.seq_len > (context := config.max_position_embeddings):
        raise ValueError(f"--seq-len {cfg.seq_len} is longer than the model's context ({context} positions)")
    # The data first: a wrong --data or --text-field is reported in seconds, not after loading the weights.
    train_w, held_w = (Windows(t, cfg.seq_len, cfg.label_offset) for t in load_splits(cfg, config))
    torch.manual_seed(cfg.seed)  # the controller's initialisation
    model = load_ouroboros(cfg.model, cfg.ouroboros, dtype, device, config)
    model.checkpoint_steps = cfg.checkpoint_steps
    if cfg.compile:  # the step index becomes a symbolic int after one recompile: two graphs for any depth
        model.step = torch.compile(model.step)
    rest, decay = [], []  # AdamW on fp32 masters, weight decay on matrices (not norms, biases, the step table)
    for n, p in model.trainable().items():
        (decay if p.dim() >= 2 and "step_norm" not in n else rest).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2))
    net = model if not dist.is_initialized() else torch.nn.parallel.DistributedDataParallel(
        model, [device.index] if device.type == "cuda" else None)
    s = State(cfg, model, net, opt, train_w, held_w, device, autocast, rank, world,
              print if rank == 0 else lambda *a, **k: None)
    s.log(f"device {device}, model {cfg.model}, {train_w.n:,} training windows / {held_w.n:,} held-out "
          f"of {cfg.seq_len} tokens; {sum(p.numel() for p in model.trainable().values()):,} trainable parameters")
    if resume:
        s.saved = load_checkpoint(os.path.join(cfg.out, "checkpoint.safetensors"), model, opt)
        s.log(f"resumed {cfg.out} at step {s.saved}")
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        write_atomic(os.path.join(cfg.out, "config.json"), json.dumps(asdict(cfg), indent=2).encode())
    return s


def train(cfg: TrainConfig, resume: bool = False):
    """The loop: learning rate, micro-steps, clip, step, log, eval, save. The guards are the helpers
    below it, one call each: a non-finite update is skipped, a signal stops after the step and saves, a
    failed save keeps the previous checkpoint."""
    s = prepare(cfg, resume)
    start, t0, objective = s.saved, time.time(), "" if cfg.label_offset == 1 else f", token t+{cfg.label_offset}"
    loss_sum, logged = torch.zeros((), device=s.device), 0
    with deferred_signals() as caught:
        for step in range(start, cfg.steps):
            done = step + 1
            lr = lr_at(step, cfg)
            for group in s.opt.param_groups:
                group["lr"] = lr
            loss = torch.zeros((), device=s.device)
            for micro in range(cfg.grad_accum):
                idx, depth = s.train.draw(cfg, step, micro, s.rank, s.world)
                x, y = s.train.batch(idx, s.device)
                last_micro = micro == cfg.grad_accum - 1
                with s.autocast, (nullcontext() if s.net is s.model or last_micro else s.net.no_sync()):
                    micro_loss = s.net(x, depth=depth, labels=y, every=cfg.readout == "every")  # DDP: one all-reduce
                    (micro_loss / cfg.grad_accum).backward()
                loss += micro_loss.detach()  # no .item() here: no host-device sync per micro-step
            norm = torch.nn.utils.clip_grad_norm_(s.model.trainable().values(), cfg.clip)
            skip, stop = skip_or_stop(s, norm + loss, caught)
            if skip:
                skip_update(s, done)
            else:
                s.opt.step()
                s.in_a_row, logged, loss_sum = 0, logged + 1, loss_sum + loss
            s.opt.zero_grad(set_to_none=True)
            line = None
            if done % cfg.log_interval == 0 or done == cfg.steps:
                line = progress(s, done, lr, loss_sum, logged, (done - start) / (time.time() - t0))
                loss_sum, logged = loss_sum.zero_(), 0
            if done % cfg.eval_interval == 0 or done == cfg.steps:
                depth = max(cfg.depths)
                held = s.held.mean_loss(lambda x, y: s.model(x, depth=depth, labels=y), cfg.eval_windows,
                                        cfg.batch_size, s.device, s.autocast)
                line = (line or f"step {done:5d}/{cfg.steps}") + f"  held-out {held:.4f} (depth {depth}{objective})"
            if line:
                s.log(line, flush=True)
            save(s, done, last=done == cfg.steps or stop)
            if stop:
                halt(s, caught, done)
    end_processes(s)
    s.log(f"trained {cfg.steps - start} steps in {(time.time() - t0) / 60:.1f} min; {kept(s)}")
    if caught:  # it came after the last step's check (in the held-out eval or the save): no eval.py
        s.log(f"stopped by {signal.Signals(caught[0]).name} after the last step")
        sys.exit(128 + caught[0])


# ----------------------------------------------------------------------------------------------
# the loop's helpers and guards

def progress(s: State, done: int, lr: float, loss_sum, logged: int, steps_per_s: float) -> str:
    """The log line: the mean loss of the good steps since the last line (skipped ones left out)."""
    if dist.is_initialized():
        dist.all_reduce(loss_sum)
        loss_sum /= s.world
    speed = steps_per_s * s.cfg.batch_size * s.cfg.grad_accum * s.world * s.cfg.seq_len
    mean = loss_sum.item() / (logged * s.cfg.grad_accum) if logged else math.nan
    return (f"step {done:5d}/{s.cfg.steps}  loss {mean:.4f}  lr {lr:.2e}  {speed:,.0f} tok/s  "
            f"eta {(s.cfg.steps - done) / steps_per_s / 60:.1f} min")


def skip_or_stop(s: State, loss_and_norm, caught) -> list:
    """(skip, stop), decided by one sync per step for every process alike: skip an update whose loss or
    gradient norm is not finite (the norm is all-reduced already, the loss is not); stop on a signal."""
    flags = torch.stack([(~torch.isfinite(loss_and_norm)).float(), torch.tensor(float(bool(caught)), device=s.device)])
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [f > 0 for f in flags.tolist()]


def skip_update(s: State, done: int):
    """No optimiser step: the weights and AdamW's moments stay as they were. Three in a row end the run."""
    s.skipped, s.in_a_row = s.skipped + 1, s.in_a_row + 1
    s.log(f"step {done:5d}/{s.cfg.steps}  update skipped: non-finite loss or gradient norm ({s.skipped} so far)")
    if s.in_a_row == 3:
        raise ValueError(f"steps {done - 2}..{done} all had a non-finite loss or gradient norm: the run diverged; "
                         f"lower --lr (now {s.cfg.lr:g}); {kept(s)}")


def save(s: State, done: int, last: bool):
    """The checkpoint, every --save-interval after a good update, and at the last step or a stop, which
    need none: a skipped step left the weights as the last good one made them. Rank 0 writes and every
    process learns how it went, so that all go on or end together. A failed write (a full disk) keeps the
    previous checkpoint and training goes on, but the last save must succeed; a checkpoint that would hold
    non-finite tensors (a finite update that overflowed) ends the run."""
    if not (last or done % s.cfg.save_interval == 0 and not s.in_a_row):
        return
    path, error = os.path.join(s.cfg.out, "checkpoint.safetensors"), None
    if s.rank == 0:
        try:
            save_checkpoint(path, s.model, s.opt, done, s.cfg)
        except (OSError, ValueError) as e:
            error = e
    failed = torch.tensor(0.0 if error is None else 1.0 if isinstance(error, OSError) else 2.0, device=s.device)
    if dist.is_initialized():
        dist.broadcast(failed, src=0)
    if failed == 0:
        s.saved = done
    elif failed == 1 and not last:
        s.log(f"could not save {path} at step {done} ({error}); {kept(s)}; training goes on", flush=True)
    else:
        end_processes(s)  # together: a process left waiting for the others would hang
        if failed == 2:
            raise error or ValueError(f"rank 0 refused to save {path} at step {done}: the run diverged")
        raise OSError(f"could not save {path} at step {done} ({error or 'on rank 0'}); {kept(s)}")


def kept(s: State) -> str:
    path = os.path.join(s.cfg.out, "checkpoint.safetensors")
    return f"{path} holds step {s.saved}" if s.saved else f"no checkpoint in {s.cfg.out}"


def halt(s: State, caught, done: int):
    """Stop after this step, saved, exiting 128 + the signal (another process may have caught it)."""
    signum = caught[0] if caught else signal.SIGTERM
    s.log(f"stopped by {signal.Signals(signum).name} after step {done}; {kept(s)}: --resume continues")
    end_processes(s)
    sys.exit(128 + signum)


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


def end_processes(s: State):
    if dist.is_initialized():  # leave together: a rank that tears down while rank 0 still saves can abort
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# --dry-run: the layer split and the parameter table, from config.json alone (on the meta device)

def describe(path: str, oc: OuroborosConfig) -> str:
    config = load_config(path)
    pre, r, post, removed = oc.split(config.num_hidden_layers)
    with torch.device("meta"):
        base = Transformer(config, pre + [r] + post)
        linears = {t: getattr(*projection(base.layers[str(r)], t)) for t in TARGETS}
        bases = {t: (torch.empty(oc.rank, m.in_features), torch.empty(m.out_features, oc.rank))
                 for t, m in linears.items()}
        model = Ouroboros(base, oc, bases if oc.variant != "none" else None)
    span = lambda ids: f"{ids[0]}..{ids[-1]}" if ids else "-"
    return (f"{path}: {config.num_hidden_layers} layers, d={config.hidden_size}; prelude {span(pre)}, recurrent {r}, "
            f"coda {span(post)}, {len(removed)} removed\n" + parameter_table(model))


def parameter_table(model: Ouroboros, base_dtype=torch.bfloat16) -> str:
    rows, kind = {}, {i: "prelude" for i in model.prelude_ids} | {i: "coda" for i in model.coda_ids}
    tied = model.base.config.tie_word_embeddings
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["base", "layers"]:
            group = "SVD bases A, B" if parts[-1] in ("A", "B") else kind.get(int(parts[2]), "recurrent layer")
        elif parts[0] == "base":
            group = {"embed_tokens": "embedding (tied lm_head)" if tied else "embedding", "norm": "final norm",
                     "lm_head": "lm_head"}[parts[1]]
        else:
            group = {"diagonals": model.config.variant, "gate": "gate", "step_norm": "step norms"}[parts[0]]
        frozen, trainable = rows.get(group, (0, 0))
        rows[group] = (frozen + p.numel() * (not p.requires_grad), trainable + p.numel() * p.requires_grad)
    frozen, trainable = (sum(r[i] for r in rows.values()) for i in (0, 1))
    lines = [f"{'module':<26}{'frozen':>15}{'trainable':>15}"]
    lines += [f"{g:<26}{f:>15,}{t:>15,}" for g, (f, t) in rows.items()]
    size = torch.finfo(base_dtype).bits // 8
    return "\n".join(lines + [f"{'total':<26}{frozen:>15,}{trainable:>15,}",
                              f"weights: {frozen * size / 2**30:.2f} GiB frozen ({base_dtype}) + "
                              f"{trainable * 4 / 2**20:.1f} MiB trainable fp32 "
                              f"(+ {trainable * 12 / 2**20:.1f} MiB grads and AdamW moments)"])


def main(argv=None):
    """Every flag is a declared setting (run.py). What can only fail, an --out that cannot take this run
    and, on --resume, a change to what the run computes are refused all at once, before anything loads."""
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, parents=[FLAGS])
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--dry-run", action="store_true", help="build on the meta device, print the parameters, exit")
    a = p.parse_args(argv)
    given = {k: v for k, v in vars(a).items() if k in SETTINGS}
    if a.dry_run:
        cfg = settings(given)
        if found := problems(cfg):
            raise ValueError("; ".join(found))
        print(describe(cfg.model or default_model(), cfg.ouroboros))
        return
    with claim(given, a.resume) as cfg:
        cfg.model = cfg.model or default_model()
        train(cfg, a.resume)
    if cfg.final_eval and "RANK" not in os.environ:  # eval.py is its own program: train.py never imports it
        sys.exit(subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--run", cfg.out,
                                 "--device", cfg.device, "--precision", cfg.precision]).returncode)


if __name__ == "__main__":
    cli(main, sys.argv[1:])
