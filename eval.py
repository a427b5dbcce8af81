"""Evaluate trained runs against the full model, the pruned baseline and each other, with intervals.

    python eval.py --run runs/controller-causal-s0
    python eval.py --run runs/compare/*-s[0-9] --against static,pruned --out results/compare

For each split (training distribution, held-out documents) it measures, on the same fixed windows,
the loss of every window for the full model, the pruned baseline (prelude -> recurrent layer once ->
coda, nothing trained) and every run at each depth. One pass per window serves every depth: the loop
runs once to the largest depth, and the coda reads the state out at each requested one. The seeds of
a variant are averaged window by window, and each variant is compared with each --against variant at
the same depth: the mean paired difference and its 95% bootstrap interval, windows resampled
(report.py makes the tables and plots).

Losses are next-token cross-entropy (t+1); a run trained on token t+2 (--label-offset 2, the authors'
objective) is also scored on its own. Every window's loss is kept in results.json, and cached in each
run folder (the references in --out): adding a run to a table computes only that run.
"""
import argparse
import dataclasses
import hashlib
import json
import os
import sys

import torch

from data import SIDES as SPLITS, Windows, load_splits
from exits import evaluate_adaptive
from load_qwen import load_config, load_model, load_ouroboros
from report import adaptive_markdown, adaptive_plot, markdown, plot, summary
from run import (ROOT, SETTINGS, Parser, add_flags, cli, depth_list, load_run, placement, read_settings, values,
                 variant, write_atomic)
DEPTHS = [1, 4, 8]  # --depths unless given
LEARNED = "0.1,0.2,0.3,0.4,0.5,0.6,0.7"  # --learned unless given
TABLE = [n for n, f in SETTINGS.items() if f.metadata.get("scope") == "table"]  # every run of a table shares these
VARIANT = [n for n, f in SETTINGS.items() if f.metadata.get("scope") == "variant"]  # and a variant's seeds these


def read_runs(runs, depths) -> list:
    """The runs' settings, refused when they cannot share one table (other data or layers, or two runs
    of one variant that differ in more than --seed) or cannot run a depth asked for."""
    cfgs, groups = [read_settings(run) for run in runs], {}  # variant -> (first run, its settings, seeds)
    for run, c in zip(runs, cfgs):
        c.ouroboros.split(load_config(c.model).num_hidden_layers)  # a run that cannot be built, before any work
        if not os.path.isfile(ckpt := os.path.join(run, "checkpoint.safetensors")):
            raise ValueError(f"{ckpt} not found: that run has not saved a checkpoint (it saves every --save-interval)")
        if max(depths) > c.ouroboros.max_steps:
            raise ValueError(f"--depths {max(depths)}: {run} has step norms for {c.ouroboros.max_steps} steps at most")
    if any([values(c)[k] for k in TABLE] != [values(cfgs[0])[k] for k in TABLE] for c in cfgs[1:]):
        raise ValueError(f"runs compared in one table must share {', '.join(TABLE)}: evaluate such runs separately")
    for run, c in zip(runs, cfgs):
        name, settings = variant(c), {k: values(c)[k] for k in VARIANT}
        other, want, seeds = groups.setdefault(name, (run, settings, set()))
        differ = [k for k in VARIANT if settings[k] != want[k]]
        if differ or c.seed in seeds:
            raise ValueError(f"{run} and {other} are both {name}, " + (f"trained with different {', '.join(differ)}"
                             if differ else f"both seed {c.seed}") + ": a variant's runs must differ in --seed only")
        seeds.add(c.seed)
    return cfgs


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


def per_window(loss, rows: int, labels) -> torch.Tensor:
    """[objectives, rows]: loss(row, its labels) of every row alone, for each set of labels (the intervals
    resample windows, so each window's own loss is kept)."""
    return torch.stack([torch.stack([loss(b, y[b:b + 1]) for b in range(rows)]) for y in labels])


