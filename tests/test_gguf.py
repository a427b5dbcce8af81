"""GGUF -> HF conversion, on a tiny GGUF written here with the gguf package (llama.cpp's layout)."""
import os

import numpy as np
import pytest
import torch

from conftest import MERGES, SPECIAL, make_checkpoint, tokenizer_vocab
from convert_gguf import convert_gguf
from load_qwen import load_config, load_model, load_tokenizer

gguf = pytest.importorskip("gguf")

HEADS, KV = 4, 2


def llama_cpp_permute(w, n_head):
    """What llama.cpp's convert_hf_to_gguf.py does to Q and K rows (copied from its LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(file, hf, quantize_embedding=False):
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    cfg = hf.config
    w = gguf.GGUFWriter(file, "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(512)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(cfg.hidden_size // HEADS)
    vocab = tokenizer_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_token_list(vocab)
    w.add_token_merges(MERGES)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIAL else gguf.TokenType.NORMAL for t in vocab])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    emb = sd["model.embed_tokens.weight"]
    if quantize_embedding:
        w.add_tensor("token_embd.weight", gguf.quants.quantize(emb, gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        w.add_tensor("token_embd.weight", emb)
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(cfg.num_hidden_layers):
        for g, h in names.items():
            t = sd[f"model.layers.{i}.{h}.weight"]
            if g == "attn_q":
                t = llama_cpp_permute(t, HEADS)
            elif g == "attn_k":
                t = llama_cpp_permute(t, KV)
            w.add_tensor(f"blk.{i}.{g}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("quantized", [False, True])
def test_converted_gguf_matches_the_original(tmp_path, quantized):
    vocab = len(tokenizer_vocab())
    hf = make_checkpoint(str(tmp_path / "hf"), arch="llama", heads=HEADS, kv_heads=KV, vocab=vocab, tied=True)
    file = str(tmp_path / "tiny.gguf")
    write_gguf(file, hf, quantize_embedding=quantized)
    out = convert_gguf(file, str(tmp_path / "converted"))
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
    cfg = load_config(out)
    assert (cfg.num_key_value_heads, cfg.tie_word_embeddings, cfg.attention_bias) == (KV, True, False)
    assert cfg.eos_token_id == 2
    ours = load_model(out)
    if quantized:  # the oracle gets the same dequantised embedding
        emb = hf.model.embed_tokens.weight
        q = gguf.quants.quantize(emb.detach().numpy(), gguf.GGMLQuantizationType.Q8_0)
        deq = torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).copy())
        assert 0 < (deq - emb).abs().max() < 1e-2
        with torch.no_grad():
            emb.copy_(deq)
    ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 2e-4


def test_converted_tokenizer(tmp_path):
    hf = make_checkpoint(str(tmp_path / "hf"), arch="llama", heads=HEADS, kv_heads=KV, vocab=len(tokenizer_vocab()))
    file = str(tmp_path / "tiny.gguf")
    write_gguf(file, hf)
    tok = load_tokenizer(convert_gguf(file, str(tmp_path / "converted")))
    enc = tok.encode("the 2024<|im_end|>")
    assert enc.tokens == ["t", "he", "Ġ", "2", "0", "2", "4", "<|im_end|>"]  # digits one per token, special kept
    assert enc.ids[-1] == 2
    assert tok.decode(tok.encode("in the cat").ids) == "in the cat"


def test_bad_gguf_is_refused_and_leaves_nothing(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="corrupt or not a GGUF"):
        convert_gguf(str(bad), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="not found"):
        convert_gguf(str(tmp_path / "missing.gguf"), str(tmp_path / "out"))


def test_a_failed_write_is_one_error_and_leaves_nothing(tmp_path):
    """The weights cannot be written (here their file's name is taken by a folder; a full disk fails
    the same way inside safetensors): an OSError naming the folder, no half-written folder left."""
    hf = make_checkpoint(str(tmp_path / "hf"), arch="llama", heads=HEADS, kv_heads=KV, vocab=len(tokenizer_vocab()))
    file = str(tmp_path / "tiny.gguf")
    write_gguf(file, hf)
    out = tmp_path / "converted"
    os.makedirs(f"{out}.tmp{os.getpid()}/model.safetensors")
    with pytest.raises(OSError, match=f"could not write {out}"):
        convert_gguf(file, str(out))
    assert sorted(os.listdir(tmp_path)) == ["hf", "tiny.gguf"]

