"""Adaptive depth: the oracle, and the learned exit's labels and training (Ouro's second stage).

    python exits.py --run runs/every-s0         # train its exit head -> runs/every-s0/exit.safetensors

Every token's loss after each recurrent step, read out through the coda and head, is computed once
without gradients (teacher-forced, every step run). The oracle stops each token at the first step
whose loss is within epsilon of the deepest step's: no exit rule can do better at that epsilon, so
it says how much there is to win. The exit head (controller.ExitHead) learns to tell the same from
the states it sees: label 1 from that step on, 0 before it, binary cross-entropy, everything else
frozen. eval.py --adaptive measures it, calibrated on documents kept apart from those it is scored on.
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save

from controller import ExitHead
from data import Windows, load_splits
from decode import decode, new_cache
from load_qwen import CheckpointError, load_config, load_ouroboros
from run import Parser, add_flags, cli, load_checkpoint, load_run, placement, read_settings, variant, write_atomic

EPSILON = 0.05  # nats: a step counts as good enough within this of the deepest step's loss


@torch.no_grad()
def step_losses(model, x, y, depth: int):
    """(losses [depth, B, T]: the next-token loss of each token read out after each step 1..depth,
    states [depth + 1, B, T, d]: h_0 (the prelude's output) .. h_depth)."""
    h, cos, sin = model.embed_prelude(x)
    states, losses = [h], []
    for k in range(depth):
        h = model.step(h, k, cos, sin)
        logits = model.base.head(model.coda(h, cos, sin))
        losses.append(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none").view(y.shape))
        states.append(h)
    return torch.stack(losses), torch.stack(states)


def first_within(losses, eps: float):
    """The oracle: for losses [depth, ...] of each token after each step, the first step (1-based) whose
    loss is within eps of the deepest step's; the deepest step itself always is."""
    return (losses <= losses[-1] + eps).float().argmax(0) + 1


def labels(losses, eps: float):
    """[depth, ...]: 1 where stopping after that step is good enough, from the oracle's step on."""
    steps = torch.arange(1, len(losses) + 1, device=losses.device).view(-1, *[1] * (losses.dim() - 1))
    return (steps >= first_within(losses, eps)).float()


def train_exit_head(model, windows: Windows, depth: int, device, n: int = 32, iters: int = 300):
    """An ExitHead trained on `n` training windows: full-batch Adam on the binary cross-entropy of every
    (token, step) against its label. Returns (head, its last loss, the oracle's mean steps on them)."""
    feats, targets, oracle, picked = [], [], [], windows.spread(n)
    for start in range(0, len(picked), 8):
        x, y = windows.batch(picked[start:start + 8], device)
        losses, states = step_losses(model, x, y, depth)
        feats.append(states.flatten(1, 2))
        targets.append(labels(losses, EPSILON).flatten(1))
        oracle.append(first_within(losses, EPSILON).flatten().float())
    states, targets = torch.cat(feats, 1), torch.cat(targets, 1)  # [depth + 1, tokens, d], [depth, tokens]
    torch.manual_seed(0)
    head = ExitHead(states.shape[-1], model.config.max_steps).to(device)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(iters):
        loss = sum(F.binary_cross_entropy(head(states[k], states[k + 1], k), targets[k]) for k in range(depth)) / depth
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.requires_grad_(False), loss.item(), torch.cat(oracle).mean().item()


def save_exit_head(run: str, head, about: dict):
    """The exit head beside the run's checkpoint, with what it was trained on (about: its step and more)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    metadata = {k: str(v) for k, v in about.items()}
    write_atomic(os.path.join(run, "exit.safetensors"), save(tensors, metadata=metadata))


def attach_exit_head(model, run: str):
    """model.exit_head: the head exits.py trained for the run's checkpoint, if it trained one; refused if
    the run has trained on since. Returns the model."""
    file, again = os.path.join(run, "exit.safetensors"), "train it again with exits.py"
    if not os.path.isfile(file):
        return model
    head = ExitHead(model.base.config.hidden_size, model.config.max_steps)
    try:
        with safe_open(file, framework="pt") as f, safe_open(os.path.join(run, "checkpoint.safetensors"), "pt") as c:
            trained_at, step = int(f.metadata()["step"]), int(c.metadata()["step"])
        head.load_state_dict(load_file(file))
    except Exception as e:  # safetensors' own error, a missing step, tensors that do not fit
        raise CheckpointError(f"cannot read {file}: {e!r}; {again}") from e
    if trained_at != step:
        raise CheckpointError(f"{file} was trained on step {trained_at}, the checkpoint holds step {step}: {again}")
    model.exit_head = head.to(model.base.embed_tokens.weight.device).requires_grad_(False)
    return model


def halves(stream, seq_len: int, eos: int):
    """(calibration, evaluation) windows of the held-out stream cut at the document boundary nearest its
    middle, so that a threshold is chosen on other documents than those it is scored on."""
    n = len(stream)
    ends = [e for e in (np.flatnonzero(np.asarray(stream) == eos) + 1).tolist() if seq_len < e < n - seq_len]
    if not ends:  # too few documents to keep apart
        print("the held-out split has too few documents for two halves: cut mid-document", file=sys.stderr)
    cut = min(ends, key=lambda e: abs(e - n // 2)) if ends else n // 2
    return Windows(stream[:cut], seq_len), Windows(stream[cut:], seq_len)


@torch.no_grad()
def decoded(model, x, y, depth: int, exit, autocast):
    """(per-window loss, per-window mean steps) of windows x decoded token by token through the cache,
    teacher-forced, each token's exit its own: what decoding does. One batch shares the weight reads. The
    K/V keep the weights' dtype, so attention is as precise as in the plain forward the fixed depths use."""
    kv = model.base.embed_tokens.weight.dtype
    cache, losses, steps = new_cache(model, len(x), x.shape[1], depth, kv), [], []
    for t in range(x.shape[1]):
        with autocast:
            logits, s = decode(model, x[:, t:t + 1], cache, exit)
        losses.append(F.cross_entropy(logits[:, 0].float(), y[:, t], reduction="none"))
        steps.append(s[:, 0].float())
    return torch.stack(losses, 1).mean(1).tolist(), torch.stack(steps, 1).mean(1).tolist()


def rows(model, windows: Windows, n: int, depth: int, criteria: dict, autocast):
    """Every way of stopping, measured on `n` windows: each fixed depth 1..depth and the oracle at three
    epsilons (from the per-token losses after every step), and each criterion at each of its thresholds
    (decoded). A row: its kind, its setting, the loss and the mean steps of every window."""
    device = model.base.embed_tokens.weight.device
    x, y = windows.batch(windows.spread(n), device)
    with autocast:
        losses = torch.cat([step_losses(model, x[i:i + 8], y[i:i + 8], depth)[0] for i in range(0, len(x), 8)], 1)
    out = [{"kind": "fixed", "at": d, "loss": losses[d - 1].mean(-1).tolist(), "steps": [float(d)] * len(x)}
           for d in range(1, depth + 1)]
    for eps in (0.02, 0.05, 0.1):
        first = first_within(losses, eps)
        loss = losses.gather(0, (first - 1)[None])[0]
        steps = first.float().mean(-1).tolist()
        out.append({"kind": "oracle", "at": eps, "loss": loss.mean(-1).tolist(), "steps": steps})
    for name, thresholds in criteria.items():
        for th in thresholds:
            loss, steps = decoded(model, x, y, depth, (name, th), autocast)
            out.append({"kind": name, "at": th, "loss": loss, "steps": steps})
            print(f"{name} < {th:g}: loss {np.mean(loss):.3f}, {np.mean(steps):.2f} steps", file=sys.stderr, flush=True)
    return out


def evaluate_adaptive(run: str, depth: int, criteria: dict, windows: int, device="auto", precision="auto"):
    """Adaptive depth on held-out documents, calibration and evaluation halves apart: rows() of each."""
    where, dtype, autocast = placement(device, precision)
    model, cfg = load_run(run, dtype, where)
    attach_exit_head(model, run)
    if "learned" in criteria and getattr(model, "exit_head", None) is None:
        criteria = {k: v for k, v in criteria.items() if k != "learned"}
        print(f"{run} has no exit head (python exits.py --run {run}): the learned exit is left out", file=sys.stderr)
    eos = load_config(cfg.model).eos_token_id
    parts = halves(load_splits(cfg)[1], cfg.seq_len, eos[0] if isinstance(eos, list) else eos)
    return {"run": run, "label": variant(cfg), "seq_len": cfg.seq_len, "deepest": depth,
            "windows": {p: len(w.spread(windows)) for p, w in zip(PARTS, parts)},
            "parts": {p: rows(model, w, windows, depth, criteria, autocast) for p, w in zip(PARTS, parts)}}


PARTS = ("calibration", "evaluation")


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run folder written by train.py")
    p.add_argument("--depth", type=int, default=None, help="the deepest step (default: the run's largest depth)")
    p.add_argument("--windows", type=int, default=32, help="training windows the labels are computed on")
    add_flags(p, ("device",))
    a = p.parse_args(argv)
    if a.windows < 1:
        raise ValueError(f"--windows {a.windows} must be at least 1")
    device = placement(a.device, "fp32")[0]
    cfg = read_settings(a.run)  # not load_run: an exit head of an earlier checkpoint is replaced, not refused
    model = load_ouroboros(cfg.model, cfg.ouroboros, torch.float32, device).eval()
    step = load_checkpoint(os.path.join(a.run, "checkpoint.safetensors"), model)
    depth = a.depth or max(cfg.depths)
    if not 1 <= depth <= cfg.ouroboros.max_steps:
        raise ValueError(f"--depth {depth} must be in 1..{cfg.ouroboros.max_steps}")
    train = Windows(load_splits(cfg)[0], cfg.seq_len)
    head, loss, oracle = train_exit_head(model, train, depth, device, a.windows)
    save_exit_head(a.run, head, {"step": step, "epsilon": EPSILON, "depth": depth, "windows": a.windows})
    print(f"exit head of {a.run}: BCE {loss:.4f} on {a.windows} training windows, whose oracle at epsilon "
          f"{EPSILON} stops after {oracle:.2f} of {depth} steps on average; saved {a.run}/exit.safetensors")


if __name__ == "__main__":
    cli(main, sys.argv[1:])
