"""A Qwen2 / Llama decoder written by hand, and the Ouroboros recursive model built from it.

Part 1, the pretrained decoder, computes the same function as transformers' Qwen2ForCausalLM and
LlamaForCausalLM (tests/test_parity.py). Part 2 prunes it to prelude + one recurrent layer + coda and
loops the recurrent layer under a controller (arXiv 2604.02051). Both decode through a cache
(decode.py), Part 2 with an optional exit per token.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from controller import Controller, Gate, StaticDiagonals, StepNorm, SVDLoRA


# ----------------------------------------------------------------------------------------------
# Part 1: the decoder

@dataclass
class Qwen2Config:
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768
    attention_bias: bool = True  # q/k/v biases: True for qwen2, False for llama
    o_proj_bias: bool = False    # llama's attention_bias also biases o_proj; qwen2's never does
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 (bf16 squares lose too much), cast back, then scale, as the original does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(cfg: Qwen2Config, seq_len: int, device, dtype):
    """cos/sin tables [T, head_dim] for positions 0..T-1; frequencies computed in fp32."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim)
    freqs = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: the two halves share frequencies
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)  # rotate half
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def projection(layer, target: str):
    """(parent module, attribute name) of a layer's projection: q k v o in attention, gate up down in the MLP."""
    return (layer.self_attn if target in ("q", "k", "v", "o") else layer.mlp), f"{target}_proj"


def project(linear: nn.Module, x, diag, name: str):
    """Apply one projection; with Ouroboros diagonals (part 2) the SVD-LoRA wrapper adds its term."""
    return linear(x) if diag is None else linear(x, diag[name])


class Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=cfg.o_proj_bias)

    def forward(self, x, cos, sin, diag=None, cache=None, slot=0):
        B, T, _ = x.shape
        q = project(self.q_proj, x, diag, "q").view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = project(self.k_proj, x, diag, "k").view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = project(self.v_proj, x, diag, "v").view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:  # the causal mask is asked for, never left to a backend default
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_head)
        else:  # decoding: this chunk's K/V go into the slot, and it attends over the whole prefix
            y = cache.attend(slot, q, k, v)
        return project(self.o_proj, y.transpose(1, 2).reshape(B, T, -1), diag, "o")


class MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x, diag=None):  # SwiGLU
        h = F.silu(project(self.gate_proj, x, diag, "gate")) * project(self.up_proj, x, diag, "up")
        return project(self.down_proj, h, diag, "down")


class DecoderLayer(nn.Module):
    """Pre-norm block. Callable on its own with precomputed RoPE tables, which the loop needs."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, diag=None, cache=None, slot=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, diag, cache, slot)
        return x + self.mlp(self.post_attention_layernorm(x), diag)


class Transformer(nn.Module):
    """The pretrained decoder. `layers` picks which layers exist (default: all), named by their index
    in the checkpoint, so a subset loads straight from the HF names."""

    def __init__(self, cfg: Qwen2Config, layers=None):
        super().__init__()
        self.config = cfg
        layers = range(cfg.num_hidden_layers) if layers is None else layers
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg) for i in layers})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def rope(self, T: int, like: torch.Tensor, cache=None):
        """cos/sin for the T positions after the cache's (the cache holds its tables; from 0 without one)."""
        return rope_cos_sin(self.config, T, like.device, like.dtype) if cache is None else cache.rope(T)

    def forward(self, input_ids, labels=None, cache=None):
        """input_ids [B, T] -> logits [B, T, vocab], running every layer this model holds.
        With labels [B, T] (already aligned: labels[t] is the token after input_ids[t]) -> mean loss.
        With a cache (decoding): input_ids continue the positions it holds, one slot per layer."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(input_ids.shape[1], x, cache)
        for slot, layer in enumerate(self.layers.values()):
            x = layer(x, cos, sin, cache=cache, slot=slot)
        if cache is not None:
            cache.pos += input_ids.shape[1]
        return self.head(x, labels)

    def head(self, x, labels=None):
        """Final norm, then logits; with labels [B, T] (aligned with the inputs) their mean loss instead."""
        x = self.norm(x)
        return self.lm_head(x) if labels is None else lm_loss(x, self.lm_head.weight, labels)


class _ChunkedLMLoss(torch.autograd.Function):
    """Mean cross-entropy of (h @ W^T) against labels, a chunk of tokens at a time. The [tokens, vocab]
    logits are never held (2.5 GB in fp32 at 2 x 2048 x 151,936, plus their gradient): W is frozen, so
    the gradient for h, (softmax - onehot) W / n, is computed chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, h, weight, labels, chunk):
        h2, y = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
        valid = y != -100
        n = valid.sum().clamp(min=1)
        grad = torch.empty_like(h2) if ctx.needs_input_grad[0] else None
        total = h2.new_zeros((), dtype=torch.float32)
        for i in range(0, h2.shape[0], chunk):
            logits = (h2[i:i + chunk] @ weight.t()).float()
            yc, vc = y[i:i + chunk].clamp(min=0), valid[i:i + chunk]
            top = logits.amax(-1, keepdim=True)
            target = logits.gather(1, yc[:, None]) - top
            p = logits.sub_(top).exp_()  # unnormalised softmax, in place: one [chunk, vocab] buffer, one exp
            z = p.sum(-1, keepdim=True)
            total += ((z.log() - target).squeeze(1) * vc).sum()  # -log softmax[y] = log z - (logit_y - top)
            if grad is not None:  # (softmax - onehot) W = ((p - z onehot) W) / z: one pass over the logits fewer
                p[torch.arange(len(yc), device=p.device), yc] -= z.squeeze(1)  # in fp32, before any bf16 cast
                grad[i:i + chunk] = ((p.to(weight.dtype) @ weight).float() * (vc[:, None] / z)).to(h.dtype)
        if grad is not None:
            ctx.save_for_backward((grad / n).view_as(h))
        return total / n

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g, None, None, None


