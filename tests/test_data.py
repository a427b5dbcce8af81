"""The data pipeline (data.py): files -> documents in order -> a held-out split by document -> token files, found
again by a key of their inputs -> windows whose labels are the next tokens, drawn as a function of (seed, step)."""
import gzip
import hashlib
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

import data
from conftest import WORDS, cli_error, make_corpus, make_model_folder, splits
from load_qwen import load_tokenizer
from train import TrainConfig

EOS = 2  # make_model_folder's eos_token_id


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model_folder(str(tmp_path_factory.mktemp("data") / "model"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(str(tmp_path_factory.mktemp("data") / "corpus"))


def write_every_kind(folder, field="text", seed=0):
    """A corpus with every input kind (and a file of no kind, which a folder skips); returns its documents in the
    order data.py must read them: files sorted, then lines / rows in order."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rng = random.Random(seed)
    docs = [f"DOC{i:03d}X " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for i in range(48)]
    docs[0] += " café, 1234 ünïcode"  # the byte-level round trip
    os.makedirs(folder)
    for name, text in zip(("a.txt", "b.md", "c.rst", "d.py"), docs[:4]):
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    lines = [json.dumps({field: t, "id": i}) for i, t in enumerate(docs[4:15])]
    lines[4:4] = ["", json.dumps({field: "  \n "})]  # a blank line and a blank document: both skipped
    with open(os.path.join(folder, "e.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with gzip.open(os.path.join(folder, "f.jsonl.gz"), "wt") as f:
        f.write("".join(json.dumps({field: t}) + "\n" for t in docs[15:27]))
    rows = docs[27:] + [None]  # a null row: skipped
    pq.write_table(pa.table({"id": list(range(len(rows))), field: rows}), os.path.join(folder, "g.parquet"),
                   row_group_size=5)
    with open(os.path.join(folder, "skip.csv"), "w") as f:
        f.write("not,a,document\n")
    return docs


def held(text, fraction):
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) < fraction * 2**32


def in_memory_splits(docs, tokenizer, fraction, eos=EOS):
    """The oracle: every document in memory, each side one list of ids, EOS after each document."""
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


# ----------------------------------------------------------------------------------------------
# windows

def test_windows_give_next_token_labels():
    w = data.Windows(np.arange(100, dtype=np.uint32), seq_len=10)
    assert w.n == 9  # 9 windows of 10 inputs + 1 label: the last token is only a label
    x, y = w.batch([0, 3])
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[0], torch.arange(10)) and torch.equal(y[0], torch.arange(1, 11))
    assert torch.equal(x[1], torch.arange(30, 40)) and torch.equal(y[1], torch.arange(31, 41))
    with pytest.raises(ValueError, match="10 tokens do not fill a window of 11: lower --seq-len"):
        data.Windows(np.arange(10), seq_len=10)


def test_windows_with_a_label_offset():
    w = data.Windows(np.arange(100, dtype=np.uint16), 10, offset=2)
    assert w.n == 9
    x, y = w.batch([3])
    assert x.tolist() == [list(range(30, 40))] and y.tolist() == [list(range(32, 42))]


def test_draw_is_a_function_of_seed_step_and_micro_step():
    """The training order: every window once per epoch, another permutation the next epoch, the same batches and
    depths whatever was drawn before (so --resume is exact), processes splitting each batch between them."""
    w = data.Windows(np.arange(1000, dtype=np.uint32), seq_len=10)  # 99 windows, 9 per optimiser step
    cfg = TrainConfig(batch_size=3, grad_accum=3, depths=[1, 2, 3])
    draws = {(step, micro): w.draw(cfg, step, micro) for step in range(11) for micro in range(3)}
    assert sorted(i for idx, _ in draws.values() for i in idx) == list(range(99))
    assert {depth for _, depth in draws.values()} == {1, 2, 3}
    one = TrainConfig(batch_size=3, depths=[1, 2, 3])  # a depth drawn per batch: it varies from step to step
    assert {w.draw(one, step, 0)[1] for step in range(30)} == {1, 2, 3}
    assert data.Windows(w.tokens, 10).draw(cfg, 5, 1) == draws[5, 1]  # nothing carried from earlier draws
    assert w.draw(cfg, 11, 0)[0] != draws[0, 0][0]  # the next epoch
    assert w.draw(TrainConfig(batch_size=3, grad_accum=3, depths=[1, 2, 3], seed=1), 0, 0) != draws[0, 0]
    halves = [w.draw(TrainConfig(batch_size=3, grad_accum=3), 0, 0, rank, 2)[0] for rank in (0, 1)]
    assert halves[0] == draws[0, 0][0] and halves[1] == draws[0, 1][0]  # two processes: the two micro-batches


def test_spread_picks_fixed_windows_over_the_whole_stream():
    w = data.Windows(np.arange(1000, dtype=np.uint32), seq_len=10)
    assert w.spread(4) == [0, 32, 65, 98] and w.spread(1000) == list(range(99))


# ----------------------------------------------------------------------------------------------
# documents and the split

def test_every_input_kind_is_read_in_order_and_split_by_document(model, tmp_path):
    docs = write_every_kind(str(tmp_path / "corpus"))
    tok = load_tokenizer(model)
    tr, ho = splits([str(tmp_path / "corpus")], model, 0.25, cache=str(tmp_path / "cache"))
    assert isinstance(tr, np.memmap) and tr.dtype == np.uint16  # 264 ids fit
    assert decoded(tok, tr) == [t for t in docs if not held(t, 0.25)]
    assert decoded(tok, ho) == [t for t in docs if held(t, 0.25)]
    assert len(decoded(tok, ho)) >= 5
    globbed = splits([str(tmp_path / "corpus" / "*.jsonl*"), str(tmp_path / "corpus" / "g.parquet")],
                     model, 0.25, cache=str(tmp_path / "cache"))
    assert decoded(tok, globbed[0]) + decoded(tok, globbed[1]) == sorted(
        docs[4:], key=lambda t: held(t, 0.25))  # a stable sort: each side in reading order


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
    docs = list(data.documents(data.find_files([corpus])))
    assert markers[1] == {t[:6] for t in docs if held(t, 0.2)}
    moved = shutil.copytree(corpus, tmp_path / "elsewhere")  # the same split wherever the corpus lies
    assert np.array_equal(splits([str(moved)], model, 0.2, cache=str(tmp_path / "c"))[1], ho)


def test_find_files_reads_known_kinds_from_folders_and_the_default_corpus(tmp_path):
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.md").write_text("a")
    (tmp_path / "notes.csv").write_text("c")
    assert data.find_files([str(tmp_path)]) == [str(tmp_path / "b.txt"), str(tmp_path / "sub" / "a.md")]
    with pytest.raises(FileNotFoundError, match="matches no files"):
        data.find_files([str(tmp_path / "nothing*.txt")])
    if os.path.isdir("/usr/share/doc/python3.11/html/_sources"):  # the default: the Python docs
        default = data.find_files([])
        assert len(default) > 100 and all(f.endswith(".rst.txt") for f in default)
    else:
        with pytest.raises(FileNotFoundError, match="python3.11/html/_sources/"):
            data.find_files([])


# ----------------------------------------------------------------------------------------------
# the token cache

def test_data_py_prepares_then_finds_the_cache(model, corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "CACHE", str(tmp_path))
    argv = ["--model", model, "--data", corpus, "--held-out", "0.2"]
    data.main(argv)
    first = capsys.readouterr()
    folder = only_folder(str(tmp_path))
    m = json.load(open(os.path.join(folder, "manifest.json")))
    assert "tokenised 30 documents" in first.err and sum(m["documents"]) == 30 and m["dtype"] == "uint16"
    for side in data.SIDES:
        (line,) = [line for line in first.out.splitlines() if line.startswith(side + " ")]
        tokens = os.path.getsize(os.path.join(folder, f"{side}.bin")) // 2  # uint16
        assert f"{tokens:,} tokens" in line and line.endswith(os.path.join(folder, f"{side}.bin"))
    data.main(argv)
    again = capsys.readouterr()
    assert again.out == first.out and "tokenised" not in again.err


def test_the_cache_key_is_the_tokenizers_content(model, corpus, tmp_path):
    """Two tokenizer.json files of the same size (two ids swapped) must not share token files."""
    other = str(tmp_path / "other")
    shutil.copytree(model, other)
    file = os.path.join(other, "tokenizer.json")
    text = open(file).read()
    assert '"a": 100,' in text and '"o": 114,' in text
    open(file, "w").write(text.replace('"a": 100,', '"a": 114,').replace('"o": 114,', '"o": 100,'))
    assert os.path.getsize(file) == os.path.getsize(os.path.join(model, "tokenizer.json"))
    cache = str(tmp_path / "cache")
    docs = list(data.documents(data.find_files([corpus])))
    for m in (model, other):
        got = splits([corpus], m, 0.2, cache=cache)
        for g, want in zip(got, in_memory_splits(docs, load_tokenizer(m), 0.2)):
            assert np.array_equal(g, want)
    assert len(os.listdir(os.path.join(cache, "tokens"))) == 2
    assert not np.array_equal(*[splits([corpus], m, 0.2, cache=cache)[0] for m in (model, other)])


def test_the_cache_key_is_the_files_the_split_and_the_field(model, corpus, tmp_path):
    cache = str(tmp_path / "cache")
    splits([corpus], model, 0.2, cache=cache)
    splits([corpus], model, 0.2, cache=cache)
    assert len(os.listdir(os.path.join(cache, "tokens"))) == 1  # found again
    splits([corpus], model, 0.3, cache=cache)
    splits([corpus], model, 0.2, "body", cache=cache)  # .txt files have no field, but the key does not know
    edited = shutil.copytree(corpus, tmp_path / "edited")
    with open(edited / "doc000.txt", "a") as f:
        f.write("one more line\n")
    tr, ho = splits([str(edited)], model, 0.2, cache=cache)
    assert len(os.listdir(os.path.join(cache, "tokens"))) == 4  # 0.2, 0.3, "body", the edited corpus
    assert "one more line" in "".join(decoded(load_tokenizer(model), tr) + decoded(load_tokenizer(model), ho))


def test_a_killed_preparation_is_prepared_again(model, corpus, tmp_path, monkeypatch, capsys):
    """A preparation killed after its token files were written but before the manifest (written last) leaves no
    manifest: the next run prepares again instead of reading what it left."""
    cache = str(tmp_path / "cache")
    replace = os.replace

    def killed_at_the_manifest(a, b):
        if b.endswith("manifest.json"):
            raise KeyboardInterrupt  # as a kill at this point would leave it
        replace(a, b)
    monkeypatch.setattr(os, "replace", killed_at_the_manifest)
    with pytest.raises(KeyboardInterrupt):
        splits([corpus], model, 0.2, cache=cache)
    monkeypatch.setattr(os, "replace", replace)
    folder = only_folder(cache)
    assert "manifest.json" not in os.listdir(folder) and os.path.getsize(os.path.join(folder, "train.bin")) > 0
    with open(os.path.join(folder, "train.bin"), "r+b") as f:  # and say the kill came mid-write
        f.truncate(10)
    capsys.readouterr()
    got = splits([corpus], model, 0.2, cache=cache)
    assert "tokenised 30 documents" in capsys.readouterr().err  # prepared again, not read
    docs = list(data.documents(data.find_files([corpus])))
    for g, want in zip(got, in_memory_splits(docs, load_tokenizer(model), 0.2)):
        assert np.array_equal(g, want)


# ----------------------------------------------------------------------------------------------
# text that is not there

def test_jsonl_lines_without_text_and_parquet_without_the_column_are_one_error_line(model, corpus, tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    bad = tmp_path / "d.jsonl"
    for line in ('{"body": "x"}', '{"text": 3}', '{"text": null}'):
        bad.write_text(json.dumps({"text": "one"}) + "\n\n" + line + "\n")
        error = cli_error(data.main, ["--model", model, "--data", corpus, str(bad)])
        assert error == f"error: {bad} line 3: no 'text' text; name the field with --text-field"
    pq.write_table(pa.table({"content": ["a document"]}), tmp_path / "d.parquet")
    error = cli_error(data.main, ["--model", model, "--data", str(tmp_path / "d.parquet")])
    assert error == f"error: {tmp_path / 'd.parquet'} has no column 'text': name the text column with --text-field"
    (tmp_path / "z.txt").write_bytes(b"PK\x03\x04\x14\x00\x00\x00 a zip file")
    error = cli_error(data.main, ["--model", model, "--data", corpus, str(tmp_path / "z.txt")])
    assert error.startswith(f"error: {tmp_path / 'z.txt'} is not text") and "\n" not in error
