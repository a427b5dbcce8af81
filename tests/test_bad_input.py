"""Bad and odd input, class by class: nothing that is not a run is ever written, a resumed run is the
same run, a run works from anywhere, settings that can only fail are refused before anything loads,
damaged model files and odd data sources get one line that names them, and the CLIs keep within the
model's limits. Every refusal is the project's error on bad input (ValueError, OSError), one line."""
import gzip
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import data
import eval as evaluation
import generate
import run
import train
from conftest import make_checkpoint, make_corpus, ouroboros, splits, train_args
from load_qwen import CheckpointError, load_config, load_model, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def private_cache(setup, monkeypatch):
    monkeypatch.setattr(data, "CACHE", setup[2])


def snapshot(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


def edited(src, dst, **changes):
    shutil.copytree(src, dst)
    raw = json.load(open(os.path.join(dst, "config.json")))
    json.dump(raw | changes, open(os.path.join(dst, "config.json"), "w"))
    return str(dst)


def put(name, fn):
    """An edit of a state dict: tensor `name` replaced by fn(it)."""
    return lambda state: state.update({name: fn(state[name])})


def tensors_edited(src, dst, edit):
    shutil.copytree(src, dst)
    state = load_file(os.path.join(dst, "model.safetensors"))
    edit(state)
    save_file(state, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


# ----------------------------------------------------------------------------------------------
# 1. nothing that is not a run is written

def test_train_writes_only_into_a_new_or_empty_folder_or_a_run_of_its_own(setup, tmp_path):
    model_copy = shutil.copytree(setup[0], tmp_path / "model")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model_type": "llama"}')
    results = tmp_path / "results"
    results.mkdir()
    (results / "results.json").write_text("{}")
    for folder in (model_copy, notes, foreign, results):
        before = snapshot(folder)
        with pytest.raises(ValueError, match=f"--out {folder} holds .*not a run of train.py: name a new or empty"):
            train.main(train_args(setup, str(folder)))
        assert snapshot(folder) == before
    (tmp_path / "empty").mkdir()
    train.main(train_args(setup, str(tmp_path / "empty"), "--steps", "1", "--warmup", "0"))
    assert sorted(os.listdir(tmp_path / "empty")) == ["checkpoint.safetensors", "config.json", "lock"]
    os.remove(tmp_path / "empty" / "checkpoint.safetensors")  # a run killed before its first save: started again
    train.main(train_args(setup, str(tmp_path / "empty"), "--steps", "1", "--warmup", "0"))


# ----------------------------------------------------------------------------------------------
# 2. a resumed run is the same run

@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    """A run of 3 steps at rank 8, depths 1,2,3, a non-default lr: the run each resume below starts from."""
    out = str(tmp_path_factory.mktemp("resume") / "run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "CACHE", setup[2])
        train.main(train_args(setup, out, "--steps", "3", "--lr", "0.01"))
    return out


@pytest.mark.parametrize("flags,name", [
    (["--rank", "4"], "rank"), (["--prelude", "0"], "prelude"), (["--recurrent", "3"], "recurrent"),
    (["--seed", "1"], "seed"), (["--lr", "0.02"], "lr"), (["--seq-len", "16"], "seq_len"),
    (["--variant", "static"], "variant"), (["--label-offset", "2"], "label_offset"), (["--depths", "1,3"], "depths"),
    (["--no-gate"], "gate"), (["--batch-size", "2"], "batch_size"), (["--held-out", "0.2"], "held_out"),
])
def test_resume_refuses_a_change_to_what_the_run_computes(setup, trained, flags, name):
    before = snapshot(trained)
    with pytest.raises(ValueError, match=f"--resume: .* was trained with {name} .*only more --steps and --out, .*"
                                         "may change"):
        train.main(train_args(setup, trained, "--resume", "--steps", "4", *flags))
    assert snapshot(trained) == before


def test_resume_refuses_another_model_or_corpus_of_the_same_shape(setup, trained, tmp_path):
    other = tensors_edited(setup[0], tmp_path / "other", put("model.norm.weight", lambda t: 2 * t))
    corpus = make_corpus(str(tmp_path / "corpus"), seed=5)
    flags = ["--out", trained, "--resume", "--steps", "4"]
    with pytest.raises(ValueError, match="was trained with model '.*model', not '.*other'"):
        train.main(["--model", other, *flags])
    with pytest.raises(ValueError, match="was trained with data"):
        train.main(["--model", setup[0], "--data", corpus, *flags])


def test_resume_takes_the_runs_settings_and_only_more_steps(setup, trained, capsys):
    with pytest.raises(ValueError, match="--resume --steps 2: .* holds step 3 already; give --steps above 3"):
        train.main(["--out", trained, "--resume", "--steps", "2"])
    capsys.readouterr()
    train.main(["--out", trained, "--resume", "--steps", "4", "--log-interval", "1"])  # nothing else given
    log = capsys.readouterr().out
    assert "resumed" in log and "step     4/4" in log and "trained 1 steps" in log
    cfg = run.read_settings(trained)
    assert (cfg.steps, cfg.lr, cfg.ouroboros.rank, cfg.depths, cfg.log_interval) == (4, 0.01, 8, (1, 2, 3), 1)


SLOW = """import sys, time
sys.path.insert(0, sys.argv[1])
import data, run, train
data.CACHE = sys.argv[2]
lr_at = train.lr_at
train.lr_at = lambda step, cfg: print("stepping", flush=True) or time.sleep(30) or lr_at(step, cfg)
run.cli(train.main, sys.argv[3:])
"""


def test_a_second_train_py_on_the_same_out_is_refused_while_the_first_runs(setup, tmp_path):
    out = str(tmp_path / "run")
    first = subprocess.Popen([sys.executable, "-c", SLOW, ROOT, setup[2], *train_args(setup, out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stdout:
            if line.startswith("stepping"):
                break
        with pytest.raises(ValueError, match=f"another train.py is writing {out}: wait for it to end"):
            train.main(train_args(setup, out))
    finally:
        first.kill()
        first.communicate()
    train.main(train_args(setup, out, "--steps", "1", "--warmup", "0"))  # its lock went with it


# ----------------------------------------------------------------------------------------------
# 3. a run works from anywhere

def test_a_run_made_with_relative_paths_works_from_any_directory(setup, tmp_path, monkeypatch, capsys):
    here = tmp_path / "here"
    shutil.copytree(setup[0], here / "m")
    shutil.copytree(setup[1], here / "c")
    monkeypatch.chdir(here)
    train.main(["--model", "m", "--data", "c", "--out", "r", "--prelude", "1", "--recurrent", "2", "--coda", "1",
                "--seq-len", "32", "--steps", "1", "--warmup", "0", "--rank", "8", "--no-final-eval"])
    cfg = run.read_settings("r")
    assert cfg.model == str(here / "m") and cfg.data == (str(here / "c"),) and cfg.out == str(here / "r")
    monkeypatch.chdir(tmp_path)
    evaluation.main(["--run", str(here / "r"), "--depths", "1", "--windows", "2"])
    generate.main(["--run", str(here / "r"), "--prompt", "the cat", "--max-new-tokens", "2"])
    assert "tok/s" in capsys.readouterr().err
    shutil.move(here / "m", here / "moved")
    with pytest.raises(CheckpointError, match=f"names the model folder {here / 'm'}, which is not there .*put it "
                                              "back, or set \"model\""):
        generate.main(["--run", str(here / "r"), "--prompt", "x"])


# ----------------------------------------------------------------------------------------------
# 4. settings that can only fail, refused before anything loads

def test_every_numeric_setting_declares_its_range():
    numeric = [n for n, f in run.SETTINGS.items() if f.metadata.get("type", type(f.default)) in (int, float)]
    assert len(numeric) > 20
    assert not [n for n in numeric if not {"low", "gt", "high", "lt", "choices"} & set(run.SETTINGS[n].metadata)]


@pytest.mark.parametrize("flags,message", [
    (["--clip", "-1"], "--clip -1.0 must be above 0"), (["--lr", "inf"], "--lr inf must be finite and above 0"),
    (["--weight-decay", "-1"], "--weight-decay -1.0 must be at least 0"), (["--beta2", "1.5"], "--beta2 1.5 must be"),
    (["--min-lr-ratio", "2"], "--min-lr-ratio 2.0 must be in 0..1"), (["--alpha", "0"], "--alpha 0.0 must be above 0"),
    (["--seed", "-1"], "--seed -1 must be at least 0"), (["--style", "0"], "--style 0 must be at least 1"),
    (["--max-steps", "0"], "--max-steps 0 must be in 1..4096"), (["--coda", "-1"], "--coda -1 must be at least 0"),
    (["--steps", "x"], "argument --steps: invalid int value: 'x'"),
    (["--rank", "1000"], "--rank 1000 must be at most 32"),
    (["--prelude", "4"], "prelude 4 \\+ coda 1 must leave room"),
])
def test_settings_that_can_only_fail_are_refused_before_anything_loads(setup, tmp_path, monkeypatch, flags, message):
    monkeypatch.setattr(train, "load_splits", lambda *a, **k: pytest.fail("the data was read"))
    with pytest.raises(ValueError, match=message):
        train.main(train_args(setup, str(tmp_path / "run"), *flags))
    assert not (tmp_path / "run" / "config.json").exists()


# ----------------------------------------------------------------------------------------------
# 5. model files wrong in ways a shape check misses

@pytest.mark.parametrize("changes,message", [
    ({"eos_token_id": 264}, "eos_token_id = 264 is no token id of the vocabulary \\(0..263\\)"),
    ({"eos_token_id": []}, "eos_token_id = \\[\\] is no token id"), ({"bos_token_id": -1}, "bos_token_id = -1"),
    ({"rms_norm_eps": 0}, "rms_norm_eps = 0, expected a positive number"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps = -1e-06, expected a positive"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 0.0}}, "rope_theta = 0.0, expected a positive"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1e4}}, "rope_theta = -10000.0"),
])
def test_config_values_out_of_range_are_named(setup, tmp_path, changes, message):
    with pytest.raises(CheckpointError, match=f"config.json: {message}.*restore it from the original model"):
        load_config(edited(setup[0], tmp_path / "m", **changes))


def test_weights_that_are_not_finite_or_not_floats_or_misplaced_are_named(setup, tmp_path):
    nan = tensors_edited(setup[0], tmp_path / "nan", put("model.layers.0.mlp.up_proj.weight", lambda t: t * math.nan))
    with pytest.raises(CheckpointError, match="layers.0.mlp.up_proj.weight hold.* NaN or infinite values"):
        load_model(nan)
    inf = tensors_edited(setup[0], tmp_path / "inf", put("model.layers.3.mlp.up_proj.weight", lambda t: t / 0))
    model = ouroboros(inf, prelude=1, recurrent=2, coda=1, variant="none")  # layer 3 is removed: never loaded
    assert torch.isfinite(model(torch.tensor([[3, 4]]), depth=1)).all()
    with pytest.raises(CheckpointError, match="layers.3.mlp.up_proj.weight holds NaN or infinite values"):
        ouroboros(inf, prelude=1, recurrent=2, coda=1, rank=8)  # its SVD bases read it
    ints = tensors_edited(setup[0], tmp_path / "int", put("model.norm.weight", lambda t: t.long()))
    with pytest.raises(CheckpointError, match="not floating point: model.norm.weight: I64"):
        load_model(ints)
    sharded = tmp_path / "sharded"
    shutil.copytree(setup[0], sharded)
    state = load_file(sharded / "model.safetensors")
    names = sorted(state)
    save_file({k: state[k] for k in names[:5]}, sharded / "a.safetensors")
    save_file({k: state[k] for k in names[5:]}, sharded / "b.safetensors")
    os.remove(sharded / "model.safetensors")
    where = {k: "a.safetensors" for k in names[:5]} | {k: "b.safetensors" for k in names[5:]}
    where[names[0]] = "b.safetensors"  # it is in a.safetensors
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": where}))
    with pytest.raises(CheckpointError, match=f"index.json puts {names[0]} in shard\\(s\\) that do not hold it"):
        load_model(str(sharded))


# ----------------------------------------------------------------------------------------------
# 6. data sources

def test_a_path_that_exists_is_taken_literally(setup, tmp_path):
    (tmp_path / "notes[1].txt").write_text("the literal file " * 30)
    (tmp_path / "notes1.txt").write_text("the file a glob would read " * 30)
    assert data.find_files([str(tmp_path / "notes[1].txt")]) == [str(tmp_path / "notes[1].txt")]
    assert data.find_files([str(tmp_path / "notes[12].txt")]) == [str(tmp_path / "notes1.txt")]  # no such file: a glob


def test_a_symlink_loop_is_walked_once_and_special_files_are_skipped_or_refused(setup, tmp_path):
    corpus = make_corpus(str(tmp_path / "corpus"), n_docs=10)
    os.symlink(corpus, os.path.join(corpus, "again"))
    os.mkfifo(os.path.join(corpus, "pipe.txt"))  # opened, it would hang
    assert len(data.find_files([corpus])) == 10
    tr, ho = splits([corpus], setup[0], 0.2, cache=str(tmp_path / "cache"))
    assert np.sum(tr == 2) + np.sum(ho == 2) == 10  # one EOS per document
    for special in (os.path.join(corpus, "pipe.txt"), "/dev/null"):
        with pytest.raises(ValueError, match=f"{special}: not a file --data reads; give regular"):
            data.find_files([special])


def test_truncated_gzip_and_pathological_json_are_one_line(setup, tmp_path):
    blob = gzip.compress("".join(json.dumps({"text": "the cat sat " * 40}) + "\n" for _ in range(200)).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "deep.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    for name, message in (("cut.jsonl.gz", "cannot read .*cut.jsonl.gz: Compressed file ended"),
                          ("deep.jsonl", "deep.jsonl line 2: needs a JSON object .*RecursionError")):
        with pytest.raises(ValueError, match=message):
            list(data.documents([str(tmp_path / name)]))


# ----------------------------------------------------------------------------------------------
# 7. generate.py and eval.py within the model's limits

def test_generate_clips_to_the_context_and_refuses_nonsense(setup, monkeypatch, capsys):
    sized = []
    real = generate.decoder
    monkeypatch.setattr(generate, "decoder", lambda model, a, max_len, exit=None: sized.append(max_len) or real(
        model, a, max_len, exit))
    generate.main(["--model", setup[0], "--prompt", "the cat", "--max-new-tokens", "1000000000", "--temperature", "0"])
    context, prompt = load_config(setup[0]).max_position_embeddings, len(load_tokenizer(setup[0]).encode("the cat").ids)
    assert sized == [context]
    assert f"clipped to {context - prompt}: the model's context is {context}" in capsys.readouterr().err
    with pytest.raises(ValueError, match=f"--prompt is .* tokens, the model's context {context} positions"):
        generate.main(["--model", setup[0], "--prompt", "x" * (context + 5)])
    for flags in (["--temperature", "nan"], ["--temperature", "inf"], ["--top-p", "nan"], ["--top-k", "-1"]):
        with pytest.raises(ValueError, match="give --max-new-tokens >= 1, a finite --temperature >= 0"):
            generate.main(["--model", setup[0], "--prompt", "x", *flags])
    with pytest.raises(ValueError, match="--exit latent-diff nan: give a criterion"):
        generate.main(["--run", "R", "--prompt", "x", "--exit", "latent-diff", "nan"])
    for device in ("xpu", "vulkan", "meta:0x"):
        with pytest.raises(ValueError, match=f"--device {device}"):
            generate.main(["--model", setup[0], "--prompt", "x", "--device", device])


def test_eval_says_how_many_windows_it_used(setup, tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(train_args(setup, out, "--steps", "1", "--warmup", "0"))
    capsys.readouterr()
    evaluation.main(["--run", out, "--depths", "1", "--windows", "100000", "--json"])
    result = json.loads(capsys.readouterr().out)
    n = result["windows"]
    assert 0 < n["held_out"] < n["train"] < 100000 and len(result["runs"][0]["held_out"]["t+1"]["1"]) == n["held_out"]
    md = open(os.path.join(out, "results.md")).read()
    assert "100000" not in md and f"{n['train']} and {n['held_out']} windows" in md


# ----------------------------------------------------------------------------------------------
# 8. the one-line promise, as programs

def test_damaged_weights_and_bad_flags_print_one_line(setup, tmp_path):
    untied = str(tmp_path / "untied")
    make_checkpoint(untied, arch="llama", layers=5, vocab=264, eos_token_id=2)
    shutil.copy(os.path.join(setup[0], "tokenizer.json"), untied)
    cases = [tensors_edited(setup[0], tmp_path / "shape", put("model.layers.1.mlp.up_proj.weight", lambda t: t[:-1])),
             tensors_edited(setup[0], tmp_path / "extra", lambda s: s.update({"model.extra": torch.zeros(3)})),
             tensors_edited(untied, tmp_path / "nohead", lambda s: s.pop("lm_head.weight"))]
    for argv, message in [(["generate.py", "--model", cases[0], "--prompt", "x"], "wrong shape"),
                          (["generate.py", "--model", cases[1], "--prompt", "x"], "unexpected: model.extra"),
                          (["generate.py", "--model", cases[2], "--prompt", "x"], "missing: lm_head.weight"),
                          (["train.py", "--steps", "x"], "argument --steps: invalid int value: 'x' (see --help)")]:
        done = subprocess.run([sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 1 and done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
        assert message in done.stderr
