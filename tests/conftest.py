"""Tiny random HF checkpoints, written by transformers itself, for the tests to load."""
import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_checkpoint(path, arch="qwen2", layers=4, hidden=64, heads=4, kv_heads=2, ffn=96, vocab=128,
                    tied=False, max_shard_size=None, disk_dtype=torch.float32, seed=0, **extra):
    """Save a random model with transformers' save_pretrained; return the HF model (fp32, eager).

    Every weight is random: biases non-zero, norm weights away from 1, so no term can hide."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    Config, Model = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    cfg = Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                 rope_theta=10000.0, rms_norm_eps=1e-6, **extra)
    cfg._attn_implementation = "eager"  # the oracle: transformers' plain-matmul attention and mask
    torch.manual_seed(seed)
    model = Model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
        if disk_dtype != torch.float32:  # the oracle keeps fp32 buffers (RoPE) but sees the rounded weights
            for p in model.parameters():
                p.copy_(p.to(disk_dtype))
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    copy.deepcopy(model).to(disk_dtype).save_pretrained(path, **kw)
    return model


@pytest.fixture
def tiny_qwen(tmp_path):
    path = str(tmp_path / "qwen")
    make_checkpoint(path, layers=6)
    return path
