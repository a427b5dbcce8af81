"""Evaluate trained runs against the full model and the pruned baseline.

    python eval.py --run runs/controller-causal-s0
    python eval.py --run runs/* --out results      # many runs: one table, seeds averaged

For each split (training distribution, held-out documents) it measures the loss of the full model,
of the pruned baseline (prelude -> recurrent layer once -> coda, nothing trained) and of every run
at each depth, on the same fixed windows, and reports

    loss reduction % = (pruned - x) / pruned        gap recovered % = (pruned - x) / (pruned - full)
"""
import argparse
import json
import math
import os
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F

from data import ROOT, Windows, load_splits
from load_qwen import cli, load_model, load_run, parse_depths, pick_device, precision, run_config

SPLITS = ("train", "held_out")


def label(cfg: dict) -> str:
    if cfg["variant"] == "none":
        return "gate + step norm only" if cfg["gate"] else "no LoRA, no gate"
    name = {"controller": f"controller ({cfg['pool']})", "static": "static diagonals"}[cfg["variant"]]
    return name + ("" if cfg["gate"] else ", no gate")


def evaluate(runs, depths, windows, device_name="auto", precision_mode="auto"):
    """{"reference": {split: {"full", "pruned"}}, "runs": [{run, label, seed, split: {depth: loss}}]}."""
    device = pick_device(device_name)
    dtype, autocast = precision(device, precision_mode)
    cfgs = [run_config(run) for run in runs]
    shared = ("model", "data", "held_out", "seq_len", "prelude", "recurrent", "coda")
    if any([c[k] for k in shared] != [cfgs[0][k] for k in shared] for c in cfgs[1:]):
        raise ValueError("runs compared in one table must share model, data, split, seq_len and layer split: "
                         "evaluate such runs separately")
    first = cfgs[0]
    model_dir = first["model"]
    streams = load_splits(first["data"], model_dir, first["held_out"], first.get("text_field", "text"))
    data = {s: Windows(t, first["seq_len"]) for s, t in zip(SPLITS, streams)}
    loss = lambda fn, split: data[split].mean_loss(fn, windows, first["batch_size"], device, autocast)

    shown = os.path.relpath(model_dir, ROOT)  # inside the repository: the same text on every machine
    result = {"model": model_dir if shown.startswith("..") else shown, "windows": windows,
              "seq_len": first["seq_len"], "depths": depths,
              "split": f"{first['prelude']} + [{first['recurrent']}] + {first['coda']}", "reference": {}, "runs": []}
    full = load_model(model_dir, dtype, device)
    result["reference"] = {s: {"full": loss(lambda x, y: full(x, labels=y), s)} for s in SPLITS}
    full = None  # free it before the runs are loaded
    for run, cfg in zip(runs, cfgs):
        model, _ = load_run(run, dtype, device)
        if "pruned" not in result["reference"]["train"]:
            for s in SPLITS:
                result["reference"][s]["pruned"] = loss(lambda x, y: model.pruned(x, labels=y), s)
        entry = {"run": run, "label": label(cfg), "seed": cfg["seed"]}
        for s in SPLITS:
            entry[s] = {d: loss(lambda x, y: model(x, depth=d, labels=y), s) for d in depths}
        result["runs"].append(entry)
        print(f"evaluated {run}", file=sys.stderr, flush=True)
    return result


@torch.no_grad()
def decoded_loss(model, windows: Windows, n: int, depth: int, exit, device, autocast):
    """(loss, mean recurrent steps per token) of `n` windows decoded token by token through the KV
    cache, teacher-forced: what decoding really does, each token's exit its own. One batch: decoding
    one token reads every weight, so the windows share that cost."""
    x, y = windows.batch(windows.spread(n), device)
    cache = model.new_cache(len(x), x.shape[1], depth)
    loss = steps = 0.0
    for t in range(x.shape[1]):
        with autocast:
            logits, s = model.decode(x[:, t:t + 1], cache, exit)
        loss += F.cross_entropy(logits[:, 0].float(), y[:, t], reduction="sum").item()
        steps += s.sum().item()
    return loss / y.numel(), steps / y.numel()


