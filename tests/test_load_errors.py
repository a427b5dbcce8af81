"""Bad checkpoints fail with one clear error that names the file and the problem."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_checkpoint
from load_qwen import CheckpointError, load_config, load_model, load_tokenizer


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
