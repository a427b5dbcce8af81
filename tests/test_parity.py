"""The decoder (model.py, Part 1) computes what transformers' Qwen2ForCausalLM and LlamaForCausalLM compute, from the
same folder: the logits of every case agree to 2e-4, and load_qwen reads config.json as transformers does."""
import json
import os

import pytest
import torch

from conftest import make_checkpoint
from load_qwen import load_config, load_model

CASES = {
    "qwen2-gqa-untied": dict(arch="qwen2", heads=4, kv_heads=2),
    "qwen2-mqa-tied": dict(arch="qwen2", heads=4, kv_heads=1, tied=True),
    "qwen2-mha": dict(arch="qwen2", heads=4, kv_heads=4),
    "qwen2-sharded": dict(arch="qwen2", max_shard_size="40KB"),
    "qwen2-bf16-on-disk": dict(arch="qwen2", disk_dtype=torch.bfloat16, tied=True),
    "qwen2-theta-1e6": dict(arch="qwen2", rope_theta=1e6),
    "llama-gqa-tied": dict(arch="llama", heads=6, kv_heads=2, hidden=96, tied=True),
    "llama-mqa-untied": dict(arch="llama", kv_heads=1),
    "llama-head-dim": dict(arch="llama", heads=4, kv_heads=2, head_dim=32),  # head_dim != hidden / heads
    "llama-bias": dict(arch="llama", attention_bias=True),  # llama's bias is on q, k, v and o
    "llama-bf16-sharded": dict(arch="llama", disk_dtype=torch.bfloat16, max_shard_size="40KB"),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(tmp_path, case):
    path = str(tmp_path / case)
    hf = make_checkpoint(path, **CASES[case])
    if CASES[case].get("max_shard_size"):
        assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    ours = load_model(path)
    llama_bias = CASES[case].get("attention_bias", False)
    assert ours.config.attention_bias == (CASES[case]["arch"] == "qwen2" or llama_bias)
    assert ours.config.o_proj_bias == llama_bias  # qwen2 never biases o_proj
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids)
    assert got.shape == (3, 40, 128)
    assert want.abs().max() > 1.0  # logits large enough that a missing term shows
    assert (got - want).abs().max().item() <= 2e-4


def test_loss_with_aligned_labels_is_transformers_shifted_loss(tmp_path):
    """Our labels are aligned (labels[t] is the token after ids[t]); transformers shifts inside its loss."""
    hf = make_checkpoint(str(tmp_path / "m"))
    ours = load_model(str(tmp_path / "m"))
    seq = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(seq, labels=seq).loss  # predicts seq[:, 1:] from seq[:, :-1]
        got = ours(seq[:, :-1], labels=seq[:, 1:])
    assert abs(got.item() - want.item()) < 1e-5


def test_layer_subset_loads_only_those_layers(tmp_path):
    path = str(tmp_path / "m")
    make_checkpoint(path, layers=5)
    part = load_model(path, layers=[0, 3])
    assert list(part.layers.keys()) == ["0", "3"]
    full = load_model(path)
    assert torch.equal(part.layers["3"].mlp.up_proj.weight, full.layers["3"].mlp.up_proj.weight)
    assert not torch.equal(part.layers["3"].mlp.up_proj.weight, full.layers["1"].mlp.up_proj.weight)


def test_bf16_load_dtype_and_tied_head(tmp_path):
    path = str(tmp_path / "m")
    make_checkpoint(path, tied=True)
    model = load_model(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.lm_head.weight is model.embed_tokens.weight
    assert not any(p.requires_grad for p in model.parameters())
    untied = str(tmp_path / "untied")
    make_checkpoint(untied, tied=False)
    model = load_model(untied)
    assert not torch.equal(model.lm_head.weight, model.embed_tokens.weight)


def test_config_fields(tmp_path):
    path = str(tmp_path / "m")
    make_checkpoint(path, arch="llama", heads=4, kv_heads=1, tied=True, eos_token_id=[2, 3])
    cfg = load_config(path)
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.tie_word_embeddings, cfg.attention_bias) == (16, 1, True, False)
    assert (cfg.rope_theta, cfg.eos_token_id, cfg.num_hidden_layers, cfg.vocab_size) == (10000.0, [2, 3], 4, 128)


def test_legacy_config_keys(tmp_path):
    """config.json written by transformers < 5 (rope_theta at top level, rope_scaling null, no head_dim)."""
    path = str(tmp_path / "m")
    make_checkpoint(path)
    file = os.path.join(path, "config.json")
    raw = json.load(open(file))
    raw.pop("rope_parameters")
    raw.pop("head_dim", None)
    raw["rope_theta"], raw["rope_scaling"] = 12345.0, None
    json.dump(raw, open(file, "w"))
    cfg = load_config(path)
    assert cfg.rope_theta == 12345.0 and cfg.head_dim == 16
