"""The data pipeline: every input kind, the held-out split, refused inputs, the token cache's key,
killed and damaged preparations, and windows read through np.memmap against the in-memory oracle."""
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
from conftest import WORDS, make_corpus, make_model_folder, splits
from run import settings
from load_qwen import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = 2  # make_model_folder's eos_token_id


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model_folder(str(tmp_path_factory.mktemp("data") / "model"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(str(tmp_path_factory.mktemp("data") / "corpus"))


def write_every_kind(folder, field="text", seed=0):
    """A corpus with every input kind (and a file of no kind, which a folder skips); returns its
    documents in the order data.py must read them: files sorted, then lines / rows in order."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rng = random.Random(seed)
    docs = [f"DOC{i:03d}X " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for i in range(48)]
    docs[0] += " café, 1234 ünïcode"  # the byte-level round trip
    os.makedirs(folder)
    for name, text in zip(("a.txt", "b.md", "c.rst"), docs[:3]):
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    lines = [json.dumps({field: t, "id": i}) for i, t in enumerate(docs[3:15])]
    lines[4:4] = ["", json.dumps({field: "  \n "})]  # a blank line and a blank document: both skipped
    with open(os.path.join(folder, "d.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with gzip.open(os.path.join(folder, "e.jsonl.gz"), "wt") as f:
        f.write("".join(json.dumps({field: t}) + "\n" for t in docs[15:27]))
    rows = docs[27:] + [None]  # a null row: skipped
    pq.write_table(pa.table({"id": list(range(len(rows))), field: rows}), os.path.join(folder, "f.parquet"),
                   row_group_size=5)
    with open(os.path.join(folder, "skip.csv"), "w") as f:
        f.write("not,a,document\n")
    return docs


def held(text, fraction):
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) < fraction * 2**32


def in_memory_splits(docs, tokenizer, fraction, eos=EOS):
    """The oracle: the pipeline before token files (every document in memory, one list of ids)."""
    sides = []
    for side in (False, True):
        ids = []
        for enc in tokenizer.encode_batch([t for t in docs if held(t, fraction) == side], add_special_tokens=False):
            ids += enc.ids + [eos]
        sides.append(np.array(ids, dtype=np.uint32))
    return sides


def decoded(tokenizer, stream):
    """The documents of a token stream: EOS after every one."""
    assert stream[-1] == EOS
    docs = np.split(np.asarray(stream), np.flatnonzero(stream == EOS) + 1)[:-1]
    return [tokenizer.decode(d[:-1].tolist()) for d in docs]


def only_folder(cache):
    (name,) = os.listdir(os.path.join(cache, "tokens"))
    return os.path.join(cache, "tokens", name)


def test_windows_give_next_token_labels():
    w = data.Windows(np.arange(100, dtype=np.uint32), seq_len=10)
    assert w.n == 9
    x, y = w.batch([0, 3])
    assert torch.equal(x[0], torch.arange(10)) and torch.equal(y[0], torch.arange(1, 11))
    assert torch.equal(x[1], torch.arange(30, 40)) and torch.equal(y[1], torch.arange(31, 41))


def test_draw_is_a_function_of_seed_step_and_micro_step():
    """The training order: every window once per epoch, another permutation the next epoch, the same
    batches and depths whatever was drawn before (so --resume is exact), processes splitting each batch."""
    w = data.Windows(np.arange(1000, dtype=np.uint32), seq_len=10)  # 99 windows, 9 per optimiser step
    cfg = settings({"batch_size": 3, "grad_accum": 3, "depths": "1,2,3"})
    draws = {(step, micro): w.draw(cfg, step, micro) for step in range(11) for micro in range(3)}
    assert sorted(i for idx, _ in draws.values() for i in idx) == list(range(99))
    assert {depth for _, depth in draws.values()} == {1, 2, 3}
    assert data.Windows(w.tokens, 10).draw(cfg, 5, 1) == draws[5, 1]  # nothing carried from earlier draws
    assert w.draw(cfg, 11, 0)[0] != draws[0, 0][0]  # the next epoch
    assert w.draw(settings({"batch_size": 3, "grad_accum": 3, "seed": 1}), 0, 0)[0] != draws[0, 0][0]
    halves = [w.draw(settings({"batch_size": 3, "grad_accum": 3}), 0, 0, rank, 2)[0] for rank in (0, 1)]
    assert halves[0] == draws[0, 0][0] and halves[1] == draws[0, 1][0]  # two processes: the two micro-batches


def test_every_input_kind_is_read_in_order_and_split_by_document(model, tmp_path):
    docs = write_every_kind(str(tmp_path / "corpus"))
    tok = load_tokenizer(model)
    tr, ho = splits([str(tmp_path / "corpus")], model, 0.25, cache=str(tmp_path / "cache"))
    assert isinstance(tr, np.memmap) and tr.dtype == np.uint16  # 264 ids fit
    assert decoded(tok, tr) == [t for t in docs if not held(t, 0.25)]
    assert decoded(tok, ho) == [t for t in docs if held(t, 0.25)]
    assert len(decoded(tok, ho)) >= 5
    globbed = splits([str(tmp_path / "corpus" / "*.jsonl*"), str(tmp_path / "corpus" / "f.parquet")],
                               model, 0.25, cache=str(tmp_path / "cache"))
    assert decoded(tok, globbed[0]) + decoded(tok, globbed[1]) == sorted(
        docs[3:], key=lambda t: held(t, 0.25))  # a stable sort: each side in reading order


def test_text_field_names_the_field_and_column(model, tmp_path):
    docs = write_every_kind(str(tmp_path / "corpus"), field="content")
    tok = load_tokenizer(model)
    tr, ho = splits([str(tmp_path / "corpus")], model, 0.25, "content", cache=str(tmp_path / "cache"))
    assert decoded(tok, tr) + decoded(tok, ho) == sorted(docs, key=lambda t: held(t, 0.25))


def test_windows_through_the_memmap_equal_the_in_memory_ones(model, tmp_path):
    docs = write_every_kind(str(tmp_path / "corpus"))
    old = in_memory_splits(docs, load_tokenizer(model), 0.25)
    new = splits([str(tmp_path / "corpus")], model, 0.25, cache=str(tmp_path / "cache"))
    for o, n in zip(old, new):
        a, b = data.Windows(o, 16), data.Windows(n, 16)
        assert a.n == b.n > 3
        idx = list(range(a.n))
        for x, y in zip(a.batch(idx), b.batch(idx)):
            assert x.dtype == y.dtype == torch.int64 and torch.equal(x, y)


def test_held_out_split_is_by_document_and_disjoint(model, corpus, tmp_path):
    tok = load_tokenizer(model)
    tr, ho = splits([corpus], model, 0.2, cache=str(tmp_path / "cache"))
    markers = [{t[:6] for t in decoded(tok, s)} for s in (tr, ho)]
    assert markers[0] and markers[1]
    assert not markers[0] & markers[1]                                    # no document on both sides
    assert markers[0] | markers[1] == {f"DOC{i:03d}" for i in range(30)}  # and none lost
    docs = [t for t, _ in data.documents(data.find_files([corpus]))]
    assert markers[1] == {t[:6] for t in docs if held(t, 0.2)}
    moved = shutil.copytree(corpus, tmp_path / "elsewhere")  # the same split wherever the corpus lies
    assert np.array_equal(splits([str(moved)], model, 0.2, cache=str(tmp_path / "c"))[1], ho)


def test_data_py_prepares_then_finds_the_cache(model, corpus, tmp_path, capsys):
    argv = ["--model", model, "--data", corpus, "--held-out", "0.2", "--cache", str(tmp_path)]
    data.main(argv)
    first = capsys.readouterr()
    m = json.load(open(os.path.join(only_folder(str(tmp_path)), "manifest.json")))
    assert "tokenised 30 documents" in first.err and m["train"]["documents"] + m["held_out"]["documents"] == 30
    for side in data.SIDES:
        line = [l for l in first.out.splitlines() if l.startswith(side + " ")][0]
        assert f"{m[side]['documents']:,} documents" in line and f"{m[side]['tokens']:,} tokens" in line
        assert line.endswith(f"{side}.bin (uint16)")
    data.main(argv)
    again = capsys.readouterr()
    assert again.out == first.out and "tokenised" not in again.err


def test_jsonl_lines_that_hold_no_text_are_refused(tmp_path):
    f = tmp_path / "d.jsonl"
    for line, why in [('{"body": "x"}', "KeyError"), ('{"text": 3}', "int, not a string"),
                      ("not json", "JSONDecodeError"),
                      ('["text"]', "TypeError")]:
        f.write_text(json.dumps({"text": "one"}) + "\n\n" + line + "\n")
        with pytest.raises(ValueError, match=f"d.jsonl line 3: needs a JSON object with a 'text' string field .*{why}"):
            list(data.documents([str(f)]))
    with pytest.raises(FileNotFoundError, match="matches no files"):
        data.find_files([str(tmp_path / "nothing*.txt")])


def write_bad(folder, kind):
    """One file data.py must refuse; returns its path."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    path = os.path.join(folder, {"binary": "z.txt", "no column": "z.parquet", "unknown kind": "z.csv",
                                 "not gzip": "z.jsonl.gz", "bad line": "z.jsonl"}[kind])
    if kind == "no column":
        pq.write_table(pa.table({"content": ["a document"]}), path)
    else:
        content = {"binary": b"PK\x03\x04\x14\x00\x00\x00 a zip file", "unknown kind": b"a,b\n1,2\n",
                   "not gzip": b'{"text": "plain"}\n', "bad line": b'{"text": "fine"}\n{"text": "fine"}\n{oops\n'}[kind]
        open(path, "wb").write(content)
    return path