class Scorer:
    """The fixed windows of both splits that every row of a table is scored on, with room for the
    farthest label, so the same inputs serve every objective."""

    def __init__(self, cfg, windows: int, offsets: list, device, autocast):
        streams = load_splits(cfg)
        # (A table with a t+2 run can pick other windows than one without: only if a stream's length is 1 mod seq_len.)
        self.data = {s: Windows(t, cfg.seq_len, max(offsets)) for s, t in zip(SPLITS, streams)}
        self.picked = {s: self.data[s].spread(windows) for s in SPLITS}
        for s in SPLITS:
            if len(self.picked[s]) < windows:
                print(f"{s} holds {len(self.picked[s])} windows of {cfg.seq_len} tokens: using those, not {windows}",
                      file=sys.stderr)
        self.batch, self.device, self.autocast = cfg.batch_size, device, autocast
        tokens = hashlib.sha1()
        for s in SPLITS:
            for i in self.picked[s]:
                tokens.update(self.data[s].batch([i])[0].numpy().tobytes())
        self.tokens = tokens.hexdigest()

    def losses(self, fn, offsets) -> dict:
        """{split: fn's losses [..., objectives, windows]}; fn(x, labels of each offset) -> [..., objectives, batch]."""
        got = {}
        for s in SPLITS:
            parts = []
            for i in range(0, len(self.picked[s]), self.batch):
                x, ys = self.data[s].batch(self.picked[s][i:i + self.batch], self.device, offsets)
                with torch.no_grad(), self.autocast:
                    parts.append(fn(x, ys).float().cpu())
            got[s] = torch.cat(parts, -1)
        return got


def evaluate(runs, depths, windows, device="auto", precision="auto", out=None):
    """{"reference": {split: {objective: {"full", "pruned": per-window losses}}},
        "runs": [{run, variant, seed, split: {objective: {depth: per-window losses}}}], ...}"""
    where, dtype, autocast = placement(device, precision)
    cfgs = read_runs(runs, depths)
    first, offsets = cfgs[0], sorted({1} | {c.label_offset for c in cfgs})
    scorer = Scorer(first, windows, offsets, where, autocast)
    key = {"tokens": scorer.tokens, "dtype": str(dtype), "windows": windows}
    shown = os.path.relpath(first.model, ROOT)  # inside the repository: the same text on every machine
    oc = first.ouroboros
    used = {s: len(scorer.picked[s]) for s in SPLITS}
    result = {"model": first.model if shown.startswith("..") else shown, "windows": used, "seq_len": first.seq_len,
              "depths": depths, "split": f"{oc.prelude} + [{oc.recurrent}] + {oc.coda}",
              "command": "python eval.py " + " ".join(sys.argv[1:]), "runs": []}
    weights = sorted((f, os.path.getsize(os.path.join(first.model, f))) for f in os.listdir(first.model))
    ref_key = dict(key, model=os.path.abspath(first.model), files=weights, split=result["split"], offsets=offsets)
    os.makedirs(out or runs[0], exist_ok=True)
    result["reference"] = memo(os.path.join(out or runs[0], "reference-losses.json"), ref_key,
                               lambda: references(scorer, runs[0], offsets, dtype))
    for run, cfg in zip(runs, cfgs):
        ckpt = os.stat(os.path.join(run, "checkpoint.safetensors"))
        run_key = dict(key, files=weights, checkpoint=[ckpt.st_size, ckpt.st_mtime_ns], depths=depths)
        compute = lambda: run_losses(scorer, run, cfg, depths, dtype)
        losses = memo(os.path.join(run, "eval-losses.json"), run_key, compute)
        result["runs"].append({"run": run, "variant": variant(cfg), "seed": cfg.seed,
                               "label_offset": cfg.label_offset, **losses})
        print(f"evaluated {run}", file=sys.stderr, flush=True)
    return result


def references(scorer: Scorer, run: str, offsets, dtype) -> dict:
    """Per-window losses of the full model and the pruned baseline (of any run's layers: it uses none of
    its training, so no SVD bases and no checkpoint are loaded)."""
    cfg = read_settings(run)
    full = load_model(cfg.model, dtype, scorer.device)
    f = scorer.losses(lambda x, ys: per_window(lambda b, y: full(x[b:b + 1], labels=y), len(x), ys), offsets)
    full = None  # freed before the pruned model is loaded
    model = load_ouroboros(cfg.model, dataclasses.replace(cfg.ouroboros, variant="none"), dtype, scorer.device)
    p = scorer.losses(lambda x, ys: per_window(lambda b, y: model.pruned(x[b:b + 1], labels=y), len(x), ys), offsets)
    return {s: {f"t+{o}": {"full": f[s][j].tolist(), "pruned": p[s][j].tolist()} for j, o in enumerate(offsets)}
            for s in SPLITS}


