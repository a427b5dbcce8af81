"""Evaluate trained runs against the full model, the pruned baseline and each other, with intervals.

    python eval.py --run runs/controller-causal-s0
    python eval.py --run runs/compare/*-s[0-9] --against static,pruned --out results/compare

For each split (training distribution, held-out documents) it measures, on the same fixed windows,
the loss of every window for the full model, the pruned baseline (prelude -> recurrent layer once ->
coda, nothing trained) and every run at each depth. One pass per window serves every depth: the loop
runs once to the largest depth, and the coda reads the state out at each requested one. The seeds of
a variant are averaged window by window, and each variant is compared with each --against variant at
the same depth: the mean paired difference and its 95% bootstrap interval, windows resampled.

    loss reduction % = (pruned - x) / pruned        gap recovered % = (pruned - x) / (pruned - full)

Losses are next-token cross-entropy (t+1); a run trained on token t+2 (--label-offset 2, the authors'
objective) is also scored on its own. Every window's loss is kept in results.json, and cached in each
run folder (the references in --out): adding a run to a table computes only that run.
"""
import argparse
import hashlib
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from data import ROOT, Windows, load_splits
from load_qwen import cli, load_model, load_run, parse_depths, pick_device, precision, run_config, write_atomic

SPLITS = ("train", "held_out")
TRAINING = ("rank", "alpha", "variant", "gate", "pool", "depths", "seq_len", "label_offset", "batch_size", "grad_accum",
            "steps", "lr", "min_lr_ratio", "warmup", "weight_decay", "beta2", "clip")  # a variant's seeds share these
TITLES = {"train": "training distribution", "held_out": "held-out documents"}


def variant(cfg: dict) -> str:
    """A run's variant, the name its seeds share: controller-causal, static, gate+norm, ... (-r8: rank 8
    instead of the default 32; -t+2: trained on token t+2)."""
    if cfg["variant"] == "none":
        name = "gate+norm" if cfg["gate"] else "norm-only"
    else:
        name = {"controller": f"controller-{cfg['pool']}", "static": "static"}[cfg["variant"]]
        name += ("" if cfg["gate"] else "-nogate") + ("" if cfg["rank"] == 32 else f"-r{cfg['rank']}")
    return name + ("" if cfg.get("label_offset", 1) == 1 else f"-t+{cfg['label_offset']}")