@pytest.mark.parametrize("case", [
    ("binary", "is binary, not text"),
    ("no column", "has no column 'text' \\(it has content\\); name the text column with --text-field"),
    ("unknown kind", "not a file --data reads"),
    ("not gzip", "cannot read .*Not a gzipped file"),
    ("bad line", "line 3: needs a JSON object"),  # found mid-stream: what was written is removed
])
def test_refused_inputs_give_one_line_and_write_nothing(model, corpus, tmp_path, capsys, monkeypatch, case):
    kind, message = case
    monkeypatch.setattr(data, "BATCH_CHARS", 500)  # batches of the good files are written before a bad line is met
    bad = write_bad(str(tmp_path), kind)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError) as e:
        data.main(["--model", model, "--data", corpus, bad, "--cache", str(cache)])
    assert str(e.value).startswith(f"{bad}") or str(e.value).startswith(f"cannot read {bad}")
    assert "\n" not in str(e.value) and re.search(message, str(e.value))
    written = [os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs if f != "lock"]
    assert written == [] and capsys.readouterr().out == ""


def test_cache_key_is_the_tokenizers_content(model, corpus, tmp_path):
    """Two tokenizer.json files of the same size (two ids swapped) must not share token files."""
    other = str(tmp_path / "other")
    shutil.copytree(model, other)
    file = os.path.join(other, "tokenizer.json")
    text = open(file).read()
    assert '"a": 100,' in text and '"o": 114,' in text
    open(file, "w").write(text.replace('"a": 100,', '"a": 114,').replace('"o": 114,', '"o": 100,'))
    assert os.path.getsize(file) == os.path.getsize(os.path.join(model, "tokenizer.json"))
    cache = str(tmp_path / "cache")
    docs = [t for t, _ in data.documents(data.find_files([corpus]))]
    for m in (model, other):
        got = splits([corpus], m, 0.2, cache=cache)
        for g, want in zip(got, in_memory_splits(docs, load_tokenizer(m), 0.2)):
            assert np.array_equal(g, want)
    assert len(os.listdir(os.path.join(cache, "tokens"))) == 2
    assert not np.array_equal(*[splits([corpus], m, 0.2, cache=cache)[0] for m in (model, other)])


