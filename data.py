"""Data: sources -> documents -> held-out split by document -> token files on disk -> windows.

    python data.py                                   # the default corpus, the default model's tokenizer
    python data.py --model DIR --data corpus/*.parquet --held-out 0.01

Documents stream through in batches: each batch is split, tokenised (`encode_batch`, on every core)
and appended to train.bin / held_out.bin, so memory does not grow with the corpus; training reads
the files back through np.memmap. train.py prepares on first use; this command prepares (or finds)
the cache and says what is in it. train.py and eval.py both read their data through this module.
"""
import argparse
import fcntl
import glob
import gzip
import hashlib
import json
import os
import stat
import sys
import sysconfig
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from load_qwen import CACHE, default_model, load_config, load_tokenizer
from run import Parser, add_flags, cli, settings, write_atomic

PYTHON_DOCS = "/usr/share/doc/python3.11/html/_sources/**/*.rst.txt"
TEXT = (".txt", ".md", ".rst", ".py")  # one document per file (.py: the stdlib fallback corpus)
KINDS = TEXT + (".jsonl", ".jsonl.gz", ".parquet")
SIDES = ("train", "held_out")
BATCH_CHARS = 1 << 20  # text per encode_batch call: documents for every core, a bounded memory
AHEAD = 2  # batches encoding at once


# ----------------------------------------------------------------------------------------------
# sources -> documents

def find_files(sources):
    """Files from paths, folders and globs; default: the Python docs, else the stdlib's sources. A path
    that exists is taken as it is, glob characters and all. A folder gives every regular file of a known
    kind under it, each folder once however symlinks loop; any other file named is refused."""
    if not sources:
        files = sorted(glob.glob(PYTHON_DOCS, recursive=True))
        if files:
            return files
        stdlib = sysconfig.get_paths()["stdlib"]
        print(f"Python docs not found at {PYTHON_DOCS} (apt-get install python3.11-doc); "
              f"using the standard library's sources in {stdlib} instead", file=sys.stderr)
        return sorted(f for f in glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)
                      if "site-packages" not in f)
    files = []
    for src in sources:
        literal, seen = os.path.exists(src), set()  # a path that exists is no glob, whatever its characters
        found = [] if os.path.isdir(src) else [src] if literal else glob.glob(src, recursive=True)
        for top, dirs, names in os.walk(src, followlinks=True) if os.path.isdir(src) else ():
            here = os.stat(top)
            if (here.st_dev, here.st_ino) in seen:  # a symlink back into a folder already walked
                dirs.clear()
                continue
            seen.add((here.st_dev, here.st_ino))
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # as a glob would: no hidden files
            found += [f for n in names if n.endswith(KINDS) and not n.startswith(".")
                      and stat.S_ISREG(os.stat(f := os.path.join(top, n)).st_mode)]  # FIFOs, devices: skipped
        if not found:
            raise FileNotFoundError(f"--data {src!r} matches no files")
        for f in found:
            if not f.endswith(KINDS) or not stat.S_ISREG(os.stat(f).st_mode):
                raise ValueError(f"{f}: not a file --data reads; give regular {' '.join(KINDS)} files, or folders "
                                 "of them")
        files += sorted(found)
    return files


