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
import sys
import sysconfig
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch

from load_qwen import cli, default_model, load_config, load_tokenizer, write_atomic

ROOT = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(ROOT, "cache")
PYTHON_DOCS = "/usr/share/doc/python3.11/html/_sources/**/*.rst.txt"
TEXT = (".txt", ".md", ".rst", ".py")  # one document per file (.py: the stdlib fallback corpus)
KINDS = TEXT + (".jsonl", ".jsonl.gz", ".parquet")
SIDES = ("train", "held_out")
BATCH_CHARS = 1 << 20  # text per encode_batch call: documents for every core, a bounded memory


# ----------------------------------------------------------------------------------------------
# sources -> documents

def find_files(sources):
    """Files from paths, folders and globs; default: the Python docs, else the stdlib's sources.
    A folder gives every file of a known kind under it; any other file named is refused."""
    if not sources:
        files = sorted(glob.glob(PYTHON_DOCS, recursive=True))
        if files:
            return files
        stdlib = sysconfig.get_paths()["stdlib"]
        print(f"Python docs not found at {PYTHON_DOCS} (apt-get install python3.11-doc); "
              f"using the standard library's sources in {stdlib} instead")
        return sorted(f for f in glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)
                      if "site-packages" not in f)
    files = []
    for src in sources:
        if os.path.isdir(src):
            found = [f for f in glob.glob(os.path.join(src, "**", "*"), recursive=True) if f.endswith(KINDS)]
        else:
            found = glob.glob(src, recursive=True)
        if not found:
            raise FileNotFoundError(f"--data {src!r} matches no files")
        for f in found:
            if not f.endswith(KINDS) or os.path.isdir(f):
                raise ValueError(f"{f}: not a file --data reads; give {' '.join(KINDS)} files, or folders of them")
        files += sorted(found)
    return files


def parquet(file):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{file}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        return pq.ParquetFile(file)
    except Exception as e:  # pyarrow's own error types, for a truncated or foreign file
        raise ValueError(f"cannot read {file} as parquet ({e}); is it corrupt?") from e


def binary(file):
    return ValueError(f"{file} is binary, not text (it holds a NUL byte); give text, .jsonl(.gz) or .parquet files")


def check_files(files, text_field):
    """Refuse what would be read as garbage, before anything is written: a binary file (a NUL byte
    in its first 64 KB, git's test), or a parquet file without the text column."""
    for f in files:
        if f.endswith(".parquet"):
            names = parquet(f).schema_arrow.names
            if text_field not in names:
                raise ValueError(f"{f} has no column {text_field!r} (it has {', '.join(names)}); "
                                 "name the text column with --text-field")
            continue
        with open(f, "rb") as raw:
            try:
                head = (gzip.open(raw) if f.endswith(".gz") else raw).read(1 << 16)
            except OSError as e:  # gzip.BadGzipFile
                raise ValueError(f"cannot read {f}: {e}") from e
        if b"\0" in head:
            raise binary(f)


def read_file(file, text_field):
    """(text, bytes of the file read so far) per document: a text file is one document, a .jsonl(.gz)
    line one, a parquet row one (read in batches of rows)."""
    if file.endswith(".parquet"):
        pf, rows, size = parquet(file), 0, os.path.getsize(file)
        for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
            rows += batch.num_rows
            for text in batch.column(0).to_pylist():
                if not isinstance(text, (str, type(None))):
                    raise ValueError(f"{file}: column {text_field!r} holds {type(text).__name__}, not text; "
                                     "name the text column with --text-field")
                yield text or "", size * rows // pf.metadata.num_rows
    elif file.endswith((".jsonl", ".jsonl.gz")):
        with open(file, "rb") as raw:  # raw.tell(): how far reading has got, gzip or not
            fh = gzip.open(raw) if file.endswith(".gz") else raw
            try:
                for i, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            text = json.loads(line)[text_field]
                            if not isinstance(text, str):
                                raise TypeError(f"{type(text).__name__}, not a string")
                        except (ValueError, KeyError, TypeError, IndexError) as e:
                            raise ValueError(f"{file} line {i}: needs a JSON object with a {text_field!r} string "
                                             f"field ({e!r}); name it with --text-field") from e
                        yield text, raw.tell()
            except (OSError, EOFError) as e:  # a truncated or corrupt .gz
                raise ValueError(f"cannot read {file}: {e}") from e
    else:
        with open(file, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        if "\0" in text:
            raise binary(file)
        yield text, os.path.getsize(file)


def documents(files, text_field="text"):
    """(text, bytes of the corpus read so far) for every document that is not blank, in order."""
    done = 0
    for f in files:
        for text, pos in read_file(f, text_field):
            if text.strip():
                yield text, done + pos
        done += os.path.getsize(f)


def is_held_out(text: str, fraction: float) -> bool:
    """A document's side depends on its text alone: the same on every machine wherever the corpus
    lies, stable as the corpus grows, and copies of one document never straddle the split."""
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) < fraction * 2**32


