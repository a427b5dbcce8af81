"""Bad checkpoints fail with one clear error that names the file and the problem; every CLI turns
bad input into that one line."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_checkpoint, make_model_folder
from load_qwen import CheckpointError, load_config, load_model, load_tokenizer
from run import cli


def edit_config(path, **changes):
    file = os.path.join(path, "config.json")
    raw = json.load(open(file))
    raw.update(changes)
    json.dump(raw, open(file, "w"))


def test_missing_shard(tmp_path):
    path = str(tmp_path / "m")
    make_checkpoint(path, max_shard_size="40KB")
    shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[1]
    os.remove(os.path.join(path, shard))
    with pytest.raises(CheckpointError, match=f"not there: .*{shard}"):
        load_model(path)


def test_wrong_shape_and_missing_and_unexpected_reported_together(tmp_path):
    path = str(tmp_path / "m")
    make_checkpoint(path)
    file = os.path.join(path, "model.safetensors")
    state = load_file(file)
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    del state["model.layers.2.self_attn.k_proj.bias"]
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    msg = str(e.value)
    assert "model.safetensors" in msg
    assert "wrong shape: model.layers.1.mlp.up_proj.weight: (95, 64)" in msg and "expected (96, 64)" in msg
    assert "missing: model.layers.2.self_attn.k_proj.bias" in msg
    assert "unexpected: model.layers.0.self_attn.rotary_emb.inv_freq" in msg


def test_subset_ignores_problems_in_other_layers_but_not_its_own(tmp_path):
    path = str(tmp_path / "m")
    make_checkpoint(path)
    file = os.path.join(path, "model.safetensors")
    state = load_file(file)
    del state["model.layers.2.mlp.down_proj.weight"]
    save_file(state, file, metadata={"format": "pt"})
    load_model(path, layers=[0, 1, 3])
    with pytest.raises(CheckpointError, match="missing: model.layers.2.mlp.down_proj.weight"):
        load_model(path, layers=[2])


@pytest.mark.parametrize("rope", [{"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6},
                                  {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}])
def test_rope_scaling_refused(tmp_path, rope):
    path = str(tmp_path / "m")
    make_checkpoint(path)
    edit_config(path, rope_parameters=rope)
    with pytest.raises(CheckpointError, match="RoPE scaling"):
        load_config(path)


def test_legacy_rope_scaling_refused(tmp_path):
    path = str(tmp_path / "m")
    make_checkpoint(path)
    edit_config(path, rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(CheckpointError, match="RoPE scaling"):
        load_config(path)


def test_sliding_window_in_use_refused_but_unused_window_accepted(tmp_path):
    path = str(tmp_path / "m")
    make_checkpoint(path)
    edit_config(path, use_sliding_window=True, sliding_window=16, max_window_layers=2)
    with pytest.raises(CheckpointError, match="sliding-window"):
        load_config(path)
    edit_config(path, use_sliding_window=False)
    load_config(path)


def test_other_architecture_refused(tmp_path):
    path = str(tmp_path / "m")
    make_checkpoint(path)
    edit_config(path, model_type="mistral")
    with pytest.raises(CheckpointError, match="model_type 'mistral' is not supported"):
        load_config(path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_config(str(tmp_path))
    path = str(tmp_path / "m")
    make_checkpoint(path)
    with pytest.raises(CheckpointError, match="tokenizer.json not found"):
        load_tokenizer(path)
    file = os.path.join(path, "model.safetensors")
    data = open(file, "rb").read()
    open(file, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(path)
    open(file, "wb").write(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(path)
    os.remove(file)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(path)


def test_nonexistent_layer_index(tmp_path):
    path = str(tmp_path / "m")
    make_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"layers \[7\] do not exist"):
        load_model(path, layers=[0, 7])


def run_cli(*argv):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, os.path.join(root, argv[0]), *argv[1:]], capture_output=True, text=True,
                          timeout=120)


def test_every_cli_answers_bad_input_with_one_line(tmp_path):
    """Run as programs: exit 1 and one `error:` line on stderr naming the problem, nothing loaded first."""
    path = str(tmp_path / "m")
    make_checkpoint(path)  # no tokenizer.json
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    cases = [(("generate.py", "--model", path, "--prompt", "x"), "tokenizer.json not found"),
             (("train.py", "--model", path, "--out", str(file)), "is a file: name a folder"),
             (("eval.py", "--run", str(tmp_path), "--windows", "0", "--depths", "4,x"),
              "--windows 0 must be at least 1; --depths")]
    for argv, message in cases:
        done = run_cli(*argv)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, (argv, done.stderr)
        assert done.stderr.startswith("error: ") and message in done.stderr, (argv, done.stderr)
    assert file.read_text() == "keep me"


def test_cli_turns_only_bad_input_into_one_line():
    def bad_value(argv):
        raise CheckpointError("config.json: hidden_size = 'x'")

    def bad_file(argv):
        open("/nonexistent/file")

    def bug(argv):
        return [][1]
    with pytest.raises(SystemExit, match="^error: config.json: hidden_size = 'x'$"):
        cli(bad_value, [])
    with pytest.raises(SystemExit, match="^error: .*No such file or directory: '/nonexistent/file'$"):
        cli(bad_file, [])
    with pytest.raises(IndexError):  # a bug keeps its traceback
        cli(bug, [])


def test_a_tokenizer_of_another_model_is_refused(tmp_path):
    path = make_model_folder(str(tmp_path / "m"))
    edit_config(path, vocab_size=100)
    with pytest.raises(CheckpointError, match="tokenizer.json has 264 tokens, more than the model's vocab_size 100"):
        load_tokenizer(path)


def test_config_values_of_the_wrong_type_are_named(tmp_path):
    path = str(tmp_path / "m")
    make_checkpoint(path)
    for key, value, message in [("hidden_size", "64", "hidden_size = '64', expected int in 1..1048576"),
                                ("num_hidden_layers", 2**40, "num_hidden_layers = 1099511627776, expected int in 1"),
                                ("eos_token_id", [2, "x"], "is not a token id or a list of them"),
                                ("tie_word_embeddings", "yes", "tie_word_embeddings = 'yes', expected bool")]:
        edit_config(path, **{key: value})
        with pytest.raises(CheckpointError, match=message):
            load_config(path)
        make_checkpoint(path)
    json.dump([1, 2], open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="holds a JSON list, not an object"):
        load_config(path)


def test_layer_count_is_checked_against_the_weights(tmp_path):
    path = str(tmp_path / "m")
    make_checkpoint(path)
    edit_config(path, num_hidden_layers=9)
    with pytest.raises(CheckpointError, match="says 9 layers, .*model.safetensors holds 4"):
        load_model(path)