def parquet(file, text_field):
    """The open parquet file, refused without pyarrow or without the text column."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{file}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(file)
    except Exception as e:  # pyarrow's own error types, for a truncated or foreign file
        raise ValueError(f"cannot read {file} as parquet ({e}); is it corrupt?") from e
    if text_field not in pf.schema_arrow.names:
        raise ValueError(f"{file} has no column {text_field!r} (it has {', '.join(pf.schema_arrow.names)}); "
                         "name the text column with --text-field")
    return pf


def binary_error(file):
    return ValueError(f"{file} is binary, not text (it holds a NUL byte); give text, .jsonl(.gz) or .parquet files")


def documents(files, text_field="text"):
    """(text, bytes of the corpus read so far) of every document that is not blank, in order: a text
    file is one document, a .jsonl(.gz) line one, a parquet row one (read in batches of rows). A binary
    file (a NUL byte in its first 64 KB, git's test) is refused before any of it is read as text."""
    done = 0
    for file in files:
        size = os.path.getsize(file)
        if file.endswith(".parquet"):
            pf, rows = parquet(file, text_field), 0
            for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
                rows += batch.num_rows
                for text in batch.column(0).to_pylist():
                    if not isinstance(text, (str, type(None))):
                        raise ValueError(f"{file}: column {text_field!r} holds {type(text).__name__}, not text; "
                                         "name the text column with --text-field")
                    if text and text.strip():
                        yield text, done + size * rows // pf.metadata.num_rows
        elif file.endswith(TEXT):
            with open(file, "rb") as f:
                raw = f.read()
            if b"\0" in raw:
                raise binary_error(file)
            text = raw.decode("utf-8", errors="replace")  # newlines translated, as a file opened as text reads
            text = text.replace("\r\n", "\n").replace("\r", "\n")
            if text.strip():
                yield text, done + size
        else:
            yield from ((text, done + pos) for text, pos in json_lines(file, text_field) if text.strip())
        done += size


def json_lines(file, text_field):
    """(text, bytes of the file read so far) of each line of a .jsonl(.gz) that is not blank."""
    with open(file, "rb") as raw:  # raw.tell(): how far reading has got, gzip or not
        fh = gzip.open(raw) if file.endswith(".gz") else raw
        try:
            if b"\0" in fh.peek(1 << 16)[:1 << 16]:
                raise binary_error(file)
            for i, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        text = json.loads(line)[text_field]
                        if not isinstance(text, str):
                            raise TypeError(f"{type(text).__name__}, not a string")
                    except (ValueError, KeyError, TypeError, IndexError, RecursionError) as e:
                        raise ValueError(f"{file} line {i}: needs a JSON object with a {text_field!r} string "
                                         f"field ({e!r}); name it with --text-field") from e
                    yield text, raw.tell()
        except (OSError, EOFError) as e:  # a truncated or corrupt .gz
            raise ValueError(f"cannot read {file}: {e}") from e


# ----------------------------------------------------------------------------------------------
# documents -> token files: cache/tokens/<key>/{train,held_out}.bin + manifest.json

def encoded(tokenizer, docs):
    """(texts, their encodings, bytes read) per batch of about BATCH_CHARS characters, in order: work for
    every core, a bounded memory. `encode_batch` releases the GIL, so with AHEAD batches encoding in
    threads the cores stay busy through each batch's longest document, while this thread reads the next
    batch and writes the last."""
    with ThreadPoolExecutor(AHEAD) as pool:
        submit = lambda texts, done: (texts, pool.submit(tokenizer.encode_batch, texts, add_special_tokens=False), done)
        jobs, texts, size = deque(), [], 0
        for text, done in docs:
            texts.append(text)
            size += len(text)
            if size >= BATCH_CHARS:
                jobs.append(submit(texts, done))
                texts, size = [], 0
            if len(jobs) > AHEAD:
                texts_done, job, at = jobs.popleft()
                yield texts_done, job.result(), at
        if texts:
            jobs.append(submit(texts, done))
        for texts_done, job, at in jobs:
            yield texts_done, job.result(), at


def tokenize(cfg, files, folder, key, tokenizer, eos):
    """Stream the documents into the two token files, EOS after every document, then write the
    manifest: last and atomically, so a killed run never leaves a cache that reads as complete."""
    dtype = np.uint16 if max(tokenizer.get_vocab_size(), eos + 1) <= 2**16 else np.uint32
    paths, total = [os.path.join(folder, f"{s}.bin") for s in SIDES], sum(os.path.getsize(f) for f in files)
    docs, tokens, t0 = [0, 0], [0, 0], time.time()
    shown = t0
    try:
        with open(paths[0] + ".tmp", "wb") as train_f, open(paths[1] + ".tmp", "wb") as held_f:
            for batch, encodings, done in encoded(tokenizer, documents(files, cfg.text_field)):
                ids = ([], [])  # this batch's tokens for each side, in document order
                for text, enc in zip(batch, encodings):
                    # The split: by the text alone, so it is the same on every machine wherever the corpus
                    # lies, stable as the corpus grows, and copies of one document never straddle it.
                    side = int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) < cfg.held_out * 2**32
                    ids[side].extend(enc.ids + [eos])
                    docs[side] += 1
                for side, out in enumerate((train_f, held_f)):
                    np.array(ids[side], dtype).tofile(out)
                    tokens[side] += len(ids[side])
                if time.time() - shown > 10:  # long corpora only
                    shown = time.time()
                    print(f"tokenising: {sum(docs):,} documents, {sum(tokens) / (time.time() - t0):,.0f} tok/s, "
                          f"{done / total:.0%} of {total / 2**20:,.0f} MiB", end="\r" if sys.stderr.isatty() else "\n",
                          file=sys.stderr, flush=True)
            if not docs[0] or not docs[1]:
                raise ValueError(f"{sum(docs)} documents cannot be split into train and held-out at "
                                 f"{cfg.held_out:.0%}; give more documents or change --held-out")
            for out in (train_f, held_f):  # on disk before the manifest vouches for them
                out.flush()
                os.fsync(out.fileno())
        for p in paths:
            os.replace(p + ".tmp", p)
    finally:
        for p in paths:
            if os.path.exists(p + ".tmp"):
                os.remove(p + ".tmp")
    manifest = {"key": key, "dtype": np.dtype(dtype).name,
                **{s: {"documents": d, "tokens": t} for s, d, t in zip(SIDES, docs, tokens)}}
    write_atomic(os.path.join(folder, "manifest.json"), json.dumps(manifest, indent=1).encode())
    print(f"tokenised {sum(docs):,} documents ({docs[1]:,} held out), {sum(tokens):,} tokens in "
          f"{time.time() - t0:.0f}s into {folder}", file=sys.stderr)
    return manifest