def lm_loss(h, weight, labels, chunk: int = 1024):
    """Next-token loss of final hidden states h [B, T, d]; labels are NOT shifted again here."""
    if labels.shape != h.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must match the tokens {tuple(h.shape[:-1])}")
    if weight.requires_grad and torch.is_grad_enabled():  # it would silently get no gradient
        raise ValueError("lm_loss computes no gradient for the head: freeze it (requires_grad_(False))")
    return _ChunkedLMLoss.apply(h, weight, labels, chunk)


# ----------------------------------------------------------------------------------------------
# Part 2: Ouroboros, the recursive model

def setting(default, help: str, scope="variant", **valid):
    """A configuration field declared once: default, --help, valid range (low, high inclusive; gt, lt
    exclusive; choices) and scope: "table" (all runs of one table share it), "variant" (a variant's seeds
    share it), "seed", or None (free). run.py makes a flag of each and checks it."""
    return field(default=default, metadata=dict(help=help, scope=scope, **valid))


@dataclass
class OuroborosConfig:
    prelude: int = setting(8, "layers kept at the start (the prelude)", "table", low=0)
    recurrent: int = setting(15, "index of the layer that is looped (the recurrent block)", "table", low=0)
    coda: int = setting(8, "layers kept at the end (the coda)", "table", low=0)
    rank: int = setting(32, "r, the rank of the SVD-LoRA bases A, B", low=1)
    alpha: float = setting(16.0, "the LoRA term's scale is alpha / r", gt=0)
    variant: str = setting("controller", "controller (per input); static (a learned table of diagonals per "
                           "step); none (no LoRA: gate and step norms only)", choices=("controller", "static", "none"))
    gate: bool = setting(True, "mix each step into the state through the gate (--no-gate: h = h_new)")
    pool: str = setting("causal", "what the controller reads: causal (the prefix mean) or mean (the paper's "
                        "whole-sequence mean, which sees the future)", choices=("causal", "mean"))
    style: int = setting(128, "the controller's width s", low=1)
    max_steps: int = setting(64, "most recurrent steps (one step embedding, one norm row each)", low=1, high=4096)

    def split(self, n_layers: int):
        """(prelude, recurrent, coda, removed) layer indices for a model of n_layers; bad splits raise."""
        P, R, C = self.prelude, self.recurrent, self.coda
        if self.variant not in ("controller", "static", "none"):
            raise ValueError(f"variant must be controller, static or none, not {self.variant!r}")
        if P < 0 or C < 0 or P + C >= n_layers:
            raise ValueError(f"prelude {P} + coda {C} must leave room for the recurrent layer in {n_layers} layers")
        if not P <= R < n_layers - C:
            raise ValueError(f"recurrent layer {R} must lie between the prelude (layers 0..{P - 1}) and the "
                             f"coda (layers {n_layers - C}..{n_layers - 1}), i.e. in {P}..{n_layers - C - 1}")
        removed = [i for i in range(P, n_layers - C) if i != R]
        if not removed:
            raise ValueError(f"prelude {P} + recurrent + coda {C} keep all {n_layers} layers: nothing is removed, "
                             "so there is no residual to build the SVD bases from; keep fewer layers")
        return list(range(P)), R, list(range(n_layers - C, n_layers)), removed