def memo(file: str, key, compute):
    """compute(), kept in `file` beside its key and reused while the key is the same."""
    key = json.loads(json.dumps(key))
    try:
        with open(file) as f:
            saved = json.load(f)
        if saved["key"] == key:
            return saved["value"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    value = compute()
    write_atomic(file, json.dumps({"key": key, "value": value}).encode())
    return value


def evaluate(runs, depths, windows, device_name="auto", precision_mode="auto", out=None):
    """{"reference": {split: {objective: {"full", "pruned": per-window losses}}},
        "runs": [{run, variant, seed, split: {objective: {depth: per-window losses}}}], ...}"""
    device = pick_device(device_name)
    dtype, autocast = precision(device, precision_mode)
    cfgs = [run_config(run) for run in runs]
    shared = ("model", "data", "held_out", "seq_len", "prelude", "recurrent", "coda")
    if any([c[k] for k in shared] != [cfgs[0][k] for k in shared] for c in cfgs[1:]):
        raise ValueError("runs compared in one table must share model, data, split, seq_len and layer split: "
                         "evaluate such runs separately")
    groups = {}  # variant -> (first run, its training settings, seeds so far)
    for run, c in zip(runs, cfgs):
        name, settings = variant(c), {k: c.get(k) for k in TRAINING}
        other, want, seeds = groups.setdefault(name, (run, settings, set()))
        differ = [k for k in TRAINING if settings[k] != want[k]]
        if differ or c["seed"] in seeds:
            raise ValueError(f"{run} and {other} are both {name}, " + (f"trained with different {', '.join(differ)}"
                             if differ else f"both seed {c['seed']}") + ": a variant's runs must differ in --seed only")
        seeds.add(c["seed"])
    first = cfgs[0]
    model_dir, batch = first["model"], first["batch_size"]
    offsets = sorted({1} | {c.get("label_offset", 1) for c in cfgs})
    streams = load_splits(first["data"], model_dir, first["held_out"], first.get("text_field", "text"))
    # Windows with room for the farthest label: the same inputs serve every objective. (A table with a t+2
    # run can pick other windows than one without: only if the stream length is 1 mod seq_len.)
    data = {s: Windows(t, first["seq_len"], max(offsets)) for s, t in zip(SPLITS, streams)}
    picked = {s: data[s].spread(windows) for s in SPLITS}
    tokens = hashlib.sha1()
    for s in SPLITS:
        for i in picked[s]:
            tokens.update(data[s].batch([i])[0].numpy().tobytes())
    key = {"tokens": tokens.hexdigest(), "dtype": str(dtype), "windows": windows}

    def per_window(fn, wanted):
        """{split: fn's losses [..., objectives, windows]}; fn(x, labels of each wanted offset) -> [..., objectives, batch]."""
        got = {}
        for s in SPLITS:
            parts = []
            for i in range(0, len(picked[s]), batch):
                x, ys = data[s].batch(picked[s][i:i + batch], device, wanted)
                with torch.no_grad(), autocast:
                    parts.append(fn(x, ys).float().cpu())
            got[s] = torch.cat(parts, -1)
        return got

    def references():
        full = load_model(model_dir, dtype, device)
        f = per_window(lambda x, ys: full(x, labels=ys), offsets)
        full = None  # free it before a run is loaded
        pruned = load_run(runs[0], dtype, device)[0]  # any run: the pruned baseline uses none of its training
        p = per_window(lambda x, ys: pruned.pruned(x, labels=ys), offsets)
        return {s: {f"t+{o}": {"full": f[s][j].tolist(), "pruned": p[s][j].tolist()} for j, o in enumerate(offsets)}
                for s in SPLITS}

    def run_losses(run, cfg):
        model, _ = load_run(run, dtype, device)
        own = sorted({1, cfg.get("label_offset", 1)})
        got = per_window(lambda x, ys: torch.stack(model.readout(x, depths, ys)), own)
        return {s: {f"t+{o}": {str(d): got[s][i, j].tolist() for i, d in enumerate(depths)} for j, o in enumerate(own)}
                for s in SPLITS}

    shown = os.path.relpath(model_dir, ROOT)  # inside the repository: the same text on every machine
    result = {"model": model_dir if shown.startswith("..") else shown, "windows": windows, "seq_len": first["seq_len"],
              "depths": depths, "split": f"{first['prelude']} + [{first['recurrent']}] + {first['coda']}",
              "command": "python eval.py " + " ".join(sys.argv[1:]), "runs": []}
    weights = sorted((f, os.path.getsize(os.path.join(model_dir, f))) for f in os.listdir(model_dir))
    ref_key = dict(key, model=os.path.abspath(model_dir), files=weights, split=result["split"], offsets=offsets)
    os.makedirs(out or runs[0], exist_ok=True)
    result["reference"] = memo(os.path.join(out or runs[0], "reference-losses.json"), ref_key, references)
    for run, cfg in zip(runs, cfgs):
        ckpt = os.stat(os.path.join(run, "checkpoint.safetensors"))
        run_key = dict(key, files=weights, checkpoint=[ckpt.st_size, ckpt.st_mtime_ns], depths=depths)
        losses = memo(os.path.join(run, "eval-losses.json"), run_key, lambda: run_losses(run, cfg))
        result["runs"].append({"run": run, "variant": variant(cfg), "seed": cfg["seed"],
                               "label_offset": cfg.get("label_offset", 1), **losses})
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
    return {"run": run, "label": variant(cfg), "criterion": criterion, "windows": windows, "seq_len": cfg["seq_len"],
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


def bootstrap(values, level=0.95, samples=10_000, seed=0):
    """(mean, low, high): the mean of per-window values and its percentile bootstrap interval. Windows
    are resampled with replacement: they are what varies (a variant's seeds are averaged per window)."""
    v = np.asarray(values, dtype=np.float64)
    means = v[np.random.default_rng(seed).integers(0, len(v), (samples, len(v)))].mean(1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(v.mean()), float(low), float(high)


def summary(result, against=("pruned",)) -> list:
    """One row per (split, objective, model, depth): loss with its interval, the spread over seeds, and
    the paired difference to each of `against` scored on that objective (the pruned baseline where none
    is), at the same depth, with its interval: {"diffs": {name: [mean, low, high]}}, and the same
    difference seed by seed where both have that seed (each seed against a reference): {"seed_diffs":
    {name: {seed: difference}}}."""
    rows = []
    for s in SPLITS:
        for objective, ref in result["reference"][s].items():
            groups = {}
            for r in result["runs"]:
                if objective in r[s]:
                    groups.setdefault(r["variant"], []).append(r)

            def windows(name, d):  # per-window losses, seeds averaged
                if name in ref:
                    return np.array(ref[name])
                return np.mean([r[s][objective][str(d)] for r in groups[name]], 0)

            def seeds_of(name, d):  # {seed: mean loss}; one seed means the same batches, so seeds pair up
                return {r["seed"]: np.mean(r[s][objective][str(d)]) for r in groups.get(name, [])}

            bases = [a for a in against if a in ref or a in groups] or ["pruned"]
            full, pruned = np.mean(ref["full"]), np.mean(ref["pruned"])
            for name, d in [("full", None), ("pruned", 1)] + [(v, d) for v in groups for d in result["depths"]]:
                w = windows(name, d)
                loss, low, high = bootstrap(w)
                mine = seeds_of(name, d)
                seeds = list(mine.values())
                # a reference row has no depth to pair a variant with
                diffs = {b: bootstrap(w - windows(b, d)) for b in bases if b != name and (name not in ref or b in ref)}
                theirs = {b: {seed: np.mean(ref[b]) for seed in mine} if b in ref else seeds_of(b, d) for b in diffs}
                seed_diffs = {b: {seed: m - theirs[b][seed] for seed, m in mine.items() if seed in theirs[b]} for b in diffs}
                rows.append({"split": s, "objective": objective, "model": name, "depth": d, "seeds": len(seeds),
                             "loss": loss, "low": low, "high": high,
                             "seed_sd": float(np.std(seeds, ddof=1)) if len(seeds) > 1 else None, "against": bases,
                             "diffs": diffs, "seed_diffs": seed_diffs, "reduction": 100 * (pruned - loss) / pruned,
                             "gap": 100 * (pruned - loss) / (pruned - full)})
    return rows


def markdown(result) -> str:
    """One table per split and objective; * marks a difference whose interval excludes 0."""
    out = [f"Model `{result['model']}`, layers {result['split']}, {result['windows']} windows x {result['seq_len']} "
           "tokens per split, the same windows for every row. Loss: mean cross-entropy (nats) of the next token "
           "(t+1) unless the table says t+2. [95% CI]: percentile bootstrap over windows, a variant's seeds "
           "averaged per window: it reflects which windows were drawn, not how seeds vary (± is the standard "
           "deviation over seeds). Δ is the paired difference at the same depth (negative: lower loss), * where its "
           "interval excludes 0; k/n seeds: in k of the n seeds both rows share (the same batches; against a "
           "reference, each seed), the difference has the sign of Δ."]
    rows = result["summary"]
    for s in SPLITS:
        for objective in result["reference"][s]:
            table = [r for r in rows if r["split"] == s and r["objective"] == objective]
            bases = table[0]["against"]
            out += ["", f"**{TITLES[s]}, token {objective}**", "",
                    "| model | depth | seeds | loss [95% CI] | ± seeds | " + " | ".join(f"Δ vs {b} [95% CI]" for b in bases)
                    + " | gap recovered |", "|---|---|---|---|---|" + "---|" * len(bases) + "---|"]
            for r in table:
                sd = "" if r["seed_sd"] is None else f"{r['seed_sd']:.3f}"
                diffs = []
                for b in bases:
                    if b not in r["diffs"]:
                        diffs.append("-")
                        continue
                    m, low, high = r["diffs"][b]
                    per_seed = list(r["seed_diffs"][b].values())
                    agree = sum(np.sign(x) == np.sign(m) for x in per_seed)
                    agree = f", {agree}/{len(per_seed)} seeds" if len(per_seed) > 1 else ""
                    diffs.append(f"{m:+.3f} [{low:+.3f}, {high:+.3f}]" + (" *" if low > 0 or high < 0 else "") + agree)
                gap = f"{r['gap']:.1f}%" if objective == "t+1" else "-"  # the full model was not trained for t+2
                out.append(f"| {r['model']} | {r['depth'] or '-'} | {r['seeds'] or '-'} | {r['loss']:.3f} "
                           f"[{r['low']:.3f}, {r['high']:.3f}] | {sd} | {' | '.join(diffs)} | {gap} |")
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
    """Next-token loss against depth per variant (top) and the paired difference to the first --against
    (bottom), with 95% bootstrap intervals; one column per split."""
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True, sharey="row")
    off = set()  # variants far above the pruned baseline (no gate): drawn, they would flatten the rest
    for col, s in enumerate(SPLITS):
        rows = [r for r in result["summary"] if r["split"] == s and r["objective"] == "t+1"]
        base = rows[0]["against"][0]
        ref = {r["model"]: r for r in rows if r["model"] in ("full", "pruned")}
        for name in dict.fromkeys(r["model"] for r in rows if r["model"] not in ref):
            rs = [r for r in rows if r["model"] == name]
            if max(r["loss"] for r in rs) > 1.25 * ref["pruned"]["loss"]:
                off.add(name)
                continue
            d = [r["depth"] for r in rs]
            for ax, stats in ((axes[0, col], [(r["loss"], r["low"], r["high"]) for r in rs]),
                              (axes[1, col], [r["diffs"].get(base, (np.nan,) * 3) for r in rs])):
                m, lo, hi = np.array(stats).T
                ax.errorbar(d, m, yerr=[m - lo, hi - m], marker="o", capsize=3, label=name)
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


@cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", nargs="+", required=True, help="run folder(s) written by train.py")
    p.add_argument("--depths", default=None, help="default 1,4,8 (and 16 on a GPU)")
    p.add_argument("--windows", type=int, default=16, help="windows per split (more: narrower intervals)")
    p.add_argument("--against", default="pruned", help="what every row is compared with at the same depth: "
                   "comma-separated, each pruned, full or a variant (static, controller-causal, ...)")
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
        names, against = {variant(run_config(run)) for run in a.run}, a.against.split(",")
        unknown = [x for x in against if x not in names | {"pruned", "full"}]
        if unknown:
            raise SystemExit(f"error: --against {','.join(unknown)}: no run of that variant; give pruned, full or one of "
                             f"{', '.join(sorted(names))}")
        result = evaluate(a.run, depths, a.windows, a.device, a.precision, a.out)
        result["summary"] = summary(result, against)
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