def load_splits(cfg, config=None, cache=None):
    """(train, held_out) token streams of cfg's data, split and tokenizer, as read-only np.memmap arrays
    with EOS after every document: found in the cache, or prepared now. The key names the files (path,
    size, mtime), the split, the EOS id and tokenizer.json's content, so another tokenizer never reuses
    these ids. One process looks at a time (torchrun's others wait on the lock, then read); a manifest
    that does not vouch for complete token files of this key is prepared again."""
    files, config = find_files(cfg.data), config or load_config(cfg.model)
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    if eos is None:
        raise ValueError(f"{cfg.model}/config.json has no eos_token_id to separate documents with")
    tokenizer = load_tokenizer(cfg.model, config)  # its error names a missing or foreign tokenizer.json
    with open(os.path.join(cfg.model, "tokenizer.json"), "rb") as f:
        tokenizer_sha1 = hashlib.sha1(f.read()).hexdigest()
    key = [[f, os.path.getsize(f), os.path.getmtime(f)] for f in files]
    key += [cfg.held_out, "split by sha1 of the text", cfg.text_field, eos, "tokenizer.json sha1 " + tokenizer_sha1]
    folder = os.path.join(cache or CACHE, "tokens", hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16])
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "lock"), "w") as lock:  # the OS releases a killed process's lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        file = os.path.join(folder, "manifest.json")
        try:
            with open(file) as f:
                m = json.load(f)
            itemsize = {"uint16": 2, "uint32": 4}[m["dtype"]]
            sizes = [os.path.getsize(os.path.join(folder, f"{s}.bin")) for s in SIDES]
            counts = [m[s]["tokens"] for s in SIDES]
            if m["key"] != key:
                raise ValueError("it belongs to other sources or another tokenizer")
            if any(type(n) is not int or n < 1 or size != n * itemsize for n, size in zip(counts, sizes)):
                raise ValueError(f"token files of {sizes} bytes where it vouches for {counts} {m['dtype']} tokens")
        except (OSError, ValueError, KeyError, TypeError) as e:
            if os.path.exists(file):  # not just never prepared, or killed before the end
                print(f"token cache {folder} is damaged ({e!r}): preparing it again", file=sys.stderr)
                os.remove(file)  # no reader trusts it while it is rewritten
            m = tokenize(cfg, files, folder, key, tokenizer, eos)
    return [np.memmap(os.path.join(folder, f"{s}.bin"), m["dtype"], "r", shape=(m[s]["tokens"],)) for s in SIDES]