def evaluate_adaptive(run, depths, thresholds, windows, criterion="latent-diff", device_name="auto",
                      precision_mode="auto"):
    """Adaptive depth on held-out text: `criterion` at each threshold, at most max(depths) steps, decoded
    through the cache; next to the fixed depths (the plain forward: tests/test_decode.py shows the
    cached decoder gives the same logits)."""
    device = pick_device(device_name)
    dtype, autocast = precision(device, precision_mode)
    model, cfg = load_run(run, dtype, device)
    held = Windows(load_splits(cfg["data"], cfg["model"], cfg["held_out"], cfg.get("text_field", "text"))[1],
                   cfg["seq_len"])
    rows = [{"depth": d, "threshold": None, "steps": d, "loss": held.mean_loss(
        lambda x, y: model(x, depth=d, labels=y), windows, cfg["batch_size"], device, autocast)} for d in depths]
    for th in thresholds:
        loss, steps = decoded_loss(model, held, windows, max(depths), (criterion, th), device, autocast)
        rows.append({"depth": max(depths), "threshold": th, "steps": steps, "loss": loss})
        print(f"{criterion} < {th:g}: loss {loss:.3f}, {steps:.2f} steps per token", file=sys.stderr, flush=True)
    return {"run": run, "label": label(cfg), "criterion": criterion, "windows": windows, "seq_len": cfg["seq_len"],
            "rows": rows}


def adaptive_markdown(result, tolerance=0.02) -> str:
    deepest = max((r for r in result["rows"] if r["threshold"] is None), key=lambda r: r["depth"])
    out = [f"`{result['run']}` ({result['label']}), held-out documents, {result['windows']} windows x "
           f"{result['seq_len']} tokens; the exits decoded token by token through the KV cache (teacher-forced).", "",
           "| decoding | mean recurrent steps per token | held-out loss |", "|---|---|---|"]
    for r in result["rows"]:
        what = (f"fixed depth {r['depth']}" if r["threshold"] is None
                else f"{result['criterion']} < {r['threshold']:g}, at most {r['depth']}")
        out.append(f"| {what} | {r['steps']:.2f} | {r['loss']:.3f} |")
    close = [r for r in result["rows"] if r["threshold"] is not None and r["loss"] <= deepest["loss"] + tolerance]
    if close:
        best = min(close, key=lambda r: r["steps"])
        out += ["", f"Within {tolerance} nats of fixed depth {deepest['depth']} ({deepest['loss']:.3f}): "
                f"{best['steps']:.2f} steps per token ({100 * best['steps'] / deepest['depth']:.0f}% of "
                f"{deepest['depth']}), at threshold {best['threshold']:g}."]
    else:
        out += ["", f"No threshold came within {tolerance} nats of fixed depth {deepest['depth']}."]
    return "\n".join(out)


