"""Adaptive depth: every step's readout, the oracle, the learned exit (Ouro's second stage), decoding with an exit
per token (as Huginn), and its evaluation.

    python extras/exits.py head --run runs/every-s0        # train its exit head -> runs/every-s0/exit.safetensors
    python extras/exits.py eval --run runs/every-s0 --depth 8 --windows 16 --latent-diff 0.03,0.05,0.1 --out DIR
    python extras/exits.py generate --run runs/every-s0 --prompt "The os module" --exit learned 0.3 [--no-cache]

A run trained with --readout every (or with a depth drawn per batch) can be read out after any step. Every token's
loss after each step is computed once, teacher-forced, every step run. The oracle stops each token at the first
step whose loss is within epsilon of the deepest step's: no exit rule can do better at that epsilon, so it says
how much there is to win. The exit head learns to tell the same from the states it sees: label 1 from that step
on, 0 before it, binary cross-entropy, everything else frozen. `eval` measures the exits decoded token by token
through the KV cache, their thresholds chosen on held-out documents kept apart from those they are scored on.
"""
import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402  (the reference's modules, from the repository root)
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save  # noqa: E402

from controller import VARIANTS  # noqa: E402
from data import Windows, load_splits  # noqa: E402
from eval import bootstrap, load_run, name  # noqa: E402
from generate import generate, pick_token  # noqa: E402
from load_qwen import load_config, load_tokenizer  # noqa: E402
from model import through  # noqa: E402
from train import cli, placement, read_config, write_atomic  # noqa: E402

EPSILON = 0.05  # nats: a step counts as good enough within this of the deepest step's loss
PARTS = ("calibration", "evaluation")
LATENT_DIFF = "0.02,0.03,0.05,0.07,0.1,0.15"  # eval's thresholds unless given
LEARNED = "0.1,0.2,0.3,0.4,0.5,0.6,0.7"


class ExitHead(nn.Module):
    """The learned exit: after step k, lambda_k = sigmoid(w . [rms(h_k); log ||h_k - h_{k-1}|| / ||h_k||; e_k] + b),
    the chance that stopping here reads out within epsilon of the deepest step's loss (its training label)."""

    def __init__(self, dim: int, max_depth: int, width: int = 16):
        super().__init__()
        self.step_embed = nn.Embedding(max_depth, width)  # e_k
        self.proj = nn.Linear(dim + 1 + width, 1)         # w, b

    def forward(self, h_old, h, step: int):
        change = latent_diff(h_old, h).clamp_min(1e-12).log()  # Huginn's criterion, as a feature
        h = h.float()
        e = self.step_embed.weight[step].expand(*h.shape[:-1], -1)
        return torch.sigmoid(self.proj(torch.cat([F.rms_norm(h, h.shape[-1:]), change[..., None], e], -1))).squeeze(-1)


def latent_diff(h_old, h):
    """Huginn's exit criterion: the relative change of the state, ||h_k - h_{k-1}|| / ||h_k||, per token."""
    h_old, h = h_old.float(), h.float()
    return (h - h_old).norm(dim=-1) / h.norm(dim=-1)


def learned(model, h_old, h, k: int):
    """1 - lambda_k of the run's exit head: a token stops once lambda_k exceeds 1 - threshold."""
    if getattr(model, "exit_head", None) is None:
        raise ValueError("this run has no exit head: train one with python extras/exits.py head --run RUN")
    return 1 - model.exit_head(h_old, h, k)


# criterion(model, state before step k, state after it, k) per token: it stops below the threshold
EXITS = {"latent-diff": lambda model, h_old, h, k: latent_diff(h_old, h), "learned": learned}


# ----------------------------------------------------------------------------------------------
# The oracle, and the exit head's labels and training

@torch.no_grad()
def step_losses(model, x, y, depth: int):
    """(losses [depth, B, T]: the next-token loss of each token read out after each step 1..depth,
    states [depth + 1, B, T, d]: h_0 (the prelude's output) .. h_depth)."""
    h, rope = model.base.embed(x)
    h = through(model.prelude, h, rope)
    states, losses = [h], []
    for k in range(depth):
        h = model.step(h, k, rope)
        logits = model.base.head(through(model.coda, h, rope))
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
    head = ExitHead(states.shape[-1], model.config.max_depth).to(device)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(iters):
        loss = sum(F.binary_cross_entropy(head(states[k], states[k + 1], k), targets[k]) for k in range(depth)) / depth
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.requires_grad_(False), loss.item(), torch.cat(oracle).mean().item()


def checkpoint_step(run: str) -> int:
    with safe_open(os.path.join(run, "checkpoint.safetensors"), "pt") as f:
        return int(f.metadata()["step"])


def attach_exit_head(model, run: str):
    """model.exit_head: the head trained for the run's checkpoint, if one was; refused if the run has trained on
    since. Returns the model."""
    file, again = os.path.join(run, "exit.safetensors"), "train it again with python extras/exits.py head"
    if not os.path.isfile(file):
        return model
    head = ExitHead(model.base.config.hidden_size, model.config.max_depth)
    try:
        with safe_open(file, framework="pt") as f:
            trained_at = int(f.metadata()["step"])
        head.load_state_dict(load_file(file))
    except Exception as e:  # safetensors' own error, a missing step, tensors that do not fit
        raise ValueError(f"cannot read {file}: {e!r}; {again}") from e
    if trained_at != (step := checkpoint_step(run)):
        raise ValueError(f"{file} was trained on step {trained_at}, the checkpoint holds step {step}: {again}")
    model.exit_head = head.to(model.base.embed_tokens.weight.device).requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------
# Decoding with an exit per token

def decode(model, ids, pos, exit):
    """Cached decoding of ids [B, T] at positions pos [T], through the caches of model.setup_caches (its depth:
    the most steps any token runs) -> (logits [B, T, V], the recurrent steps each token ran).

    exit = (criterion in EXITS, threshold): a token stops after the first step whose criterion falls below the
    threshold. For every later step k it counts as if its state had stayed h_e: step k's cache gets the K/V of its
    last computed step (as Huginn and Ouro fill them), and h_e enters step k's running sum. In a batch its later
    steps are computed and discarded while other rows run on (no host sync per step); at batch 1 none is once it
    has stopped. With an exit a chunk is decoded a token at a time: a stopped token's K/V are carried only after
    the step, so later tokens of the same chunk would attend to K/V it never computed."""
    depth = len(model.step_caches)
    if ids.shape[1] > 1:
        out = [decode(model, ids[:, t:t + 1], pos[t:t + 1], exit) for t in range(ids.shape[1])]
        return torch.cat([o[0] for o in out], 1), torch.cat([o[1] for o in out], 1)
    x, rope = model.base.embed(ids, pos)
    x = through(model.prelude, x, rope, pos)
    stopped = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    steps = torch.full(ids.shape, depth, device=ids.device)
    criterion, threshold, done = EXITS[exit[0]], exit[1], False
    for k in range(depth):
        if done:  # batch 1, stopped: nothing left to compute, only carried forward
            carry(model, k, pos, stopped)
            model.sums[k] += x.float().sum(1, keepdim=True)
            continue
        h = model.step(x, k, rope, pos)
        if k > 0:
            carry(model, k, pos, stopped)
        h = torch.where(stopped[..., None], x, h)
        stop = ~stopped & (criterion(model, x, h, k) < threshold)
        steps.masked_fill_(stop, k + 1)  # not steps[stop] = ...: a boolean index waits for the device
        stopped |= stop
        x = h
        done = len(ids) == 1 and bool(stopped.all())  # the one sync, where it buys the steps skipped
    return model.base.head(through(model.coda, x, rope, pos)), steps


def carry(model, k: int, pos, stopped):
    """Tokens that have stopped (stopped [B, 1]) keep the K/V of their last computed step in step k's cache."""
    before, now, m = model.step_caches[k - 1], model.step_caches[k], stopped[:, None, :, None]
    for old, new in ((before.k, now.k), (before.v, now.v)):
        new.index_copy_(2, pos, torch.where(m, old.index_select(2, pos), new.index_select(2, pos)))


def refuse_mean_pool(run: str):
    """Before anything loads: a controller that is not causal (pool='mean' sees the future) cannot decode."""
    cfg = read_config(run)
    with torch.device("meta"):  # the variant says so itself, whatever it is
        causal = VARIANTS[cfg.variant](8, cfg).causal
    if not causal:
        raise ValueError(f"{run}'s controller is not causal (pool={cfg.pool!r} sees the future), so it cannot decode "
                         "through the KV cache: measure a causal run")


# ----------------------------------------------------------------------------------------------
# Evaluation: every way of stopping, on held-out documents in two halves

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
    teacher-forced, each token's exit its own: what decoding does. One batch shares the weight reads."""
    model.setup_caches(len(x), x.shape[1], depth)
    losses, steps = [], []
    for t in range(x.shape[1]):
        with autocast:
            logits, s = decode(model, x[:, t:t + 1], torch.tensor([t], device=x.device), exit)
        losses.append(F.cross_entropy(logits[:, 0].float(), y[:, t], reduction="none"))
        steps.append(s[:, 0].float())
    return torch.stack(losses, 1).mean(1).tolist(), torch.stack(steps, 1).mean(1).tolist()


def rows(model, windows: Windows, n: int, depth: int, criteria: dict, autocast):
    """Every way of stopping, measured on `n` windows: each fixed depth 1..depth and the oracle at three
    epsilons (from the per-token losses after every step), and each criterion at each of its thresholds
    (decoded). A row: its kind, its setting, the loss and the mean steps of every window."""
    x, y = windows.batch(windows.spread(n), model.base.embed_tokens.weight.device)
    with autocast:
        losses = torch.cat([step_losses(model, x[i:i + 8], y[i:i + 8], depth)[0] for i in range(0, len(x), 8)], 1)
    out = [{"kind": "fixed", "at": d, "loss": losses[d - 1].mean(-1).tolist(), "steps": [float(d)] * len(x)}
           for d in range(1, depth + 1)]
    for eps in (0.02, 0.05, 0.1):
        first = first_within(losses, eps)
        loss = losses.gather(0, (first - 1)[None])[0].mean(-1).tolist()
        out.append({"kind": "oracle", "at": eps, "loss": loss, "steps": first.float().mean(-1).tolist()})
    for kind, thresholds in criteria.items():
        for th in thresholds:
            loss, steps = decoded(model, x, y, depth, (kind, th), autocast)
            out.append({"kind": kind, "at": th, "loss": loss, "steps": steps})
            print(f"{kind} < {th:g}: loss {np.mean(loss):.3f}, {np.mean(steps):.2f} steps", file=sys.stderr, flush=True)
    return out


def evaluate_adaptive(run: str, depth: int, criteria: dict, windows: int, device="auto", precision="auto"):
    """Adaptive depth on held-out documents, calibration and evaluation halves apart: rows() of each."""
    where, dtype, autocast = placement(device, precision)
    model, cfg = load_run(run, dtype, where)
    attach_exit_head(model, run)
    if "learned" in criteria and getattr(model, "exit_head", None) is None:
        criteria = {k: v for k, v in criteria.items() if k != "learned"}
        print(f"{run} has no exit head (python extras/exits.py head --run {run}): the learned exit is left out",
              file=sys.stderr)
    eos = load_config(cfg.model).eos_token_id
    parts = halves(load_splits(cfg)[1], cfg.seq_len, eos[0] if isinstance(eos, list) else eos)
    return {"run": run, "label": name(cfg), "seq_len": cfg.seq_len, "deepest": depth,
            "windows": {p: len(w.spread(windows)) for p, w in zip(PARTS, parts)},
            "parts": {p: rows(model, w, windows, depth, criteria, autocast) for p, w in zip(PARTS, parts)}}


def calibrated(result, kind: str, tolerance: float):
    """The threshold of `kind` chosen on the calibration documents: the fewest mean steps whose mean loss
    is within `tolerance` of the deepest fixed depth's there (CALM-style); None if none is."""
    rows = result["parts"]["calibration"]
    deepest = np.mean(next(r for r in rows if r["kind"] == "fixed" and r["at"] == result["deepest"])["loss"])
    good = [r for r in rows if r["kind"] == kind and np.mean(r["loss"]) <= deepest + tolerance]
    return min(good, key=lambda r: np.mean(r["steps"]))["at"] if good else None


def against_fixed(rows, row):
    """The paired difference of a row's loss, window by window, to the fixed-depth curve at the same mean
    steps (interpolated between the two depths around them): (mean, low, high)."""
    fixed = {r["at"]: np.array(r["loss"]) for r in rows if r["kind"] == "fixed"}
    s = min(max(np.mean(row["steps"]), min(fixed)), max(fixed))
    lo, hi = int(np.floor(s)), int(np.ceil(s))
    curve = fixed[lo] + (s - lo) * (fixed[hi] - fixed[lo])
    return bootstrap(np.array(row["loss"]) - curve)


def adaptive_markdown(result, tolerance=0.02) -> str:
    """The evaluation half: every row with its intervals, the thresholds chosen on the calibration half,
    and whether the learned exit meets the goals (within `tolerance` of the deepest depth with at most
    half its steps; below the fixed-depth curve at equal mean steps)."""
    rows, D = result["parts"]["evaluation"], result["deepest"]
    deepest = np.array(next(r for r in rows if r["kind"] == "fixed" and r["at"] == D)["loss"])
    w = result["windows"]
    out = [f"`{result['run']}` ({result['label']}): held-out documents in two halves, thresholds chosen on "
           f"{w['calibration']} windows of one ({tolerance} nats over depth {D}) and scored on {w['evaluation']} "
           f"windows x {result['seq_len']} tokens of the other; the exits decoded token by token through the KV "
           "cache (teacher-forced), the oracle and fixed depths from every step's readout. [95% CI]: bootstrap "
           "over windows." + (f" `{result['command']}`" if "command" in result else ""), "",
           f"| decoding | mean steps [95% CI] | loss [95% CI] | Δ vs depth {D} [95% CI] | "
           "Δ vs fixed depths at equal steps [95% CI] |", "|---|---|---|---|---|"]
    chosen = {k: calibrated(result, k, tolerance) for k in {r["kind"] for r in rows} - {"fixed", "oracle"}}
    curves = {(r["kind"], r["at"]): against_fixed(rows, r) for r in rows if r["kind"] != "fixed"}
    for r in rows:
        what = {"fixed": f"fixed depth {r['at']}", "oracle": f"oracle, ε = {r['at']:g}"}.get(
            r["kind"], f"{r['kind']} < {r['at']:g}" + (" (calibrated)" if chosen.get(r["kind"]) == r["at"] else ""))
        cells = [bootstrap(r["steps"]), bootstrap(r["loss"]), bootstrap(np.array(r["loss"]) - deepest)]
        curve = "-" if r["kind"] == "fixed" else "{:+.3f} [{:+.3f}, {:+.3f}]".format(*curves[r["kind"], r["at"]])
        out.append(f"| {what} | {cells[0][0]:.2f} [{cells[0][1]:.2f}, {cells[0][2]:.2f}] | {cells[1][0]:.3f} "
                   f"[{cells[1][1]:.3f}, {cells[1][2]:.3f}] | {cells[2][0]:+.3f} [{cells[2][1]:+.3f}, "
                   f"{cells[2][2]:+.3f}] | {curve} |")
    out.append("")
    for kind, at in sorted(chosen.items()):
        if at is None:
            out.append(f"- {kind}: no threshold keeps the calibration loss within {tolerance} nats of depth {D}.")
            continue
        r = next(r for r in rows if r["kind"] == kind and r["at"] == at)
        rise, steps = np.mean(r["loss"]) - deepest.mean(), np.mean(r["steps"])
        below = sum(curves[kind, q["at"]][2] < 0 for q in rows if q["kind"] == kind)
        out.append(f"- {kind}, calibrated threshold {at:g}: {steps:.2f} mean steps ({100 * steps / D:.0f}% of {D}), "
                   f"loss {rise:+.3f} nats over depth {D} on the evaluation half; below the fixed-depth curve at "
                   f"equal steps (interval under 0) at {below} of its thresholds.")
    best = min((r for r in rows if r["kind"] == "fixed"), key=lambda r: np.mean(r["loss"]))
    if best["at"] != D:  # then "within tolerance of the deepest step" is met by stopping early at all
        out.append(f"- fixed: depth {best['at']} is the best ({np.mean(best['loss']):.3f}, "
                   f"{np.mean(best['loss']) - deepest.mean():+.3f} nats against depth {D}): the deepest step is not.")
    oracle = [r for r in rows if r["kind"] == "oracle"]
    out.append("- oracle: " + ", ".join(f"ε {r['at']:g}: {np.mean(r['steps']):.2f} steps" for r in oracle)
               + f", of {D}: no exit rule can do better at that ε.")
    return "\n".join(out)


def adaptive_plot(result, file):
    """Mean steps against loss on the evaluation half, with 95% intervals both ways, one line per kind."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("matplotlib is not installed: no plot", file=sys.stderr)
    rows = result["parts"]["evaluation"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, style in (("fixed", "o-"), ("oracle", "^:"), ("latent-diff", "s--"), ("learned", "D-")):
        rs = sorted((r for r in rows if r["kind"] == kind), key=lambda r: np.mean(r["steps"]))
        if not rs:
            continue
        (xs, xl, xh), (ys, yl, yh) = (np.array([bootstrap(r[key]) for r in rs]).T for key in ("steps", "loss"))
        ax.errorbar(xs, ys, xerr=[xs - xl, xh - xs], yerr=[ys - yl, yh - ys], fmt=style, capsize=2, label=kind)
    ax.set(xlabel="mean recurrent steps per token", ylabel="held-out loss (nats)", title=result["label"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    return file


# ----------------------------------------------------------------------------------------------
# The commands

def deepest(a) -> int:
    """--depth, checked against the run (default: its largest training depth), before anything loads."""
    cfg = read_config(a.run)
    depth = a.depth or max(cfg.depths)
    if not 1 <= depth <= cfg.max_depth or getattr(a, "windows", 1) < 1:
        raise ValueError(f"--depth {depth} must be in 1..{cfg.max_depth} (the run's step norms), --windows at least 1")
    return depth


def head_command(a):
    """Train the run's exit head on its training windows and save it beside the checkpoint."""
    depth, device = deepest(a), placement(a.device, "fp32")[0]
    model, cfg = load_run(a.run, torch.float32, device)  # no exit head attached: one of an earlier step is replaced
    head, loss, oracle = train_exit_head(model, Windows(load_splits(cfg)[0], cfg.seq_len), depth, device, a.windows)
    about = {"step": checkpoint_step(a.run), "epsilon": EPSILON, "depth": depth, "windows": a.windows}
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    write_atomic(os.path.join(a.run, "exit.safetensors"), save(tensors, metadata={k: str(v) for k, v in about.items()}))
    print(f"exit head of {a.run}: BCE {loss:.4f} on {a.windows} training windows, whose oracle at epsilon "
          f"{EPSILON} stops after {oracle:.2f} of {depth} steps on average; saved {a.run}/exit.safetensors")


def eval_command(a):
    """Measure every fixed depth, the oracle and the exits on two held-out halves -> adaptive.json, .md, .png."""
    criteria = {}
    for kind, text in (("latent-diff", a.latent_diff), ("learned", a.learned)):
        try:
            criteria[kind] = [float(t) for t in text.split(",")]
        except ValueError:
            raise ValueError(f"--{kind} {text!r}: give comma-separated numbers, e.g. 0.03,0.05,0.1") from None
    refuse_mean_pool(a.run)
    result = evaluate_adaptive(a.run, deepest(a), criteria, a.windows, a.device, a.precision)
    result["command"] = a.line
    out = a.out or a.run
    os.makedirs(out, exist_ok=True)
    table = adaptive_markdown(result)
    write_atomic(os.path.join(out, "adaptive.json"), json.dumps(result, indent=2).encode())
    write_atomic(os.path.join(out, "adaptive.md"), (table + "\n").encode())
    adaptive_plot(result, os.path.join(out, "adaptive.png"))
    print(json.dumps(result, indent=2) if a.json else table)


def generate_command(a):
    """Sample from the run with an exit per token (generate.py's sampling).

    Cached, or (--no-cache) every token decoded again from a fresh cache: the reference that carrying the cache
    is tested against."""
    try:
        threshold = float(a.exit[1])
    except ValueError:
        threshold = math.nan
    if a.exit[0] not in EXITS or math.isnan(threshold):
        raise ValueError(f"--exit {' '.join(a.exit)}: give a criterion ({', '.join(EXITS)}) and a number")
    refuse_mean_pool(a.run)
    a.depth = deepest(a)
    device, dtype, autocast = placement(a.device, a.precision)
    model, cfg = load_run(a.run, dtype, device)
    attach_exit_head(model, a.run)
    config, tok = load_config(cfg.model), load_tokenizer(cfg.model)
    prompt = torch.tensor([tok.encode(a.prompt).ids], device=device)
    new = min(a.max_new_tokens, config.max_position_embeddings - prompt.shape[1])
    if prompt.shape[1] == 0 or new < 1:
        raise ValueError(f"--prompt is {prompt.shape[1]} tokens: give some, and fewer than the model's context")
    model.setup_caches(1, prompt.shape[1] + new, a.depth)
    depths = []  # the steps run at the position that predicted each new token

    def forward(ids, pos):
        if pos is None:  # --no-cache: the whole sequence again, from a fresh cache
            model.setup_caches(1, ids.shape[1], a.depth)
            pos = torch.arange(ids.shape[1], device=device)
        logits, steps = decode(model, ids, pos, (a.exit[0], threshold))
        depths.append(steps[0, -1])
        return logits
    gen = torch.Generator(device).manual_seed(a.seed)
    eos = {config.eos_token_id} if isinstance(config.eos_token_id, int) else set(config.eos_token_id or ())
    with autocast:
        tokens, prefill, dt = generate(forward, prompt, new, lambda logits: pick_token(
            logits, a.temperature, a.top_k, a.top_p, gen), eos, not a.no_cache)
    depths, speed = torch.stack(depths).tolist(), (len(tokens) - 1) / dt if len(tokens) > 1 else float("nan")
    if a.json:
        return print(json.dumps({"ids": tokens, "depths": depths, "text": tok.decode(tokens), "tokens_per_s": speed,
                                 "prefill_s": prefill}))
    print(a.prompt + tok.decode(tokens))
    print(f"\n[{len(tokens)} tokens, {speed:.1f} tok/s, {np.mean(depths):.2f} recurrent steps per token of at most "
          f"{a.depth}; prefill of {prompt.shape[1]} in {prefill * 1e3:.0f} ms]", file=sys.stderr)


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    c = {n: commands.add_parser(n, help=f.__doc__.split("\n")[0]) for n, f in COMMANDS.items()}
    for command in c.values():
        command.add_argument("--run", required=True, help="a run folder written by train.py")
        command.add_argument("--device", default="auto")
    for command in (c["head"], c["eval"]):
        command.add_argument("--depth", type=int, default=None, help="the deepest step (default: the run's largest)")
    c["head"].add_argument("--windows", type=int, default=32, help="training windows the labels are computed on")
    c["eval"].add_argument("--windows", type=int, default=16, help="windows of each held-out half")
    c["eval"].add_argument("--latent-diff", default=LATENT_DIFF, help=f"its thresholds (default {LATENT_DIFF})")
    c["eval"].add_argument("--learned", default=LEARNED, help=f"thresholds on 1 - lambda (default {LEARNED}), "
                           "when the run has an exit head")
    c["eval"].add_argument("--out", help="the folder for adaptive.json, .md and .png (default: the run's)")
    g = c["generate"]
    g.add_argument("--prompt", required=True)
    g.add_argument("--exit", nargs=2, required=True, metavar=("CRITERION", "THRESHOLD"),
                   help=f"{' or '.join(EXITS)} and its threshold: a token stops below it, e.g. learned 0.3")
    g.add_argument("--depth", type=int, default=8, help="the most recurrent steps per token")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    g.add_argument("--top-k", type=int, default=200, help="0: off")
    g.add_argument("--top-p", type=float, default=1.0, help="1: off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-cache", action="store_true", help="decode the whole sequence again for every token")
    for command in (c["eval"], g):
        command.add_argument("--precision", default="auto")
        command.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


COMMANDS = {"head": head_command, "eval": eval_command, "generate": generate_command}


def main(argv):
    a = parser().parse_args(argv)
    a.line = "python extras/exits.py " + " ".join(argv)  # what eval records with its result
    COMMANDS[a.command](a)


if __name__ == "__main__":
    cli(main)