def run_losses(scorer: Scorer, run: str, cfg, depths, dtype) -> dict:
    """Per-window losses of a run at every depth (one pass: the coda reads the loop out at each), on the
    next token and, if it was trained on another, on its own objective."""
    model, _ = load_run(run, dtype, scorer.device)
    own = sorted({1, cfg.label_offset})

    def at_depths(x, ys):
        h = model.readout(x, depths)
        return torch.stack([per_window(lambda b, y: model.base.head(h[d][b:b + 1], y), len(x), ys) for d in depths])
    got = scorer.losses(at_depths, own)
    return {s: {f"t+{o}": {str(d): got[s][i, j].tolist() for i, d in enumerate(depths)} for j, o in enumerate(own)}
            for s in SPLITS}


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", nargs="+", required=True, help="run folder(s) written by train.py")
    p.add_argument("--depths", default=None, help=f"default {','.join(map(str, DEPTHS))} (and 16 on a GPU)")
    p.add_argument("--windows", type=int, default=16, help="windows per split (more: narrower intervals)")
    p.add_argument("--against", default="pruned", help="what every row is compared with at the same depth: "
                   "comma-separated, each pruned, full or a variant (static, controller-causal, ...)")
    p.add_argument("--out", default=None, help="folder for results.json/.md/.png (default: the first run's)")
    add_flags(p, ("device", "precision"))
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    p.add_argument("--adaptive", default=None, metavar="THRESHOLDS",
                   help="instead: adaptive depth of the first run up to the largest of --depths: the latent-diff exit "
                        "at these comma-separated thresholds, decoded through the KV cache, beside every fixed depth "
                        "and the oracle (adaptive.md/.json/.png)")
    p.add_argument("--learned", default=LEARNED, metavar="THRESHOLDS",
                   help=f"with --adaptive: the learned exit's thresholds on 1 - lambda (default {LEARNED}), when "
                        "exits.py has trained the run's exit head")
    a = p.parse_args(argv)
    depths, thresholds = check(a)
    if a.adaptive is None:
        result = evaluate(a.run, depths, a.windows, a.device, a.precision, a.out)
        result["summary"] = summary(result, a.against.split(","))
        stem, table, draw = "results", markdown(result), plot
    else:
        criteria = {"latent-diff": thresholds["latent-diff"], "learned": thresholds["learned"]}
        result = evaluate_adaptive(a.run[0], max(depths), criteria, a.windows, a.device, a.precision)
        result["command"] = "python eval.py " + " ".join(sys.argv[1:] if argv is None else argv)
        stem, table, draw = "adaptive", adaptive_markdown(result), adaptive_plot
    out = a.out or a.run[0]
    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, f"{stem}.json"), json.dumps(result, indent=2).encode())
    write_atomic(os.path.join(out, f"{stem}.md"), (table + "\n").encode())
    png = draw(result, os.path.join(out, f"{stem}.png"))
    print(json.dumps(result, indent=2) if a.json else table)
    print(f"wrote {out}/{stem}.json, {stem}.md" + (f", {stem}.png" if png else ""), file=sys.stderr)


def check(a) -> tuple:
    """(depths, thresholds) of the command line. Every problem of the flags at once, then those of the
    runs named, before anything is loaded."""
    depths = DEPTHS + [16] * torch.cuda.is_available() if a.depths is None else depth_list(a.depths)
    most, thresholds = SETTINGS["max_steps"].default, None
    found = [f"--windows {a.windows} must be at least 1"] * (a.windows < 1)
    if isinstance(depths, str) or not all(1 <= d <= most for d in depths):
        found.append(f"--depths {a.depths!r}: give comma-separated depths, each in 1..{most}, e.g. 4,8,16")
    if a.adaptive is not None:
        thresholds = {}
        for name, text in (("latent-diff", a.adaptive), ("learned", a.learned)):
            try:
                thresholds[name] = [float(t) for t in text.split(",")]
            except ValueError:
                found.append(f"--{'adaptive' if name == 'latent-diff' else 'learned'} {text!r}: give "
                             "comma-separated numbers, e.g. 0.03,0.05,0.1")
        found += ["--adaptive measures one run: give a single --run"] * (len(a.run) > 1)
    if found:
        raise ValueError("; ".join(found))
    if a.adaptive is not None and read_settings(a.run[0]).ouroboros.pool == "mean":
        raise ValueError(f"--adaptive decodes through the KV cache, which {a.run[0]} (pool='mean': its controller "
                         "sees the future) cannot use: measure a pool='causal' run")
    names = {variant(read_settings(run)) for run in a.run}
    unknown = [x for x in a.against.split(",") if x not in names | {"pruned", "full"}]
    if a.adaptive is None and unknown:
        raise ValueError(f"--against {','.join(unknown)}: no run of that variant; give pruned, full or one of "
                         f"{', '.join(sorted(names))}")
    return depths, thresholds


if __name__ == "__main__":
    cli(main, sys.argv[1:])