KILL = """
import os, signal, sys
import data
from run import settings
data.BATCH_CHARS = 500  # many batches, so the kill lands between two
where = sys.argv[1]
if where == "mid-stream":
    documents = data.documents
    def dies_at_document_12(files, text_field):
        for i, doc in enumerate(documents(files, text_field)):
            if i == 12:
                os.kill(os.getpid(), signal.SIGKILL)
            yield doc
    data.documents = dies_at_document_12
else:  # the token files complete and in place, the manifest not yet
    replace = os.replace
    def replace_then_die(a, b):
        if b.endswith("manifest.json"):
            os.kill(os.getpid(), signal.SIGKILL)
        replace(a, b)
    os.replace = replace_then_die
data.load_splits(settings({"data": [sys.argv[2]], "model": sys.argv[3], "held_out": 0.2}), cache=sys.argv[4])
"""


@pytest.mark.parametrize("where", ["mid-stream", "before the manifest"])
def test_a_killed_preparation_is_never_read_as_complete(model, corpus, tmp_path, capfd, where):
    cache = str(tmp_path / "cache")
    done = subprocess.run([sys.executable, "-c", KILL, where, corpus, model, cache],
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == -signal.SIGKILL
    left = os.listdir(only_folder(cache))
    assert "manifest.json" not in left
    written = {"train.bin.tmp", "held_out.bin.tmp"} if where == "mid-stream" else {"train.bin", "held_out.bin"}
    assert written <= set(left)
    if where == "mid-stream":
        assert os.path.getsize(os.path.join(only_folder(cache), "train.bin.tmp")) > 0  # batches were written
    capfd.readouterr()
    got = splits([corpus], model, 0.2, cache=cache)
    assert "tokenised 30 documents" in capfd.readouterr().err  # prepared again, not read
    docs = [t for t, _ in data.documents(data.find_files([corpus]))]
    for g, want in zip(got, in_memory_splits(docs, load_tokenizer(model), 0.2)):
        assert np.array_equal(g, want)
    assert sorted(os.listdir(only_folder(cache))) == ["held_out.bin", "lock", "manifest.json", "train.bin"]


DAMAGE = ["truncated token file", "token file with bytes appended", "missing token file", "garbage manifest",
          "manifest of the wrong shape", "manifest with a wrong count", "manifest of another key"]


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_cache_is_prepared_again(model, corpus, tmp_path, capfd, damage):
    rng = np.random.default_rng(DAMAGE.index(damage))
    cache = str(tmp_path / "cache")
    want = [np.array(s) for s in splits([corpus], model, 0.2, cache=cache)]  # copies: the files change
    folder = only_folder(cache)
    train, manifest = os.path.join(folder, "train.bin"), os.path.join(folder, "manifest.json")
    m = json.load(open(manifest))
    if damage == "truncated token file":
        os.truncate(train, int(rng.integers(0, os.path.getsize(train))))
    elif damage == "token file with bytes appended":
        open(train, "ab").write(rng.bytes(2 * int(rng.integers(1, 50))))
    elif damage == "missing token file":
        os.remove(os.path.join(folder, rng.choice(["train.bin", "held_out.bin"])))
    elif damage == "garbage manifest":
        open(manifest, "wb").write(rng.bytes(int(rng.integers(1, 300))))
    elif damage == "manifest of the wrong shape":
        wrong = [[], {"dtype": "float64"}, dict(m, dtype="int8"), dict(m, train={"tokens": str(m["train"]["tokens"])})]
        json.dump(wrong[int(rng.integers(len(wrong)))], open(manifest, "w"))
    elif damage == "manifest with a wrong count":
        m["held_out"]["tokens"] += int(rng.integers(1, 100))
        json.dump(m, open(manifest, "w"))
    else:
        m["key"][-1] = "tokenizer.json sha1 " + "0" * 40
        json.dump(m, open(manifest, "w"))
    capfd.readouterr()
    got = splits([corpus], model, 0.2, cache=cache)
    err = capfd.readouterr().err
    assert "is damaged" in err and "tokenised 30 documents" in err
    for g, w in zip(got, want):
        assert np.array_equal(g, w)
    splits([corpus], model, 0.2, cache=cache)  # and from now on read, not prepared
    assert "tokenised" not in capfd.readouterr().err


RACE = """
import hashlib, sys
import data
from run import settings
tr, ho = data.load_splits(settings({"data": [sys.argv[1]], "model": sys.argv[2], "held_out": 0.2}), cache=sys.argv[3])
print(hashlib.sha1(tr.tobytes() + ho.tobytes()).hexdigest())
"""


def test_two_processes_preparing_at_once_tokenise_once(model, corpus, tmp_path):
    """torchrun's ranks all ask for the cache at once: one prepares it, the others wait and read it."""
    cache = str(tmp_path / "cache")
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", RACE, corpus, model, cache], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0] and len(outs[0][0].strip()) == 40
    assert sum("tokenised" in err for _, err in outs) == 1
