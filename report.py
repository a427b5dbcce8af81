"""The tables and plots of eval.py's per-window losses: paired differences with percentile bootstrap
intervals over windows, the same differences seed by seed, markdown and PNG.

    loss reduction % = (pruned - x) / pruned        gap recovered % = (pruned - x) / (pruned - full)
"""
import sys

import numpy as np

from data import SIDES as SPLITS

TITLES = {"train": "training distribution", "held_out": "held-out documents"}


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
        ax.annotate(f"{r['threshold']:g}", (r["steps"], r["loss"]), fontsize=7, textcoords="offset points",
                    xytext=(4, 4))
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

            targets = [a for a in against if a in ref or a in groups] or ["pruned"]
            full, pruned = np.mean(ref["full"]), np.mean(ref["pruned"])
            for name, d in [("full", None), ("pruned", 1)] + [(v, d) for v in groups for d in result["depths"]]:
                w = windows(name, d)
                loss, low, high = bootstrap(w)
                mine = seeds_of(name, d)
                seeds = list(mine.values())
                # a reference row has no depth to pair a variant with
                diffs = {b: bootstrap(w - windows(b, d)) for b in targets
                         if b != name and (name not in ref or b in ref)}
                theirs = {b: {seed: np.mean(ref[b]) for seed in mine} if b in ref else seeds_of(b, d) for b in diffs}
                seed_diffs = {b: {seed: m - theirs[b][seed] for seed, m in mine.items() if seed in theirs[b]}
                              for b in diffs}
                rows.append({"split": s, "objective": objective, "model": name, "depth": d, "seeds": len(seeds),
                             "loss": loss, "low": low, "high": high,
                             "seed_sd": float(np.std(seeds, ddof=1)) if len(seeds) > 1 else None, "against": targets,
                             "diffs": diffs, "seed_diffs": seed_diffs, "reduction": 100 * (pruned - loss) / pruned,
                             "gap": 100 * (pruned - loss) / (pruned - full)})
    return rows


def markdown(result) -> str:
    """One table per split and objective; * marks a difference whose interval excludes 0."""
    w = result["windows"]
    counts = f"{w['train']} windows" if w["train"] == w["held_out"] else f"{w['train']} and {w['held_out']} windows"
    out = [f"Model `{result['model']}`, layers {result['split']}, {counts} x {result['seq_len']} "
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
            targets = table[0]["against"]
            out += ["", f"**{TITLES[s]}, token {objective}**", "",
                    "| model | depth | seeds | loss [95% CI] | ± seeds | "
                    + " | ".join(f"Δ vs {b} [95% CI]" for b in targets)
                    + " | gap recovered |", "|---|---|---|---|---|" + "---|" * len(targets) + "---|"]
            for r in table:
                sd = "" if r["seed_sd"] is None else f"{r['seed_sd']:.3f}"
                diffs = []
                for b in targets:
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
