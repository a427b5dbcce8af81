"""Evaluate trained runs against the full model, the pruned baseline and each other, with intervals.

    python eval.py --run runs/controller-s0
    python eval.py --run runs/compare/*-s[0-9] --against static,pruned --out results/compare

On the same fixed windows of each split (the training distribution, held-out documents) it scores every
window for the full model, the pruned baseline (prelude -> recurrent layer once -> coda, nothing trained)
and every run at each depth: one pass per window serves every depth, the coda reading the loop out at
each. A variant's seeds are averaged window by window, and each variant is compared with each --against
at the same depth: the mean paired difference, its 95% bootstrap interval (windows resampled), and in how
many seeds it has that sign. Losses are next-token cross-entropy (t+1); a run trained on token t+2
(--label-offset 2, the authors' objective) is also scored on its own. Every window's loss is kept in
results.json, and cached in each run folder (and the references in --out): a new run in a table computes
only itself.

    loss reduction % = (pruned - x) / pruned        gap recovered % = (pruned - x) / (pruned - full)
"""
import argparse
import glob
import json
import os
import sys

import numpy as np
import torch

from data import SIDES as SPLITS, Windows, load_splits
from load_qwen import load_config, load_model, load_ouroboros
from train import FREE, ROOT, SETTINGS, cli, load_checkpoint, placement, read_config, write_atomic

TITLES = {"train": "training distribution", "held_out": "held-out documents"}
TABLE = ("model", "data", "text_field", "held_out", "seq_len", "prelude", "recurrent", "coda")  # a table shares


def load_run(run: str, dtype=torch.float32, device="cpu"):
    """(model, settings) of a trained run: the pruned base with what the run trained."""
    cfg = read_config(run)
    model = load_ouroboros(cfg.model, cfg, dtype, device)
    load_checkpoint(os.path.join(run, "checkpoint.safetensors"), model)
    return model.eval(), cfg


def load_pruned(cfg, dtype=torch.float32, device="cpu", config=None):
    """A run's pruned baseline: the decoder of its kept layers, the recurrent one once and bare, nothing trained."""
    config = config or load_config(cfg.model)
    pre, r, post, _ = cfg.split(config.num_hidden_layers)
    return load_model(cfg.model, dtype, device, pre + [r] + post, config)


def name(cfg) -> str:
    """A run's variant, the name its seeds share: controller-causal, static, gate+norm, ... (-nogate: no gate;
    -r8: rank 8 instead of 32; -s256: the controller's width 256, not 128; +coda_lora-r8: --adapters
    extras.coda_lora:r8; -t+2: trained on token t+2)."""
    text = {"controller": f"controller-{cfg.pool}", "none": "gate+norm" if cfg.gate else "norm-only"}.get(
        cfg.variant, cfg.variant) + ("" if cfg.gate or cfg.variant == "none" else "-nogate")
    text += ("" if cfg.rank == 32 else f"-r{cfg.rank}") + ("" if cfg.style == 128 else f"-s{cfg.style}")
    text += f"+{cfg.adapters.rsplit('.', 1)[-1].replace(':', '-')}" if cfg.adapters else ""
    return text + ("" if cfg.label_offset == 1 else f"-t+{cfg.label_offset}")



def per_window(loss, rows: int, labels) -> torch.Tensor:
    """[objectives, rows]: loss(row, its labels) of every row alone, for each set of labels."""
    return torch.stack([torch.stack([loss(b, y[b:b + 1]) for b in range(rows)]) for y in labels])


def scores(fn, cfg, windows: int, offsets, reach: int, device, autocast) -> dict:
    """{split: fn's losses [..., objectives, windows]} on `windows` fixed windows of each split, with room for the
    labels `reach` tokens ahead; fn(inputs, labels of each offset) -> [..., objectives, batch]."""
    got = {}
    for s, tokens in zip(SPLITS, load_splits(cfg)):
        data = Windows(tokens, cfg.seq_len, reach)
        picked, parts = data.spread(windows), []
        for i in range(0, len(picked), cfg.batch_size):
            x, y = data.batch(picked[i:i + cfg.batch_size], device)
            w = torch.cat([x, y[:, -reach:]], 1)  # the whole window: the labels of each offset
            ys = [w[:, k:k + x.shape[1]] for k in offsets]
            with torch.no_grad(), autocast:
                parts.append(fn(x, ys).float().cpu())
        got[s] = torch.cat(parts, -1)
    return got


