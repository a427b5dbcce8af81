"""The common mistakes: each answered by train.py, eval.py, generate.py and data.py with one `error:` line that names
it and a non-zero exit status (argparse's own message and status 2 for a value it cannot parse or an unknown choice),
before anything is written into --out. And config.json features this decoder would compute differently, refused."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import data
import eval as evaluation
import generate
import memory
import train
from conftest import ROOT, WITH_CACHE, cli_error, make_checkpoint, train_args
from load_qwen import load_config

PROGRAMS = {"train.py": train.main, "eval.py": evaluation.main, "generate.py": generate.main, "data.py": data.main}


@pytest.fixture(scope="module")
def bad(setup, tmp_path_factory):
    """Folders and files that are each one mistake, and a run of a single step to evaluate and sample."""
    tmp = tmp_path_factory.mktemp("bad")
    no_tokenizer = shutil.copytree(setup[0], tmp / "no-tokenizer")
    os.remove(no_tokenizer / "tokenizer.json")
    (tmp / "binary.txt").write_bytes(b"PK\x03\x04\x14\x00\x00\x00 a zip file")
    (tmp / "no-text.jsonl").write_text('{"text": "one"}\n{"body": "two"}\n')
    if importlib.util.find_spec("pyarrow"):  # optional: parquet input only
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"content": ["a document"]}), tmp / "no-text.parquet")
    (tmp / "notes.txt").write_text("keep me")
    run = str(tmp / "run")
    train.main(train_args(setup, run, "--steps", "1"))
    return {"tmp": tmp, "no tokenizer": str(no_tokenizer), "binary": str(tmp / "binary.txt"), "run": run,
            "no text jsonl": str(tmp / "no-text.jsonl"), "no text parquet": str(tmp / "no-text.parquet"),
            "file": str(tmp / "notes.txt")}


def edited_run(bad, name, **changes):
    """A copy of the run whose config.json says otherwise."""
    folder = bad["tmp"] / f"run-{name}"
    if not folder.exists():
        shutil.copytree(bad["run"], folder)
        raw = json.load(open(folder / "config.json"))
        json.dump(raw | changes, open(folder / "config.json", "w"))
    return str(folder)


def assert_one_error_line(main, argv, message):
    line = cli_error(main, argv)
    assert line.startswith("error: ") and "\n" not in line and message in line, line


# ----------------------------------------------------------------------------------------------
# as programs: the exit status and the one line on stderr

def test_each_program_answers_a_mistake_with_one_line_and_exit_status_1(setup, bad, tmp_path):
    cases = {"train.py": (train_args(setup, bad["file"]), "is not a run of train.py, nor a new or empty folder"),
             "eval.py": (["--run", str(tmp_path / "nowhere"), "--device", "cpu"], "nowhere/config.json"),
             "generate.py": (["--model", bad["no tokenizer"], "--prompt", "x", "--device", "cpu"],
                             "tokenizer.json not found"),
             "data.py": (["--model", setup[0], "--data", bad["binary"]], "binary.txt is not text")}
    code = WITH_CACHE.format(root=ROOT)  # the token cache: this test's own folder, not the repository's
    procs = {p: subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "cache"), os.path.join(ROOT, p), *argv],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=dict(os.environ, OMP_NUM_THREADS="1")) for p, (argv, _) in cases.items()}
    for program, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1 and err.count("\n") == 1 and err.startswith("error: "), (program, err)
        assert cases[program][1] in err and out == "", (program, err)
    assert open(bad["file"]).read() == "keep me"


# ----------------------------------------------------------------------------------------------
# each mistake, in each program that takes it

def test_a_missing_model_folder_config_json_or_tokenizer_json(setup, bad, tmp_path):
    for i, folder in enumerate((str(tmp_path / "nowhere"), setup[1])):  # no folder; a folder without config.json
        message = f"{folder}/config.json not found: --model takes an HF-format folder"
        assert_one_error_line(train.main, train_args(setup, str(tmp_path / "out"), "--model", folder), message)
        assert_one_error_line(generate.main, ["--model", folder, "--prompt", "x", "--device", "cpu"], message)
        assert_one_error_line(data.main, ["--model", folder, "--data", setup[1]], message)
        assert_one_error_line(evaluation.main, ["--run", edited_run(bad, f"moved{i}", model=folder),
                                                "--device", "cpu"], message)
    tokenizer = os.path.join(bad["no tokenizer"], "tokenizer.json")
    assert_one_error_line(train.main, train_args(setup, str(tmp_path / "out"), "--model", bad["no tokenizer"]),
                          tokenizer)
    assert_one_error_line(generate.main, ["--model", bad["no tokenizer"], "--prompt", "x", "--device", "cpu"],
                          f"{tokenizer} not found")
    assert_one_error_line(data.main, ["--model", bad["no tokenizer"], "--data", setup[1]], tokenizer)
    assert_one_error_line(evaluation.main, ["--run", edited_run(bad, "no-tokenizer", model=bad["no tokenizer"]),
                                            "--device", "cpu"], tokenizer)
    assert_one_error_line(evaluation.main, ["--run", str(tmp_path / "nowhere")], "nowhere/config.json")
    assert not os.path.exists(tmp_path / "out")


def test_a_split_that_does_not_fit_the_model(setup, bad, tmp_path):
    message = "--prelude 4 --recurrent 4 --coda 1 does not fit 5 layers"
    assert_one_error_line(train.main, train_args(setup, str(tmp_path / "out"), "--prelude", "4", "--recurrent", "4"),
                          message)
    run = edited_run(bad, "split", prelude=4, recurrent=4)
    assert_one_error_line(evaluation.main, ["--run", run, "--device", "cpu", "--out", str(tmp_path / "res")], message)
    assert_one_error_line(generate.main, ["--run", run, "--prompt", "x", "--device", "cpu"], message)
    assert_one_error_line(memory.main, ["--model", str(setup[0]), "--prelude", "4", "--recurrent", "4", "--coda", "1"],
                          message)
    assert not os.path.exists(tmp_path / "out")


def test_a_rank_wider_than_a_projection(setup, tmp_path):
    """k_proj of the tiny model is 32 x 64 (2 KV heads of 16): rank 40 fits q_proj, not it."""
    assert_one_error_line(train.main, train_args(setup, str(tmp_path / "out"), "--rank", "40"),
                          "rank 40 must be in 1..32 for a (32, 64) weight")
    assert not os.path.exists(tmp_path / "out")


def test_a_seq_len_beyond_the_context(setup, tmp_path):
    assert_one_error_line(train.main, train_args(setup, str(tmp_path / "out"), "--seq-len", "4096"),
                          "--seq-len 4096 exceeds the model's context (2048)")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("kind,message", [("binary", "binary.txt is not text: give .txt .md .rst .py .jsonl(.gz) or "
                                                     ".parquet files"),
                                          ("no text jsonl", "no-text.jsonl line 2: no 'text' text; name the field "
                                                            "with --text-field"),
                                          ("no text parquet", "no-text.parquet has no column 'text': name the text "
                                                              "column with --text-field")])
def test_a_corpus_file_that_is_binary_or_lacks_the_text_field(setup, bad, tmp_path, kind, message):
    if kind.endswith("parquet"):
        pytest.importorskip("pyarrow")
    assert_one_error_line(train.main, train_args(setup, str(tmp_path / "out"), "--data", setup[1], bad[kind]), message)
    assert_one_error_line(data.main, ["--model", setup[0], "--data", bad[kind]], message)
    assert not os.path.exists(tmp_path / "out")


def test_data_that_matches_no_files(setup, tmp_path):
    message = f"--data '{tmp_path}/nothing*.txt' matches no files"
    assert_one_error_line(train.main, train_args(setup, str(tmp_path / "out"), "--data", f"{tmp_path}/nothing*.txt"),
                          message)
    assert_one_error_line(data.main, ["--model", setup[0], "--data", f"{tmp_path}/nothing*.txt"], message)


def test_out_naming_an_existing_file(setup, bad):
    assert_one_error_line(train.main, train_args(setup, bad["file"]), "is not a run of train.py")
    assert_one_error_line(evaluation.main, ["--run", bad["run"], "--depths", "1", "--windows", "2", "--device", "cpu",
                                            "--out", bad["file"]], bad["file"])
    assert open(bad["file"]).read() == "keep me"


@pytest.mark.parametrize("flags,message", [
    (["--steps", "0"], "must be at least 1"), (["--batch-size", "0"], "must be at least 1"),
    (["--rank", "0"], "must be at least 1"), (["--label-offset", "0"], "must be at least 1"),
    (["--held-out", "1.5"], "--held-out must lie between 0 and 1"), (["--held-out", "0"], "--held-out must lie"),
    (["--depths", "65"], "--depths: each in 1..64"), (["--depths", "0,2"], "--depths: each in 1..64"),
    (["--warmup", "4"], "--warmup 4 must be below --steps 4"), (["--lr", "0"], "--lr and --clip must be positive"),
    (["--clip", "-1"], "--lr and --clip must be positive"), (["--lr", "nan"], "--lr and --clip must be positive"),
    (["--save-interval", "0"], "must be at least 1"), (["--log-interval", "0"], "must be at least 1"),
    (["--eval-interval", "0"], "must be at least 1"), (["--eval-windows", "0"], "must be at least 1"),
])
def test_train_refuses_a_setting_out_of_its_range(setup, tmp_path, flags, message):
    """In 7cb7a20, --save-interval, --log-interval, --eval-interval and --eval-windows 0 passed the checks and ended
    in a ZeroDivisionError traceback in the first step, after config.json was written."""
    assert_one_error_line(train.main, train_args(setup, str(tmp_path / "out"), *flags), message)
    assert not os.path.exists(tmp_path / "out" / "config.json")


def test_data_and_generate_and_eval_refuse_a_setting_out_of_its_range(setup, bad, tmp_path):
    assert_one_error_line(data.main, ["--model", setup[0], "--data", setup[1], "--held-out", "1"], "--held-out")
    sample = ["--run", bad["run"], "--device", "cpu", "--prompt"]
    assert_one_error_line(generate.main, sample + [""], "--prompt is 0 tokens")
    assert_one_error_line(generate.main, sample + ["x", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1")
    assert_one_error_line(generate.main, sample + ["x", "--temperature", "nan"], "--temperature and --top-k must not")
    assert_one_error_line(generate.main, sample + ["x", "--top-p", "0"], "--top-p must lie in (0, 1]")
    assert_one_error_line(generate.main, sample + ["x", "--depth", "0"], "depth 0 must be in 1..64")
    assert_one_error_line(generate.main, sample + ["x", "--depth", "65"], "depth 65 must be in 1..64")
    scored = ["--run", bad["run"], "--device", "cpu", "--out", str(tmp_path)]
    assert_one_error_line(evaluation.main, scored + ["--depths", "0"], "depth 0 must be in 1..64")
    assert_one_error_line(evaluation.main, scored + ["--depths", "1,x"], "invalid literal for int()")
    assert_one_error_line(evaluation.main, scored + ["--windows", "0"], "error")


@pytest.mark.parametrize("program,flags,message", [
    ("train.py", ["--variant", "dynamic"], "argument --variant: invalid choice: 'dynamic'"),
    ("train.py", ["--pool", "max"], "argument --pool: invalid choice: 'max'"),
    ("train.py", ["--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
    ("train.py", ["--readout", "all"], "argument --readout: invalid choice: 'all'"),
    ("train.py", ["--steps", "x"], "argument --steps: invalid int value: 'x'"),
    ("train.py", ["--unknown"], "unrecognized arguments: --unknown"),
    ("data.py", ["--held-out", "x"], "argument --held-out: invalid float value: 'x'"),
    ("eval.py", ["--run", "RUN", "--windows", "x"], "argument --windows: invalid int value: 'x'"),
    ("eval.py", ["--run", "RUN", "--depths", "1", "--windows", "1", "--precision", "fp16"], "--precision"),
    ("generate.py", ["--run", "RUN", "--prompt", "x", "--depth", "x"], "argument --depth: invalid int value: 'x'"),
    ("generate.py", ["--run", "RUN", "--prompt", "x", "--max-new-tokens", "2", "--precision", "fp16"], "--precision"),
])
def test_a_value_argparse_cannot_take_or_an_unknown_choice_is_exit_status_2(setup, bad, program, flags, message,
                                                                             capsys):
    """--precision is one of auto, fp32, bf16 in every program: in 7cb7a20 eval.py and generate.py took any text,
    and one that was not bf16 or auto (fp16, a typo) ran in fp32 without a word (pytest: DID NOT RAISE)."""
    flags = [bad["run"] if f == "RUN" else f for f in flags] + ["--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        train.cli(PROGRAMS[program], flags + (["--model", setup[0]] if program == "data.py" else []))
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err, err


# ----------------------------------------------------------------------------------------------
# config.json features this decoder would compute differently

@pytest.fixture(scope="module")
def qwen_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen") / "m"
    make_checkpoint(str(path), arch="qwen2")
    return json.load(open(path / "config.json"))


def config_folder(tmp_path, raw, **changes):
    folder = tmp_path / "m"
    folder.mkdir(exist_ok=True)
    json.dump(raw | changes, open(folder / "config.json", "w"))
    return str(folder)


@pytest.mark.parametrize("changes,refused", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}, "RoPE scaling"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}, "RoPE scaling"),
    ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "RoPE scaling"),  # before v5
    ({"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2}, "sliding-window attention in use"),
    ({"model_type": "mistral"}, "model_type 'mistral' (only qwen2 and llama)"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_unsupported_config_features_are_refused_in_one_line(qwen_config, tmp_path, changes, refused):
    folder = config_folder(tmp_path, qwen_config, **changes)
    with pytest.raises(ValueError, match=f"config.json: .*{re.escape(refused)}.*: not supported$"):
        load_config(folder)


def test_several_unsupported_features_are_named_in_the_one_line(qwen_config, tmp_path):
    folder = config_folder(tmp_path, qwen_config, model_type="mistral", mlp_bias=True, hidden_act="gelu")
    assert_one_error_line(generate.main, ["--model", folder, "--prompt", "x", "--device", "cpu"],
                          "model_type 'mistral' (only qwen2 and llama), hidden_act 'gelu', mlp_bias: not supported")


def test_a_sliding_window_that_no_layer_uses_is_accepted(qwen_config, tmp_path):
    for changes in ({"use_sliding_window": False, "sliding_window": 16, "max_window_layers": 2},
                    {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 4},  # all 4 layers full
                    {"use_sliding_window": True, "sliding_window": 32768}):  # a window as long as the context
        assert load_config(config_folder(tmp_path, qwen_config, **changes)).num_hidden_layers == 4
    assert load_config(config_folder(tmp_path, qwen_config, rope_parameters={"rope_type": "default",
                                                                            "rope_theta": 5e5})).rope_theta == 5e5