def adaptive_plot(result, file):
    plt = pyplot()
    if plt is None:
        return None
    fixed = [r for r in result["rows"] if r["threshold"] is None]
    exits = [r for r in result["rows"] if r["threshold"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["steps"] for r in fixed], [r["loss"] for r in fixed], "o-", label="fixed depth")
    ax.plot([r["steps"] for r in exits], [r["loss"] for r in exits], "s--", label=result["criterion"] + " exit")
    for r in exits:
        ax.annotate(f"{r['threshold']:g}", (r["steps"], r["loss"]), fontsize=7, textcoords="offset points", xytext=(4, 4))
    ax.set(xlabel="mean recurrent steps per token", ylabel="held-out loss (nats)", title=result["label"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    return file


def stats(values):
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def by_label(result) -> dict:
    """{label: [runs]}: the seeds of one variant, in the order the runs were given."""
    groups = defaultdict(list)
    for r in result["runs"]:
        groups[r["label"]].append(r)
    return groups


def markdown(result) -> str:
    """One table per split: reference rows, then each label's mean (± std over seeds) per depth."""
    out = [f"Model `{result['model']}`, layers {result['split']}, {result['windows']} windows x "
           f"{result['seq_len']} tokens per split. Loss is mean next-token cross-entropy (nats)."]
    for s in SPLITS:
        ref = result["reference"][s]
        full, pruned = ref["full"], ref["pruned"]
        out += ["", f"**{'training distribution' if s == 'train' else 'held-out documents'}**", "",
                "| model | depth | seeds | loss | loss reduction | gap recovered |", "|---|---|---|---|---|---|",
                f"| full model | - | - | {full:.3f} | - | 100% |", f"| pruned baseline | 1 | - | {pruned:.3f} | 0.0% | 0.0% |"]
        for name, rs in by_label(result).items():
            for d in result["depths"]:
                m, sd = stats([r[s][d] for r in rs])
                pm = f" ± {sd:.3f}" if len(rs) > 1 else ""
                out.append(f"| {name} | {d} | {len(rs)} | {m:.3f}{pm} | {100 * (pruned - m) / pruned:.1f}% | "
                           f"{100 * (pruned - m) / (pruned - full):.1f}% |")
    return "\n".join(out)


def pyplot():
    """matplotlib.pyplot drawing to files, or None (with a hint) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def plot(result, file):
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, s in zip(axes, SPLITS):
        ref = result["reference"][s]
        for name, rs in by_label(result).items():
            ms = [stats([r[s][d] for r in rs]) for d in result["depths"]]
            ax.errorbar(result["depths"], [m for m, _ in ms], yerr=[sd for _, sd in ms], marker="o", capsize=3, label=name)
        ax.axhline(ref["pruned"], color="gray", ls="--", label="pruned baseline")
        ax.axhline(ref["full"], color="black", ls=":", label="full model")
        ax.set(title="training distribution" if s == "train" else "held-out documents", xlabel="depth",
               xticks=result["depths"])
    axes[0].set_ylabel("loss (nats)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    return file


@cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", nargs="+", required=True, help="run folder(s) written by train.py")
    p.add_argument("--depths", default=None, help="default 1,4,8 (and 16 on a GPU)")
    p.add_argument("--windows", type=int, default=16, help="windows per split")
    p.add_argument("--out", default=None, help="folder for results.json/.md/.png (default: the first run's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="bf16: bf16 base + autocast (auto: on GPUs, fp32 on the CPU)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    p.add_argument("--adaptive", default=None, metavar="THRESHOLDS",
                   help="instead: adaptive depth (latent-diff exit) of the first run at these comma-separated "
                        "thresholds, decoded through the KV cache, next to the fixed --depths (adaptive.md/.json/.png)")
    a = p.parse_args(argv)
    device = pick_device(a.device)
    depths = [1, 4, 8] + [16] * (device.type == "cuda")
    problems = [f"--windows {a.windows} must be at least 1"] * (a.windows < 1)
    if a.depths:  # refused before anything is loaded
        try:
            depths = parse_depths(a.depths)
        except ValueError as e:
            problems.append(str(e))
    if a.adaptive is not None:
        try:
            thresholds = [float(t) for t in a.adaptive.split(",")]
        except ValueError:
            problems.append(f"--adaptive {a.adaptive!r}: give comma-separated numbers, e.g. 0.03,0.05,0.1")
        if len(a.run) > 1:
            problems.append("--adaptive measures one run: give a single --run")
        elif run_config(a.run[0])["pool"] == "mean":  # before the fixed depths are computed
            problems.append(f"--adaptive decodes through the KV cache, which {a.run[0]} (pool='mean': its "
                            "controller sees the future) cannot use: measure a pool='causal' run")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))
    if a.adaptive is None:
        result = evaluate(a.run, depths, a.windows, a.device, a.precision)
    else:
        result = evaluate_adaptive(a.run[0], depths, thresholds, a.windows, device_name=a.device,
                                   precision_mode=a.precision)
    out = a.out or a.run[0]
    os.makedirs(out, exist_ok=True)
    stem, table, draw = (("results", markdown(result), plot) if a.adaptive is None
                         else ("adaptive", adaptive_markdown(result), adaptive_plot))
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(table + "\n")
    png = draw(result, os.path.join(out, f"{stem}.png"))
    print(json.dumps(result, indent=2) if a.json else table)
    print(f"wrote {out}/{stem}.json, {stem}.md" + (f", {stem}.png" if png else ""), file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
