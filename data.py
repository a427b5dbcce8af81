"""Data: files -> documents -> a held-out split by document -> token files -> windows. Documents stream through,
so memory stays flat in the corpus's size.

    python data.py --model DIR --data corpus/*.parquet --held-out 0.01   # tokenise once, print the splits
"""
import fcntl, functools, glob, gzip, hashlib, itertools, json, os, sys

import numpy as np
import torch

from load_qwen import CACHE, load_config, load_tokenizer

PYTHON_DOCS = "/usr/share/doc/python3.11/html/_sources/**/*.rst.txt"  # the default corpus (Debian's python3.11-doc)
KINDS = (".txt", ".md", ".rst", ".py", ".jsonl", ".jsonl.gz", ".parquet")  # a document per file, line or row
SIDES = ("train", "held_out")


def find_files(sources) -> list:
    """Files of paths, folders and globs (by default the Python docs)."""
    files = []
    for src in sources or [PYTHON_DOCS]:  # a folder as a glob sees it: no hidden files (.git, .venv)
        pattern = os.path.join(glob.escape(src), "**") if os.path.isdir(src) else src
        found = [src] if os.path.isfile(src) else sorted(filter(os.path.isfile, glob.glob(pattern, recursive=True)))
        if not found:
            raise FileNotFoundError(f"--data {src!r} matches no files")
        files += [f for f in found if f.endswith(KINDS) or f == src]
    return files


def documents(files, text_field: str = "text"):
    for file in files:
        if file.endswith(".parquet"):
            import pyarrow.parquet as pq  # optional
            table = pq.ParquetFile(file)
            if text_field not in table.schema_arrow.names:
                raise ValueError(f"{file} has no column {text_field!r}: name the text column with --text-field")
            for batch in table.iter_batches(batch_size=1024, columns=[text_field]):
                yield from batch.column(0).to_pylist()
        elif file.endswith((".jsonl", ".jsonl.gz")):
            with (gzip.open if file.endswith(".gz") else open)(file, "rt", encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    text = json.loads(line).get(text_field) if line.strip() else ""
                    if not isinstance(text, str):
                        raise ValueError(f"{file} line {i}: no {text_field!r} text; name the field with --text-field")
                    yield text
        else:
            with open(file, encoding="utf-8", errors="replace") as f:  # newlines read as \n
                text = f.read()
            if "\0" in text:
                raise ValueError(f"{file} is not text: give .txt .md .rst .py .jsonl(.gz) or .parquet files")
            yield text


def tokenize(files, folder, tokenizer, eos, held_out, text_field) -> str:
    """Documents that are not blank -> two token files, EOS after each, ~1M characters per encode_batch; the
    manifest last: a killed run never reads as done. -> their dtype."""
    dtype = "uint16" if max(tokenizer.get_vocab_size(), eos + 1) <= 2**16 else "uint32"
    docs, batch, size, outs = [0, 0], [], 0, [open(f"{folder}/{s}.bin", "wb") for s in SIDES]
    for text in itertools.chain(documents(files, text_field), [None]):  # None: the end
        if text and text.strip():
            batch.append(text)
            size += len(text)
        if batch and (text is None or size >= 1 << 20):
            ids = ([], [])
            for doc, enc in zip(batch, tokenizer.encode_batch(batch, add_special_tokens=False)):
                # By the text alone: the same on every machine, and copies land together.
                side = int(hashlib.sha1(doc.encode()).hexdigest()[:8], 16) < held_out * 2**32
                ids[side].extend(enc.ids + [eos])
                docs[side] += 1
            for side, out in enumerate(outs):
                np.array(ids[side], dtype).tofile(out)
            batch, size = [], 0
    for out in outs:
        out.close()
    if not all(docs):
        raise ValueError(f"{sum(docs)} documents cannot be split at --held-out {held_out}: give more documents")
    write_atomic(f"{folder}/manifest.json", json.dumps({"dtype": dtype, "documents": docs}).encode())
    print(f"tokenised {sum(docs):,} documents, {docs[1]:,} held out", file=sys.stderr)
    return dtype


def write_atomic(file: str, data: bytes):  # a temporary file, synced, renamed over `file`
    with open(file + ".tmp", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(file + ".tmp", file)


def load_splits(cfg) -> list:
    """(train, held_out) token memmaps of cfg's --data, --held-out and tokenizer, cached."""
    files, eos = find_files(cfg.data), load_config(cfg.model).eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    with open(os.path.join(cfg.model, "tokenizer.json"), "rb") as f:
        vocab = hashlib.sha1(f.read()).hexdigest()
    key = [[p, os.path.getsize(p), os.path.getmtime(p)] for p in files] + [cfg.held_out, cfg.text_field, eos, vocab]
    folder = os.path.join(CACHE, "tokens", hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16])
    os.makedirs(folder, exist_ok=True)
    with open(f"{folder}/lock", "w") as lock:  # one process tokenises, the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(f"{folder}/manifest.json"):
            dtype = json.load(open(f"{folder}/manifest.json"))["dtype"]
        else:
            dtype = tokenize(files, folder, load_tokenizer(cfg.model), eos, cfg.held_out, cfg.text_field)
    return [np.memmap(f"{folder}/{s}.bin", dtype, "r") for s in SIDES]


@functools.lru_cache(maxsize=1)  # the epoch being drawn
def order(n: int, seed: int, epoch: int) -> list:  # a permutation of n windows per (seed, epoch)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


class Windows:
    """Windows of seq_len + offset tokens at stride seq_len: inputs w[:seq_len], labels w[offset:]. The labels are
    shifted here, once: the loss must not shift them again (the authors' code did, and trained on token t+2)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, offset: int = 1):
        self.tokens, self.seq_len, self.offset = tokens, seq_len, offset
        self.n = (len(tokens) - offset) // seq_len
        if self.n < 1:
            raise ValueError(f"{len(tokens)} tokens do not fill a window of {seq_len + offset}: lower --seq-len")

    def batch(self, indices, device="cpu"):
        """(inputs, labels) [B, seq_len]."""
        L = self.seq_len
        w = np.stack([self.tokens[i * L:(i + 1) * L + self.offset] for i in indices]).astype(np.int64)
        w = torch.from_numpy(w).to(device)
        return w[:, :L], w[:, self.offset:]

    def draw(self, cfg, step: int, micro: int, rank: int = 0, world: int = 1):
        """(window indices, depth) of a micro-batch, a function of (seed, step, micro, rank) alone: a resumed run
        sees exactly the batches it would have."""
        first = (step * cfg.grad_accum + micro) * cfg.batch_size * world + rank * cfg.batch_size
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + micro)
        depth = cfg.depths[torch.randint(len(cfg.depths), (), generator=g).item()]
        return [order(self.n, cfg.seed, i // self.n)[i % self.n] for i in range(first, first + cfg.batch_size)], depth

    def spread(self, count: int) -> list:
        """`count` fixed windows spread over the stream: an evaluation set."""
        return np.linspace(0, self.n - 1, min(count, self.n)).astype(int).tolist()


def main(argv=None):
    from train import parse  # train.py's flags
    for side, tokens in zip(SIDES, load_splits(parse(argv, __doc__)[0])):
        print(f"{side:<9}{len(tokens):>14,} tokens  {tokens.filename}")


if __name__ == "__main__":
    from train import cli
    cli(main)
