"""An HF-format folder (config.json, safetensors, tokenizer.json) -> the decoder, or Ouroboros."""
import functools, glob, json, os

import torch
from safetensors import safe_open

from controller import TARGETS, VARIANTS, svd_bases
from model import Ouroboros, OuroborosConfig, Qwen2Config, Transformer

CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache")  # converted models, token files
DEFAULT_MODEL = os.path.join(CACHE, "SmolLM2-135M-Instruct")  # setup.sh makes it


def load_config(path: str) -> Qwen2Config:
    """config.json -> Qwen2Config, refusing what this decoder would compute differently."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found: --model takes an HF-format folder"
                                + (" (bash setup.sh makes this one)" if path == DEFAULT_MODEL else ""))
    with open(file) as f:
        c = json.load(f)
    kind, layers = c.get("model_type"), c["num_hidden_layers"]
    ropes = [r for r in (c.get("rope_parameters"), c.get("rope_scaling")) if r]  # transformers 5 / 4
    window = c.get("sliding_window") or 0
    unsupported = [
        (kind not in ("qwen2", "llama"), f"model_type {kind!r} (only qwen2 and llama)"),
        (c.get("hidden_act", "silu") != "silu", f"hidden_act {c.get('hidden_act')!r}"),
        (c.get("mlp_bias", False), "mlp_bias"),
        (any(r.get("rope_type", r.get("type", "default")) != "default" for r in ropes), "RoPE scaling"),
        (kind == "qwen2" and c.get("use_sliding_window", False) and window < c.get("max_position_embeddings", 32768)
         and (c.get("max_window_layers") or 0) < layers, "sliding-window attention in use")]
    if refused := [what for bad, what in unsupported if bad]:
        raise ValueError(f"{file}: {', '.join(refused)}: not supported")
    heads, llama_bias = c["num_attention_heads"], kind == "llama" and c.get("attention_bias", False)
    theta = next((r["rope_theta"] for r in ropes if "rope_theta" in r), c.get("rope_theta") or 10000.0)
    return Qwen2Config(
        **{k: c[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")},
        **{k: c[k] for k in ("rms_norm_eps", "max_position_embeddings", "eos_token_id") if k in c},
        num_attention_heads=heads, num_key_value_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads, rope_theta=float(theta),
        tie_word_embeddings=c.get("tie_word_embeddings", False), attention_bias=kind == "qwen2" or llama_bias,
        o_proj_bias=llama_bias)


def open_weights(path: str) -> dict:
    """{HF tensor name: a function that reads it}, from the folder's .safetensors files (one, or shards)."""
    files = [safe_open(f, "pt") for f in sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))]
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    return {n: functools.partial(f.get_tensor, n) for f in files for n in f.keys()}


def load_model(path: str, dtype=torch.float32, device="cpu", layers=None, config=None) -> Transformer:
    """The frozen decoder of a folder, only `layers` read and kept."""
    cfg, read = config or load_config(path), open_weights(path)
    with torch.device("meta"):  # no memory until the tensors are assigned
        model = Transformer(cfg, None if layers is None else sorted(layers))
    hf = lambda n: n if n.startswith("lm_head.") else "model." + n  # HF's names are ours with a prefix
    state = {n: read[hf(n)]().to(device=device, dtype=dtype) for n, _ in model.named_parameters()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:  # assign=True replaced the shared parameter: tie again
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval().requires_grad_(False)


def load_ouroboros(path: str, oc: OuroborosConfig, dtype=torch.float32, device="cpu", config=None) -> Ouroboros:
    """The kept layers and, for every target projection t, the SVD bases of the mean residual
    R_t = mean over removed layers i of (W_t[i] - W_t[recurrent])."""
    cfg = config or load_config(path)
    pre, r, post, removed = oc.split(cfg.num_hidden_layers)
    base, read, bases = load_model(path, dtype, device, pre + [r] + post, cfg), open_weights(path), {}
    for t in TARGETS if VARIANTS[oc.variant].low_rank else ():
        proj = ("self_attn." if t in ("q", "k", "v", "o") else "mlp.") + f"{t}_proj"  # read a tensor at a time
        w = lambda i: read[f"model.layers.{i}.{proj}.weight"]().to(device=device, dtype=torch.float32)
        residual = sum(w(i) for i in removed) / len(removed) - w(r)
        bases[t] = tuple(m.to(dtype) for m in svd_bases(residual, oc.rank))
    return Ouroboros(base, oc, bases)


def load_tokenizer(path: str):
    from tokenizers import Tokenizer
    if not os.path.isfile(file := os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"{file} not found")
    return Tokenizer.from_file(file)
