"""Damaged inputs, fuzzed (seeded): config.json, a safetensors header, tokenizer.json, a training
checkpoint and the token cache, broken in many random ways. Every case loads cleanly or ends in the
project's error on bad input (a ValueError, CheckpointError among them, which run.cli turns into
one line); anything else -- another exception, a crash, a hang -- fails the test and names the
seed that caused it. A damaged token cache is prepared again instead."""
import json
import os
import random
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import make_corpus, make_model_folder, ouroboros, splits
from load_qwen import load_model, load_tokenizer
from run import load_checkpoint, save_checkpoint, settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = 60  # per file kind
GARBAGE = [None, -1, 0, 1, 7, 2**62, -2.5, 1e308, float("nan"), "", "x", "F16", [], [1, "a"], [2**40], {}, {"a": 1},
           True]


def mutate_bytes(data: bytes, rng, end=None) -> bytes:
    """Truncate, flip bytes, overwrite a span or insert junk, within data[:end]."""
    end = min(end or len(data), len(data))
    at = rng.randrange(end)
    kind = rng.choice(["truncate", "flip", "span", "insert", "empty"])
    if kind == "truncate":
        return data[:at]
    if kind == "empty":
        return b""
    if kind == "insert":
        return data[:at] + rng.randbytes(rng.randint(1, 16)) + data[at:]
    out = bytearray(data)
    where = [rng.randrange(end) for _ in range(rng.randint(1, 8))] if kind == "flip" else range(at, min(end, at + 32))
    for i in where:
        out[i] = rng.randrange(256) if kind == "span" else out[i] ^ (1 << rng.randrange(8))
    return bytes(out)


def mutate_json(obj, rng):
    """One value somewhere in the tree replaced by garbage of another type, or its key deleted."""
    parent, key, node = None, None, obj
    while isinstance(node, (dict, list)) and node and (parent is None or rng.random() < 0.6):
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        parent, node = node, node[key]
    if parent is None:
        return rng.choice(GARBAGE)
    if isinstance(parent, dict) and rng.random() < 0.2:
        del parent[key]
    else:
        parent[key] = rng.choice(GARBAGE)
    return obj


def damage_json(text: bytes, rng) -> bytes:
    if rng.random() < 0.3:
        return mutate_bytes(text, rng)
    return json.dumps(mutate_json(json.loads(text), rng)).encode()


def damage_safetensors(data: bytes, rng) -> bytes:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensor bytes."""
    n = struct.unpack("<Q", data[:8])[0]
    kind = rng.choice(["header bytes", "header json", "length"])
    if kind == "header bytes":
        return mutate_bytes(data, rng, end=8 + n)
    if kind == "length":
        return struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, 2**63, len(data)])) + data[8:]
    header = json.dumps(mutate_json(json.loads(data[8:8 + n]), rng)).encode()
    return struct.pack("<Q", len(header)) + header + data[8 + n:]


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """A tiny model folder and a checkpoint train.py wrote for it (with AdamW state)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    model_dir = make_model_folder(str(tmp / "model"))
    model = ouroboros(model_dir, prelude=1, recurrent=2, coda=1, rank=8)
    cfg = settings({"model": model_dir, "prelude": 1, "recurrent": 2, "coda": 1, "rank": 8})
    opt = torch.optim.AdamW(model.trainable().values())
    for p in model.trainable().values():
        p.grad = torch.randn_like(p)
    opt.step()
    save_checkpoint(str(tmp / "checkpoint.safetensors"), model, opt, 1, cfg)
    return model_dir, str(tmp / "checkpoint.safetensors"), model


def fuzz(original, damage, load, workdir, name):
    """For each seed: damage a copy of `original` (a file in a model folder), then load it."""
    clean = errors = 0
    data = open(original, "rb").read()
    for seed in range(CASES):
        folder = os.path.join(workdir, f"{name}{seed}")
        shutil.copytree(os.path.dirname(original), folder)
        damaged = os.path.join(folder, os.path.basename(original))
        with open(damaged, "wb") as f:
            f.write(damage(data, random.Random(seed)))
        try:
            load(folder, damaged)
            clean += 1
        except ValueError as e:  # the project's error on bad input: it names the problem
            assert str(e).strip(), f"seed {seed}: an empty message"
            errors += 1
        except Exception as e:
            raise AssertionError(f"{name} seed {seed}: {type(e).__name__}: {e}") from e
        shutil.rmtree(folder)
    assert errors > CASES // 3  # the damage is real, most of it is caught
    return clean, errors