# ----------------------------------------------------------------------------------------------
# token streams -> windows

class Windows:
    """Windows of seq_len + offset tokens at stride seq_len: inputs = w[:seq_len], labels = w[offset:].
    offset 1 is the next token. The labels are already shifted, so the loss must not shift them again
    (the authors' code did, and trained on t+2: --label-offset 2 reproduces that on purpose)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, offset: int = 1):
        self.tokens, self.seq_len, self.offset = tokens, seq_len, offset
        self.n = (len(tokens) - offset) // seq_len
        self.order = (None, None)  # ((seed, epoch), the windows of that epoch in training order)
        if self.n < 1:
            raise ValueError(f"{len(tokens)} tokens do not fill one window of {seq_len + offset}; "
                             "use a shorter --seq-len")

    def batch(self, indices, device="cpu", offsets=None):
        """(inputs, labels) [B, seq_len] of the windows; with offsets (each at most self.offset), the
        labels are a list, one tensor per offset, all for the same inputs."""
        L = self.seq_len
        w = np.stack([self.tokens[i * L:(i + 1) * L + self.offset] for i in indices]).astype(np.int64)
        w = torch.from_numpy(w)
        if torch.device(device).type == "cuda":  # pinned + non_blocking: the copy does not wait for the GPU
            w = w.pin_memory()
        w = w.to(device, non_blocking=True)
        if offsets is None:
            return w[:, :L], w[:, self.offset:]
        return w[:, :L], [w[:, k:k + L] for k in offsets]

    def draw(self, cfg, step: int, micro: int, rank: int = 0, world: int = 1):
        """(window indices, depth) of micro-batch `micro` of optimiser step `step` on process `rank`: a
        function of (seed, step, micro) alone, so a resumed run sees exactly the batches it would have."""
        first = (step * cfg.grad_accum + micro) * cfg.batch_size * world + rank * cfg.batch_size
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + micro)
        depth = cfg.depths[torch.randint(len(cfg.depths), (), generator=g).item()]
        return [self.window(cfg.seed, *divmod(i, self.n)) for i in range(first, first + cfg.batch_size)], depth

    def window(self, seed: int, epoch: int, i: int) -> int:
        """The i-th window of an epoch: a permutation per (seed, epoch), kept while the epoch lasts."""
        if self.order[0] != (seed, epoch):
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
            self.order = ((seed, epoch), perm.tolist())
        return self.order[1][i]

    def spread(self, count: int):
        """`count` fixed windows spread over the whole stream: the evaluation set."""
        return np.linspace(0, self.n - 1, min(count, self.n)).astype(int).tolist()

    @torch.no_grad()
    def mean_loss(self, fn, count: int, batch: int, device, autocast) -> float:
        """Mean of fn(inputs, labels) (a mean loss per window) over the `count` spread windows, `batch` at a time."""
        idx = self.spread(count)
        total = 0.0
        for i in range(0, len(idx), batch):
            x, y = self.batch(idx[i:i + batch], device)
            with autocast:
                total += fn(x, y).float().item() * len(x)
        return total / len(idx)


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, ("model", "data", "held_out", "text_field"))
    p.add_argument("--cache", default=CACHE, help="where the token files go (default: the repository's cache/)")
    a = p.parse_args(argv)
    cfg = settings(vars(a))
    cfg.model = cfg.model or default_model()
    streams = load_splits(cfg, cache=a.cache)
    with open(os.path.join(os.path.dirname(streams[0].filename), "manifest.json")) as f:
        m = json.load(f)
    for s, tokens in zip(SIDES, streams):
        print(f"{s:<9}{m[s]['documents']:>12,} documents{len(tokens):>15,} tokens  {tokens.filename} ({tokens.dtype})")


if __name__ == "__main__":
    cli(main, sys.argv[1:])