def evaluate(runs, depths, windows, device="auto", precision="auto", out=None) -> dict:
    """{"reference": {split: {objective: {"full", "pruned": per-window losses}}},
        "runs": [{run, variant, seed, split: {objective: {depth: per-window losses}}}], ...}"""
    where, dtype, autocast = placement(device, precision)
    cfgs = [read_config(run) for run in runs]
    first, offsets = cfgs[0], sorted({1} | {c.label_offset for c in cfgs})
    if any([getattr(c, k) for k in TABLE] != [getattr(first, k) for k in TABLE] for c in cfgs):
        raise ValueError(f"runs in one table must share {', '.join(TABLE)}: evaluate such runs separately")
    if len(names := [(name(c), c.seed) for c in cfgs]) != len(set(names)):
        raise ValueError("two runs of the same variant and seed: a table takes each once")
    groups, learned = {}, [k for k in SETTINGS if k not in FREE - {"steps"} | {"seed"}]
    for run, c in zip(runs, cfgs):  # a variant's runs are its seeds: alike in all else that shapes what they learn
        other, want = groups.setdefault(name(c), (run, c))
        if differ := [k for k in learned if getattr(c, k) != getattr(want, k)]:
            raise ValueError(f"{run} and {other} are both {name(c)} but differ in {', '.join(differ)}: the runs of a "
                             "variant must differ in --seed only")
    score = lambda fn, offs: scores(fn, first, windows, offs, max(offsets), where, autocast)  # the same windows
    shown = os.path.relpath(first.model, ROOT)  # inside the repository: the same text on every machine
    result = {"model": first.model if shown.startswith("..") else shown, "seq_len": first.seq_len, "depths": depths,
              "split": f"{first.prelude} + [{first.recurrent}] + {first.coda}",
              "command": "python eval.py " + " ".join(sys.argv[1:]), "runs": []}
    weights = [(f, os.path.getsize(f), os.path.getmtime(f))  # a model converted again invalidates the cached losses
               for f in sorted(glob.glob(os.path.join(glob.escape(first.model), "*.safetensors")))]
    key = {k: getattr(first, k) for k in TABLE} | {"dtype": str(dtype), "windows": windows, "offsets": offsets,
                                                   "tokens": os.path.dirname(load_splits(first)[0].filename),
                                                   "weights": weights}

    def references():
        full = load_model(first.model, dtype, where)
        f = score(lambda x, ys: per_window(lambda b, y: full(x[b:b + 1], labels=y), len(x), ys), offsets)
        del full  # freed before the pruned model is loaded
        model = load_pruned(first, dtype, where)
        p = score(lambda x, ys: per_window(lambda b, y: model(x[b:b + 1], labels=y), len(x), ys), offsets)
        return {s: {f"t+{o}": {"full": f[s][j].tolist(), "pruned": p[s][j].tolist()} for j, o in enumerate(offsets)}
                for s in SPLITS}

    result["reference"] = memo(os.path.join(out or runs[0], "reference-losses.json"), key | {"split": result["split"]},
                               references)
    result["windows"] = {s: len(result["reference"][s]["t+1"]["full"]) for s in SPLITS}  # fewer if a split is short
    for run, cfg in zip(runs, cfgs):
        ckpt = os.stat(os.path.join(run, "checkpoint.safetensors"))
        losses = memo(os.path.join(run, "eval-losses.json"), key | {"checkpoint": ckpt.st_mtime_ns, "depths": depths},
                      lambda: run_losses(run, cfg, depths, dtype, where, score))
        result["runs"].append({"run": run, "variant": name(cfg), "seed": cfg.seed, "label_offset": cfg.label_offset,
                               **losses})
        print(f"evaluated {run}", file=sys.stderr, flush=True)
    return result


def run_losses(run: str, cfg, depths, dtype, device, score) -> dict:
    """Per-window losses of a run at every depth, on the next token and, if it was trained on another, on its own."""
    model, _ = load_run(run, dtype, device)
    own = sorted({1, cfg.label_offset})

    def at_depths(x, ys):
        h = model.readout(x, depths)  # one pass: the coda reads the loop out at every depth
        return torch.stack([per_window(lambda b, y: model.base.head(h[d][b:b + 1], y), len(x), ys) for d in depths])
    got = score(at_depths, own)
    return {s: {f"t+{o}": {str(d): got[s][i, j].tolist() for i, d in enumerate(depths)} for j, o in enumerate(own)}
            for s in SPLITS}