def eos_id(config) -> int:
    eos = config.eos_token_id
    if eos is None:
        raise ValueError("the model's config.json has no eos_token_id to separate documents with")
    return eos[0] if isinstance(eos, list) else eos


# ----------------------------------------------------------------------------------------------
# documents -> token files: cache/tokens/<key>/{train,held_out}.bin + manifest.json

def batches(docs):
    """([text], bytes read) of about BATCH_CHARS characters: enough documents for every core, bounded memory."""
    batch, size = [], 0
    for text, done in docs:
        batch.append(text)
        size += len(text)
        if size >= BATCH_CHARS:
            yield batch, done
            batch, size = [], 0
    if batch:
        yield batch, done


def encoded(tokenizer, batches, ahead=2):
    """(texts, encodings, bytes read) per batch, in order. `encode_batch` releases the GIL, so with
    `ahead` batches encoding in threads the cores stay busy through each batch's longest document,
    while this thread reads the next batch and writes the last."""
    with ThreadPoolExecutor(ahead) as pool:
        jobs = deque()
        for texts, done in batches:
            jobs.append((texts, pool.submit(tokenizer.encode_batch, texts, add_special_tokens=False), done))
            if len(jobs) > ahead:
                texts, job, done = jobs.popleft()
                yield texts, job.result(), done
        for texts, job, done in jobs:
            yield texts, job.result(), done


def tokenize(files, folder, key, tokenizer, eos, fraction, text_field):
    """Stream the documents into the two token files, EOS after every document, then write the
    manifest: last and atomically, so a killed run never leaves a cache that reads as complete."""
    dtype = np.uint16 if max(tokenizer.get_vocab_size(), eos + 1) <= 2**16 else np.uint32
    paths = [os.path.join(folder, f"{s}.bin") for s in SIDES]
    total = sum(os.path.getsize(f) for f in files)
    docs, tokens = [0, 0], [0, 0]
    t0 = shown = time.time()
    try:
        with open(paths[0] + ".tmp", "wb") as train_f, open(paths[1] + ".tmp", "wb") as held_f:
            for texts, encodings, done in encoded(tokenizer, batches(documents(files, text_field))):
                ids = ([], [])  # this batch's tokens for each side, in document order
                for text, enc in zip(texts, encodings):
                    side = is_held_out(text, fraction)
                    ids[side].extend(enc.ids)
                    ids[side].append(eos)
                    docs[side] += 1
                for side, out in enumerate((train_f, held_f)):
                    np.array(ids[side], dtype).tofile(out)
                    tokens[side] += len(ids[side])
                if time.time() - shown > 10:  # long corpora only
                    shown, rate = time.time(), sum(tokens) / (time.time() - t0)
                    eta = (shown - t0) * (total - done) / done
                    print(f"tokenising: {sum(docs):,} documents, {sum(tokens):,} tokens, {rate:,.0f} tok/s, "
                          f"{done / total:.0%} of {total / 2**20:,.0f} MiB, eta {eta / 60:.1f} min",
                          end="\r" if sys.stderr.isatty() else "\n", file=sys.stderr, flush=True)
            if not docs[0] or not docs[1]:
                raise ValueError(f"{sum(docs)} documents cannot be split into train and held-out at {fraction:.0%}; "
                                 "give more documents or change --held-out")
            for out in (train_f, held_f):  # on disk before the manifest vouches for them
                out.flush()
                os.fsync(out.fileno())
        for p in paths:
            os.replace(p + ".tmp", p)
    except BaseException:
        for p in paths:
            if os.path.exists(p + ".tmp"):
                os.remove(p + ".tmp")
        raise
    manifest = {"key": key, "dtype": np.dtype(dtype).name,
                **{s: {"documents": d, "tokens": t} for s, d, t in zip(SIDES, docs, tokens)}}
    write_atomic(os.path.join(folder, "manifest.json"), json.dumps(manifest, indent=1).encode())
    print(f"tokenised {sum(docs):,} documents ({docs[1]:,} held out), {sum(tokens):,} tokens in "
          f"{time.time() - t0:.0f}s into {folder}", file=sys.stderr)
    return manifest


def read_manifest(folder, key, report=True):
    """The manifest if it vouches for complete token files of this key, else None (and, when a
    manifest is there but does not hold, why: the caller prepares the cache again)."""
    file = os.path.join(folder, "manifest.json")
    if not os.path.exists(file):
        return None  # never prepared, or killed before the end
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
        return m
    except (OSError, ValueError, KeyError, TypeError) as e:
        if report:
            print(f"token cache {folder} is damaged ({e!r}): preparing it again", file=sys.stderr)
        return None


