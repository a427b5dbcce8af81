"""Benchmarks of the data pipeline (bench.py's rows 5 and 6), each against a reference measured in the
same run: the peak memory of `python data.py` on a small and a large corpus (it must not grow with the
corpus), and data.py's tokenising speed against `encode_batch` on the same text already in memory.

    python extras/bench_data.py            # 10M and 100M tokens (~12 min on 2 CPU cores)
    python extras/bench_data.py --quick    # 1M and 4M tokens, one timed repeat
"""
import argparse
import contextlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402  (the reference's modules, from the repository root)

import data  # noqa: E402
from bench import timed  # noqa: E402
from load_qwen import DEFAULT_MODEL, load_tokenizer  # noqa: E402
from train import TrainConfig, cli  # noqa: E402


def synthetic_corpus(folder, tokens, tokenizer, seed=0, shards=8):
    """About `tokens` tokens in .jsonl shards: the default corpus's paragraphs, shuffled and regrouped
    into documents of 2-40 paragraphs, so the text has real token statistics at any size."""
    paragraphs = [p for text in data.documents(data.find_files([])) for p in text.split("\n\n") if p.strip()]
    sample = "\n\n".join(paragraphs[:2000])
    chars = tokens * len(sample) / len(tokenizer.encode(sample).ids)
    rng = random.Random(seed)
    os.makedirs(folder)
    for shard in range(shards):
        with open(os.path.join(folder, f"shard{shard:02d}.jsonl"), "w") as f:
            written = 0
            while written < chars / shards:
                doc = "\n\n".join(rng.choices(paragraphs, k=rng.randint(2, 40)))
                f.write(json.dumps({"text": doc}) + "\n")
                written += len(doc)
    return folder


LAUNCH = """import os, sys
pid = os.fork()
if pid == 0:
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""
# `python data.py ARGS` with its token files in CACHE (not the repository's cache/): python -c DATA_PY CACHE ARGS
DATA_PY = f"""import runpy, sys
sys.path.insert(0, {ROOT!r})
import load_qwen
load_qwen.CACHE = sys.argv.pop(1)
sys.argv[0] = {os.path.join(ROOT, "data.py")!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def peak_rss(cmd) -> int:
    """Peak resident memory of a command in bytes. A child's count starts at its parent's resident
    memory when forked (this process holds GBs after rows 1-3), so a small launcher forks it."""
    code, rss = map(int, subprocess.run([sys.executable, "-c", LAUNCH, *cmd], capture_output=True, text=True,
                                        check=True).stdout.split())
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {code}")
    return rss * (1 if sys.platform == "darwin" else 1024)  # Linux counts KiB


def row_data_memory(model, tokenizer, sizes, tmp):
    measured = []
    for n in sizes:
        corpus, cache = synthetic_corpus(os.path.join(tmp, f"corpus{n}"), n, tokenizer), os.path.join(tmp, "cache")
        rss = peak_rss([sys.executable, "-c", DATA_PY, cache, "--model", model, "--data", corpus])
        streams = data.load_splits(TrainConfig(model=model, data=[corpus]), cache=cache)  # prepared: the counts
        measured.append((rss, sum(map(len, streams))))
        shutil.rmtree(corpus)
        shutil.rmtree(cache)
    (rss_small, small), (rss_big, big) = measured
    return ("5. peak RSS of `python data.py`, synthetic .jsonl, SmolLM2 tokenizer",
            f"{rss_big / 2**20:,.0f} MiB at {big / 1e6:.1f}M tokens",
            f"{rss_small / 2**20:,.0f} MiB at {small / 1e6:.1f}M tokens",
            rss_small / rss_big, f"{big / small:.0f}x the tokens, {rss_big / rss_small:.2f}x the memory")


def row_tokenise(model, tokenizer, tokens, tmp, reps):
    corpus = synthetic_corpus(os.path.join(tmp, "corpus_speed"), tokens, tokenizer, seed=1)
    texts = list(data.documents(data.find_files([corpus])))
    cache, cfg = os.path.join(tmp, "cache_speed"), TrainConfig(model=model, data=[corpus])

    def ours():
        shutil.rmtree(cache, ignore_errors=True)
        with contextlib.redirect_stderr(io.StringIO()):
            data.load_splits(cfg, cache=cache)

    theirs = lambda: tokenizer.encode_batch(texts, add_special_tokens=False)
    t_ours, t_theirs = timed([ours, theirs], torch.device("cpu"), reps)
    n = sum(map(len, data.load_splits(cfg, cache=cache)))
    return ("6. tokenisation, data.py (read, split, encode, write) vs `encode_batch` on the text in memory",
            f"{n / t_ours:,.0f} tok/s", f"{n / t_theirs:,.0f} tok/s", t_theirs / t_ours,
            f"{n / 1e6:.1f}M tokens, SmolLM2 tokenizer, {os.cpu_count()} cores; the limit is 1.00x")


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller corpora, one timed repeat")
    a = p.parse_args(argv)
    model, tokenizer = DEFAULT_MODEL, load_tokenizer(DEFAULT_MODEL)
    with tempfile.TemporaryDirectory() as tmp:  # corpora of up to ~400 MB, removed after
        rows = [row_data_memory(model, tokenizer, (1e6, 4e6) if a.quick else (1e7, 1e8), tmp),
                row_tokenise(model, tokenizer, 5e5 if a.quick else 2e6, tmp, 1 if a.quick else 3)]
    print("\n| benchmark | ours | reference | ratio (ours better if > 1) | notes |\n|---|---|---|---|---|")
    for name, ours, ref, ratio, note in rows:
        print(f"| {name} | {ours} | {ref} | {ratio:.2f}x | {note} |")


if __name__ == "__main__":
    cli(main)