def test_fuzzed_config_json(originals, tmp_path):
    model_dir = originals[0]
    fuzz(os.path.join(model_dir, "config.json"), damage_json, lambda folder, _: load_model(folder), tmp_path, "config")


def test_fuzzed_safetensors_header(originals, tmp_path):
    model_dir = originals[0]

    def load(folder, _):
        model = load_model(folder)
        model(torch.tensor([[3, 4, 5]]))
    fuzz(os.path.join(model_dir, "model.safetensors"), damage_safetensors, load, tmp_path, "weights")


def test_fuzzed_tokenizer_json(originals, tmp_path):
    model_dir = originals[0]

    def load(folder, _):
        ids = load_tokenizer(folder).encode("the cat sat on 42 mats").ids
        assert all(0 <= i < 264 for i in ids)
    fuzz(os.path.join(model_dir, "tokenizer.json"), damage_json, load, tmp_path, "tokenizer")


def test_fuzzed_checkpoint(originals, tmp_path):
    _, ckpt, model = originals
    opt = torch.optim.AdamW(model.trainable().values())

    def damage(data, rng):  # its header and tensor bytes both
        return damage_safetensors(data, rng) if rng.random() < 0.7 else mutate_bytes(data, rng)

    def load(folder, damaged):
        load_checkpoint(damaged, model, opt)
        opt.step()  # what --resume does next: the restored AdamW state must fit
    fuzz(ckpt, damage, load, tmp_path, "checkpoint")


def test_fuzzed_token_cache(originals, tmp_path, capfd):
    """A damaged token cache is the machine's fault, not the user's: loading it is never an error. A
    damaged manifest, or a token file of the wrong size, is prepared again and gives the original
    tokens. Bytes changed inside a token file of the right size are read as they are: the manifest
    vouches for sizes, not content (checking content would cost a pass over the corpus per run), so
    such ids can be wrong, even beyond the vocabulary."""
    corpus = make_corpus(str(tmp_path / "corpus"))
    want = [np.array(s) for s in splits([corpus], originals[0], 0.2, cache=str(tmp_path / "clean"))]
    (key,) = os.listdir(tmp_path / "clean" / "tokens")
    prepared = 0
    for seed in range(CASES):
        rng = random.Random(seed)
        cache = tmp_path / f"cache{seed}"
        shutil.copytree(tmp_path / "clean", cache)
        file = cache / "tokens" / key / rng.choice(["manifest.json", "train.bin", "held_out.bin"])
        before = file.read_bytes()
        after = (damage_json if file.suffix == ".json" else mutate_bytes)(before, rng)
        file.write_bytes(after)
        capfd.readouterr()
        try:
            got = splits([corpus], originals[0], 0.2, cache=str(cache))
        except Exception as e:
            raise AssertionError(f"token cache seed {seed} ({file.name}): {type(e).__name__}: {e}") from e
        again = "tokenised" in capfd.readouterr().err
        prepared += again
        if file.suffix == ".bin" and len(after) == len(before):
            assert not again and [len(g) for g in got] == [len(w) for w in want], seed
        else:
            assert all(np.array_equal(g, w) for g, w in zip(got, want)), f"seed {seed} ({file.name})"
        shutil.rmtree(cache)
    assert prepared > CASES // 3  # the damage is real, most of it is seen


def test_clis_on_damaged_folders_print_one_line_not_a_traceback(originals, tmp_path):
    """generate.py run as a program on a few damaged folders (seeds whose damage is refused): exit 1
    and an `error:` line, no traceback."""
    model_dir = originals[0]
    cases = [("config.json", damage_json, 3), ("model.safetensors", damage_safetensors, 5),
             ("tokenizer.json", damage_json, 1)]
    for file, damage, seed in cases:
        folder = str(tmp_path / file)
        shutil.copytree(model_dir, folder)
        data = open(os.path.join(folder, file), "rb").read()
        open(os.path.join(folder, file), "wb").write(damage(data, random.Random(seed)))
        done = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model", folder, "--prompt", "x",
                               "--max-new-tokens", "2"],
                              capture_output=True, text=True, timeout=120)
        assert "Traceback" not in done.stderr, (file, seed, done.stderr[-2000:])
        assert done.returncode == 1 and done.stderr.startswith("error: "), (file, seed, done.stderr)
