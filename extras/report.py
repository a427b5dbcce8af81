"""The tables and plots of eval.py's per-window losses: paired differences with percentile bootstrap
intervals over windows, the same differences seed by seed, markdown and PNG.

    loss reduction % = (pruned - x) / pruned        gap recovered % = (pruned - x) / (pruned - full)
"""
import sys

import numpy as np

from data import SIDES as SPLITS

TITLES = {"train": "training distribution", "held_out": "held-out documents"}


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
    plt = pyplot()
    if plt is None:
        return None
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
