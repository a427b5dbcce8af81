"""Our hand-written decoder against transformers' own Qwen2 / Llama: the same function."""
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
    "llama-gqa-tied": dict(arch="llama", heads=6, kv_heads=2, hidden=96, tied=True),
    "llama-mqa-untied": dict(arch="llama", kv_heads=1),
    "llama-head-dim": dict(arch="llama", heads=4, kv_heads=2, head_dim=32),  # head_dim != hidden / heads
    "llama-bias": dict(arch="llama", attention_bias=True),
    "llama-bf16-sharded": dict(arch="llama", disk_dtype=torch.bfloat16, max_shard_size="40KB"),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(tmp_path, case):
    path = str(tmp_path / case)
    hf = make_checkpoint(path, **CASES[case])
    if CASES[case].get("max_shard_size"):
        assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    ours = load_model(path)
    assert ours.config.attention_bias == (CASES[case]["arch"] == "qwen2" or CASES[case].get("attention_bias", False))
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids)
    assert got.shape == (3, 40, 128)
    assert want.abs().max() > 1.0  # logits large enough that a missing term shows
    assert (got - want).abs().max().item() <= 2e-4


def test_layer_subset_loads_only_those_layers(tmp_path):
    path = str(tmp_path / "m")
    make_checkpoint(path, layers=5)
    part = load_model(path, layers=[0, 3])
    assert list(part.layers.keys()) == ["0", "3"]
    full = load_model(path)
    assert torch.equal(part.layers["3"].mlp.up_proj.weight, full.layers["3"].mlp.up_proj.weight)


def test_bf16_load_dtype_and_tied_head(tmp_path):
    path = str(tmp_path / "m")
    make_checkpoint(path, tied=True)
    model = load_model(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.lm_head.weight is model.embed_tokens.weight
    assert not any(p.requires_grad for p in model.parameters())


def test_config_fields(tmp_path):
    path = str(tmp_path / "m")
    make_checkpoint(path, arch="llama", heads=4, kv_heads=1, tied=True)
    cfg = load_config(path)
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.tie_word_embeddings, cfg.attention_bias) == (16, 1, True, False)
    assert cfg.rope_theta == 10000.0


def test_legacy_config_keys(tmp_path):
    """config.json written by transformers < 5 (rope_theta at top level, no head_dim)."""
    path = str(tmp_path / "m")
    make_checkpoint(path)
    file = os.path.join(path, "config.json")
    raw = json.load(open(file))
    raw.pop("rope_parameters")
    raw["rope_theta"], raw["rope_scaling"] = 12345.0, None
    json.dump(raw, open(file, "w"))
    assert load_config(path).rope_theta == 12345.0