def memo(file: str, key: dict, compute):
    """compute(), kept in `file` beside its key and reused while the key is the same."""
    key = json.loads(json.dumps(key))
    if os.path.isfile(file):
        with open(file) as f:
            saved = json.load(f)
        if saved["key"] == key:
            return saved["value"]
    value = compute()
    os.makedirs(os.path.dirname(file) or ".", exist_ok=True)
    write_atomic(file, json.dumps({"key": key, "value": value}).encode())
    return value


def bootstrap(values, level=0.95, samples=10_000, seed=0):
    """(mean, low, high): the mean of per-window values and its percentile bootstrap interval. Windows are
    resampled with replacement: they are what varies (a variant's seeds are averaged per window)."""
    v = np.asarray(values, dtype=np.float64)
    means = v[np.random.default_rng(seed).integers(0, len(v), (samples, len(v)))].mean(1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(v.mean()), float(low), float(high)


def summary(result, against=("pruned",)) -> list:
    """One row per (split, objective, model, depth): the loss and its interval, the spread over seeds, and the
    paired difference to each of `against` at the same depth with its interval ("diffs") and seed by seed
    ("seed_diffs": a seed is the same batches for both rows; against a reference, each seed against it)."""
    rows = []
    for s in SPLITS:
        for objective, ref in result["reference"][s].items():
            groups = {}
            for r in result["runs"]:
                if objective in r[s]:
                    groups.setdefault(r["variant"], []).append(r)
            windows = lambda m, d: np.array(ref[m]) if m in ref else np.mean([r[s][objective][str(d)]
                                                                               for r in groups[m]], 0)
            seeds_of = lambda m, d: {r["seed"]: np.mean(r[s][objective][str(d)]) for r in groups.get(m, [])}
            targets = [a for a in against if a in ref or a in groups] or ["pruned"]
            full, pruned = np.mean(ref["full"]), np.mean(ref["pruned"])
            for m, d in [("full", None), ("pruned", 1)] + [(v, d) for v in groups for d in result["depths"]]:
                w, mine = windows(m, d), seeds_of(m, d)
                loss, low, high = bootstrap(w)
                diffs = {b: bootstrap(w - windows(b, d)) for b in targets if b != m and (m not in ref or b in ref)}
                theirs = {b: {seed: np.mean(ref[b]) for seed in mine} if b in ref else seeds_of(b, d) for b in diffs}
                rows.append({"split": s, "objective": objective, "model": m, "depth": d, "seeds": len(mine),
                             "loss": loss, "low": low, "high": high, "against": targets, "diffs": diffs,
                             "seed_sd": float(np.std(list(mine.values()), ddof=1)) if len(mine) > 1 else None,
                             "seed_diffs": {b: {seed: x - theirs[b][seed] for seed, x in mine.items()
                                                if seed in theirs[b]} for b in diffs},
                             "reduction": 100 * (pruned - loss) / pruned,
                             "gap": 100 * (pruned - loss) / (pruned - full)})
    return rows


def markdown(result) -> str:
    """One table per split and objective; * marks a difference whose interval excludes 0."""
    w = result["windows"]
    w = f"{w['train']} windows" if w["train"] == w["held_out"] else f"{w['train']} and {w['held_out']} windows"
    out = [f"Model `{result['model']}`, layers {result['split']}, {w} x {result['seq_len']} "
           "tokens per split, the same windows for every row. Loss: mean cross-entropy (nats) of the next token "
           "(t+1) unless the table says t+2. [95% CI]: percentile bootstrap over windows, a variant's seeds "
           "averaged per window: it reflects which windows were drawn, not how seeds vary (± is the standard "
           "deviation over seeds). Δ is the paired difference at the same depth (negative: lower loss), * where its "
           "interval excludes 0; k/n seeds: in k of the n seeds both rows share (the same batches; against a "
           "reference, each seed), the difference has the sign of Δ."]
    for s in SPLITS:
        for objective in result["reference"][s]:
            table = [r for r in result["summary"] if r["split"] == s and r["objective"] == objective]
            targets = table[0]["against"]
            out += ["", f"**{TITLES[s]}, token {objective}**", "",
                    "| model | depth | seeds | loss [95% CI] | ± seeds | "
                    + " | ".join(f"Δ vs {b} [95% CI]" for b in targets) + " | gap recovered |",
                    "|---|---|---|---|---|" + "---|" * len(targets) + "---|"]
            for r in table:
                cells = []
                for b in targets:
                    if b not in r["diffs"]:
                        cells.append("-")
                        continue
                    m, low, high = r["diffs"][b]
                    per_seed = list(r["seed_diffs"][b].values())
                    agree = f", {sum(np.sign(x) == np.sign(m) for x in per_seed)}/{len(per_seed)} seeds"
                    cells.append(f"{m:+.3f} [{low:+.3f}, {high:+.3f}]" + (" *" if low > 0 or high < 0 else "")
                                 + (agree if len(per_seed) > 1 else ""))
                sd = "" if r["seed_sd"] is None else f"{r['seed_sd']:.3f}"
                gap = f"{r['gap']:.1f}%" if objective == "t+1" else "-"  # the full model was not trained for t+2
                out.append(f"| {r['model']} | {r['depth'] or '-'} | {r['seeds'] or '-'} | {r['loss']:.3f} "
                           f"[{r['low']:.3f}, {r['high']:.3f}] | {sd} | {' | '.join(cells)} | {gap} |")
    return "\n".join(out)


def plot(result, file):
    """Next-token loss against depth per variant (top) and the paired difference to the first --against
    (bottom), with 95% intervals; one column per split. Variants far above the pruned baseline are left out."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("matplotlib is not installed: no plot", file=sys.stderr)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True, sharey="row")
    off = set()
    for col, s in enumerate(SPLITS):
        rows = [r for r in result["summary"] if r["split"] == s and r["objective"] == "t+1"]
        base, ref = rows[0]["against"][0], {r["model"]: r for r in rows if r["model"] in ("full", "pruned")}
        for m in dict.fromkeys(r["model"] for r in rows if r["model"] not in ref):
            rs = [r for r in rows if r["model"] == m]
            if max(r["loss"] for r in rs) > 1.25 * ref["pruned"]["loss"]:
                off.add(m)
                continue
            for ax, stats in ((axes[0, col], [(r["loss"], r["low"], r["high"]) for r in rs]),
                              (axes[1, col], [r["diffs"].get(base, (np.nan,) * 3) for r in rs])):
                mean, lo, hi = np.array(stats).T
                ax.errorbar([r["depth"] for r in rs], mean, yerr=[mean - lo, hi - mean], marker="o", capsize=3, label=m)
        axes[0, col].axhline(ref["pruned"]["loss"], color="gray", ls="--", label="pruned baseline")
        axes[0, col].axhline(ref["full"]["loss"], color="black", ls=":", label="full model")
        axes[1, col].axhline(0, color="gray", lw=0.8)
        axes[0, col].set(title=TITLES[s])
        axes[1, col].set(xlabel="depth", xticks=result["depths"])
    axes[0, 0].set_ylabel("next-token loss (nats)")
    axes[1, 0].set_ylabel(f"Δ vs {base} (nats)")
    axes[0, 1].legend(fontsize=7)
    if off:
        fig.suptitle(f"not drawn, far above the pruned baseline: {', '.join(sorted(off))}", fontsize=9)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    return file


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", nargs="+", required=True, help="run folder(s) written by train.py")
    p.add_argument("--depths", default="1,4,8", help="comma-separated depths")
    p.add_argument("--windows", type=int, default=16, help="windows per split (more: narrower intervals)")
    p.add_argument("--against", default="pruned", help="what each row is compared with at the same depth: "
                   "comma-separated, each pruned, full or a variant (static, controller-causal, ...)")
    p.add_argument("--out", help="the folder for results.json, .md and .png (default: the first run's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    a = p.parse_args(argv)
    depths = [int(d) for d in a.depths.split(",")]
    result = evaluate(a.run, depths, a.windows, a.device, a.precision, a.out)
    result["summary"] = summary(result, a.against.split(","))
    out = a.out or a.run[0]
    write_atomic(os.path.join(out, "results.json"), json.dumps(result, indent=2).encode())
    write_atomic(os.path.join(out, "results.md"), (markdown(result) + "\n").encode())
    plot(result, os.path.join(out, "results.png"))
    print(json.dumps(result, indent=2) if a.json else markdown(result))


if __name__ == "__main__":
    cli(main)
