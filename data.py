"""Data: sources -> documents -> held-out split by document -> token ids on disk -> windows.
train.py and eval.py both read their data through this module."""
import glob
import hashlib
import json
import os
import sysconfig

import numpy as np
import torch

from load_qwen import load_config

ROOT = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(ROOT, "cache")
PYTHON_DOCS = "/usr/share/doc/python3.11/html/_sources/**/*.rst.txt"


def find_files(sources):
    """Files from paths, folders and globs (.txt .md .rst .jsonl); default: the Python docs."""
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
            found = [f for f in glob.glob(os.path.join(src, "**", "*"), recursive=True)
                     if f.endswith((".txt", ".md", ".rst", ".jsonl"))]
        else:
            found = glob.glob(src, recursive=True)
        if not found:
            raise FileNotFoundError(f"--data {src!r} matches no files")
        files += sorted(found)
    return files


def read_documents(files):
    """[(name, text)]: a text file is one document, a .jsonl line with a "text" field is one."""
    docs = []
    for f in files:
        if f.endswith(".jsonl"):
            with open(f, encoding="utf-8") as fh:
                for i, line in enumerate(fh):
                    if line.strip():
                        try:
                            docs.append((f"{f}:{i + 1}", json.loads(line)["text"]))
                        except (json.JSONDecodeError, KeyError, TypeError) as e:
                            raise ValueError(f"{f} line {i + 1}: needs a JSON object with a \"text\" "
                                             f"field ({e!r})") from e
        else:
            with open(f, encoding="utf-8", errors="replace") as fh:
                docs.append((f, fh.read()))
    return [(n, t) for n, t in docs if t.strip()]


def is_held_out(text: str, fraction: float) -> bool:
    """A document's side depends on its text alone: the same on every machine wherever the corpus
    lies, stable as the corpus grows, and copies of one document never straddle the split."""
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) < fraction * 2**32


def tokenize(docs, tokenizer, eos: int) -> np.ndarray:
    """One stream of token ids, EOS after every document."""
    ids = []
    for enc in tokenizer.encode_batch([t for _, t in docs], add_special_tokens=False):
        ids += enc.ids + [eos]
    return np.array(ids, dtype=np.uint32)


def eos_id(model_dir) -> int:
    eos = load_config(model_dir).eos_token_id
    if eos is None:
        raise ValueError(f"{model_dir}/config.json has no eos_token_id to separate documents with")
    return eos[0] if isinstance(eos, list) else eos


def load_splits(sources, model_dir, held_out: float, tokenizer, eos: int, cache=None):
    """(train, held_out) token streams, cached on disk under a key of the files, tokenizer and split."""
    files = find_files(sources)
    key = [[f, os.path.getsize(f), os.path.getmtime(f)] for f in files]
    key += [held_out, "split by sha1 of the text", eos, os.path.getsize(os.path.join(model_dir, "tokenizer.json"))]
    folder = os.path.join(cache or CACHE, "tokens", hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16])
    paths = [os.path.join(folder, f"{side}.npy") for side in ("train", "held_out")]
    if not all(os.path.isfile(p) for p in paths):
        docs = read_documents(files)
        held = [is_held_out(text, held_out) for _, text in docs]
        sides = [[d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h]]
        if not sides[0] or not sides[1]:
            raise ValueError(f"{len(docs)} documents cannot be split into train and held-out at {held_out:.0%}; "
                             "give more documents or change --held-out")
        os.makedirs(folder, exist_ok=True)
        for p, side in zip(paths, sides):
            tmp = p + f".tmp{os.getpid()}.npy"
            np.save(tmp, tokenize(side, tokenizer, eos))
            os.replace(tmp, p)  # atomic: a killed run never leaves a half-written cache
        print(f"tokenised {len(docs)} documents ({len(sides[1])} held out) into {folder}")
    return [np.load(p, mmap_mode="r") for p in paths]


class Windows:
    """Windows of seq_len + 1 tokens at stride seq_len: inputs = w[:-1], labels = w[1:]. The labels
    are already the next tokens, so the loss must not shift them again (the authors' code did)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.n = (len(tokens) - 1) // seq_len
        if self.n < 1:
            raise ValueError(f"{len(tokens)} tokens do not fill one window of {seq_len + 1}; use a shorter --seq-len")

    def batch(self, indices, device="cpu"):
        w = torch.from_numpy(np.stack([self.tokens[i * self.seq_len:(i + 1) * self.seq_len + 1]
                                       for i in indices]).astype(np.int64))
        if torch.device(device).type == "cuda":  # pinned + non_blocking: the copy does not wait for the GPU
            w = w.pin_memory()
        return w[:, :-1].to(device, non_blocking=True), w[:, 1:].to(device, non_blocking=True)

    def order(self, seed: int, epoch: int):
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()

    def spread(self, count: int):
        """`count` fixed windows spread over the whole stream: the evaluation set."""
        return np.linspace(0, self.n - 1, min(count, self.n)).astype(int).tolist()