class Ouroboros(nn.Module):
    """embed -> prelude -> [controller -> modulated recurrent layer -> step norm -> gate] x depth
    -> coda -> norm -> lm_head. Only the controller (or static table), gate and step norms train.
    They are fp32 whatever the base dtype; with a bf16 base, run under torch.autocast."""

    def __init__(self, base: Transformer, oc: OuroborosConfig, bases: dict | None = None):
        super().__init__()
        self.config, self.base = oc, base.requires_grad_(False)
        self.prelude_ids, r, self.coda_ids, self.removed_ids = oc.split(base.config.num_hidden_layers)
        self.recurrent_id, self.recurrent = r, base.layers[str(r)]
        if oc.variant != "none":
            if bases is None:
                raise ValueError(f"variant {oc.variant!r} needs the SVD bases {{target: (A, B)}}")
            for t, (A, B) in bases.items():  # wrap the frozen projections in place
                parent, name = projection(self.recurrent, t)
                setattr(parent, name, SVDLoRA(getattr(parent, name), A, B, oc.alpha))
        d = base.config.hidden_size
        with torch.device(base.embed_tokens.weight.device):  # fp32 whatever the base: bf16 AdamW updates round away
            self.diagonals = (Controller(d, oc.rank, oc.style, oc.max_steps, oc.pool) if oc.variant == "controller"
                              else StaticDiagonals(oc.rank, oc.max_steps) if oc.variant == "static" else None)
            self.step_norm = StepNorm(d, oc.max_steps)
            self.gate = Gate(d) if oc.gate else None
        self.checkpoint_steps = False  # recompute each step in backward: memory O(1) in depth

    def layer(self, i):
        return self.base.layers[str(i)]

    def step(self, h, k: int, cos, sin, cache=None):
        """Recurrent step k: h_old -> h. With a cache, attention uses step k's slot and the controller
        pools over the running sum of the positions before this chunk."""
        prefix = None if cache is None else cache.running_sum(k, h)
        diag = None if self.diagonals is None else self.diagonals(h, k, prefix)
        h_new = self.recurrent(h, cos, sin, diag, cache, len(self.prelude_ids) + k)
        h_new = self.step_norm(h_new, k)
        return self.gate(h_new, h) if self.gate is not None else h_new

    def forward(self, input_ids, depth: int, labels=None, every: bool = False):
        """Logits [B, T, V], or the mean loss when labels (aligned with input_ids) are given; every: the
        mean of the losses read out after each step 1..depth, so that stopping after any step is trained."""
        states = self.readout(input_ids, range(1, depth + 1) if every else [depth])
        if labels is None:
            return self.base.head(states[depth])
        return sum(self.base.head(h, labels) for h in states.values()) / len(states)

    def readout(self, input_ids, depths) -> dict:
        """{depth: the coda's output after that many steps} for every depth, in one pass: the loop runs
        once to the largest depth and the coda reads the state out after each requested step.
        `self.base.head(h, labels)` turns one into logits or a loss."""
        for d in depths:
            self.check_depth(d)
        x, cos, sin = self.embed_prelude(input_ids)
        out = {}
        for k in range(max(depths)):
            if self.checkpoint_steps and torch.is_grad_enabled():
                x = checkpoint(self.step, x, k, cos, sin, use_reentrant=False)
            else:
                x = self.step(x, k, cos, sin)
            if k + 1 in depths:
                out[k + 1] = self.coda(x, cos, sin)
        return out

    def trainable(self) -> dict:
        """{name: tensor} of what trains: the controller (or static table), the gate and the step norms."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def check_depth(self, depth: int):
        if not 1 <= depth <= self.config.max_steps:
            raise ValueError(f"depth {depth} must be in 1..{self.config.max_steps} (max_steps)")

    def pruned(self, input_ids, labels=None, cache=None):
        """The baseline: prelude -> the recurrent layer once, unmodulated -> coda (a cache of depth 1)."""
        x, cos, sin = self.embed_prelude(input_ids, cache)
        x = self.recurrent(x, cos, sin, cache=cache, slot=len(self.prelude_ids))
        return self.coda_head(x, cos, sin, labels, cache)

    def embed_prelude(self, input_ids, cache=None):
        x = self.base.embed_tokens(input_ids)
        cos, sin = self.base.rope(input_ids.shape[1], x, cache)
        for slot, i in enumerate(self.prelude_ids):
            x = self.layer(i)(x, cos, sin, cache=cache, slot=slot)
        return x, cos, sin

    def coda(self, x, cos, sin, cache=None):
        first = 0 if cache is None else len(cache.k) - len(self.coda_ids)  # the coda's slots come last
        for j, i in enumerate(self.coda_ids):
            x = self.layer(i)(x, cos, sin, cache=cache, slot=first + j)
        if cache is not None:
            cache.pos += x.shape[1]
        return x

    def coda_head(self, x, cos, sin, labels, cache=None):
        return self.base.head(self.coda(x, cos, sin, cache), labels)