@contextmanager
def locked(folder):
    """One process prepares a cache at a time (torchrun's other ranks wait, then read it); the OS
    releases the lock of a killed process."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def token_cache(sources, model_dir, held_out=0.05, text_field="text", config=None, cache=None):
    """(folder, manifest) of the token files for these sources, split and tokenizer: found, or
    prepared now. The key names the files (path, size, mtime), the split, the EOS id and the
    tokenizer.json's content, so a different tokenizer never reuses another's ids."""
    if not 0 < held_out < 1:
        raise ValueError(f"--held-out {held_out} must be a fraction between 0 and 1")
    files = find_files(sources)
    config = config or load_config(model_dir)
    eos = eos_id(config)
    tokenizer = load_tokenizer(model_dir, config)  # its error names a missing or foreign tokenizer.json
    with open(os.path.join(model_dir, "tokenizer.json"), "rb") as f:
        tokenizer_sha1 = hashlib.sha1(f.read()).hexdigest()
    key = [[f, os.path.getsize(f), os.path.getmtime(f)] for f in files]
    key += [held_out, "split by sha1 of the text", text_field, eos, "tokenizer.json sha1 " + tokenizer_sha1]
    folder = os.path.join(cache or CACHE, "tokens", hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16])
    manifest = read_manifest(folder, key)
    if manifest is None:
        check_files(files, text_field)  # a corpus that is refused writes nothing
        with locked(folder):  # another process may have prepared it while this one waited
            manifest = read_manifest(folder, key, report=False)
            if manifest is None:
                if os.path.exists(os.path.join(folder, "manifest.json")):
                    os.remove(os.path.join(folder, "manifest.json"))  # no reader trusts it while we rewrite
                manifest = tokenize(files, folder, key, tokenizer, eos, held_out, text_field)
    return folder, manifest


def load_splits(sources, model_dir, held_out=0.05, text_field="text", config=None, cache=None):
    """(train, held_out) token streams as read-only np.memmap arrays, EOS after every document."""
    folder, m = token_cache(sources, model_dir, held_out, text_field, config, cache)
    return [np.memmap(os.path.join(folder, f"{s}.bin"), m["dtype"], "r", shape=(m[s]["tokens"],)) for s in SIDES]


# ----------------------------------------------------------------------------------------------
# token streams -> training windows

class Windows:
    """Windows of seq_len + offset tokens at stride seq_len: inputs = w[:seq_len], labels = w[offset:].
    offset 1 is the next token. The labels are already shifted, so the loss must not shift them again
    (the authors' code did, and trained on t+2: --label-offset 2 reproduces that on purpose)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, offset: int = 1):
        self.tokens, self.seq_len, self.offset = tokens, seq_len, offset
        self.n = (len(tokens) - offset) // seq_len
        if self.n < 1:
            raise ValueError(f"{len(tokens)} tokens do not fill one window of {seq_len + offset}; use a shorter --seq-len")

    def batch(self, indices, device="cpu", offsets=None):
        """(inputs, labels) [B, seq_len] of the windows; with offsets (each at most self.offset), the
        labels are a list, one tensor per offset, all for the same inputs."""
        L = self.seq_len
        w = torch.from_numpy(np.stack([self.tokens[i * L:(i + 1) * L + self.offset] for i in indices]).astype(np.int64))
        if torch.device(device).type == "cuda":  # pinned + non_blocking: the copy does not wait for the GPU
            w = w.pin_memory()
        w = w.to(device, non_blocking=True)
        if offsets is None:
            return w[:, :L], w[:, self.offset:]
        return w[:, :L], [w[:, k:k + L] for k in offsets]

    def order(self, seed: int, epoch: int):
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()

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


@cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="HF-format model folder whose tokenizer to use (default: SmolLM2-135M)")
    p.add_argument("--data", nargs="*", default=[], help=f"files, folders, globs of {' '.join(KINDS)} (default: Python docs)")
    p.add_argument("--held-out", type=float, default=0.05, help="fraction of documents held out")
    p.add_argument("--text-field", default="text", help="the .jsonl field or parquet column that holds the text")
    p.add_argument("--cache", default=CACHE, help="where the token files go (default: the repository's cache/)")
    a = p.parse_args(argv)
    folder, m = token_cache(a.data, a.model or default_model(CACHE), a.held_out, a.text_field, cache=a.cache)
    for s in SIDES:
        print(f"{s:<9}{m[s]['documents']:>12,} documents{m[s]['tokens']:>15,} tokens  {os.path.join(folder, s)}.bin ({m['dtype']})")


if __name__ == "__main__":
    main(sys.argv[1:])
