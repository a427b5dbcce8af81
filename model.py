"""Part 1: a Qwen2 / Llama decoder by hand, as transformers computes it. Part 2: Ouroboros (arXiv 2604.02051), which
loops one of its layers. `pos`, the positions of the tokens given, is None (0..T-1) except when decoding."""
import importlib
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from controller import VARIANTS, Gate, StepNorm, SVDLoRA


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
    attention_bias: bool = True  # q/k/v biases (qwen2)
    o_proj_bias: bool = False  # llama's attention_bias biases o_proj too, qwen2's never
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # in fp32, cast back, then scale, as HF does
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope(cfg: Qwen2Config, pos, dtype):
    """cos, sin [T, head_dim] at positions pos [T]; frequencies in fp32, the rotate-half layout."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=pos.device).float() / cfg.head_dim)
    emb = torch.outer(pos.float(), inv_freq).repeat(1, 2)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache(nn.Module):
    """One attention's K/V, preallocated (gpt-fast): a compiled step can be a CUDA graph."""

    def __init__(self, batch: int, cfg: Qwen2Config, max_len: int, dtype, device):
        super().__init__()
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        for name in ("k", "v"):
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def attend(self, pos, q, k, v):
        self.k.index_copy_(2, pos, k.to(self.k.dtype))
        self.v.index_copy_(2, pos, v.to(self.v.dtype))
        mask = pos[:, None] >= torch.arange(self.k.shape[2], device=pos.device)  # static shapes: the whole cache
        with torch.autocast("cpu", enabled=False) if torch.is_autocast_enabled("cpu") else nullcontext():
            y = F.scaled_dot_product_attention(q.to(self.k.dtype), self.k, self.v, attn_mask=mask,
                                               enable_gqa=q.shape[1] != self.k.shape[1])
        return y.to(q.dtype)


def project(linear: nn.Module, x, diag, name: str):  # given diagonals, an SVDLoRA adds its term (Part 2)
    return linear(x) if diag is None else linear(x, diag[name])


class Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        d, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(d, q, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, kv, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, kv, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q, d, bias=cfg.o_proj_bias)
        self.kv_cache = None  # a KVCache while decoding (setup_caches)

    def forward(self, x, rope, pos=None, diag=None):
        B, T, _ = x.shape
        heads = lambda y: y.view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, T, n hd] -> [B, n, T, hd]
        q = apply_rope(heads(project(self.q_proj, x, diag, "q")), *rope)
        k = apply_rope(heads(project(self.k_proj, x, diag, "k")), *rope)
        v = heads(project(self.v_proj, x, diag, "v"))
        if pos is None:  # causal, asked for (the authors' code passed no mask)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
        else:  # decoding, through the cache
            y = self.kv_cache.attend(pos, q, k, v)
        return project(self.o_proj, y.transpose(1, 2).reshape(B, T, -1), diag, "o")


class MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x, diag=None):  # SwiGLU
        h = F.silu(project(self.gate_proj, x, diag, "gate")) * project(self.up_proj, x, diag, "up")
        return project(self.down_proj, h, diag, "down")


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, pos=None, diag=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, pos, diag)
        return x + self.mlp(self.post_attention_layernorm(x), diag)


def projection(layer: DecoderLayer, target: str) -> tuple:
    """(parent module, attribute name) of a layer's projection `target` (controller.TARGETS)."""
    return (layer.self_attn if target in ("q", "k", "v", "o") else layer.mlp), f"{target}_proj"


def through(layers, x, rope, pos=None):
    for layer in layers:
        x = layer(x, rope, pos)
    return x


class Transformer(nn.Module):
    """The pretrained decoder with the layers `layers` (default: all), keyed by their index."""

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

    def embed(self, ids, pos=None):
        x = self.embed_tokens(ids)
        return x, rope(self.config, torch.arange(ids.shape[1], device=ids.device) if pos is None else pos, x.dtype)

    def forward(self, ids, labels=None, pos=None):
        """ids [B, T] -> logits [B, T, vocab]; with labels (labels[t] follows ids[t]) -> the mean loss."""
        x, rope = self.embed(ids, pos)
        return self.head(through(self.layers.values(), x, rope, pos), labels)

    def head(self, x, labels=None):
        x = self.norm(x)
        return self.lm_head(x) if labels is None else lm_loss(x, self.lm_head.weight, labels)

    def setup_caches(self, batch: int, max_len: int):  # -> a maker of one more cache
        w = self.embed_tokens.weight  # K/V in the weights' dtype; fp32 on a CPU, where bf16 attention is slow
        dtype = torch.float32 if w.device.type == "cpu" else w.dtype
        cache = lambda: KVCache(batch, self.config, max_len, dtype, w.device)
        for layer in self.layers.values():
            layer.self_attn.kv_cache = cache()
        return cache


class _ChunkedLMLoss(torch.autograd.Function):
    """Mean cross-entropy of h @ W^T, a chunk of tokens at a time: the [tokens, vocab] logits are never held. W is
    frozen, so h's gradient, (softmax - onehot) W / n, is computed in the forward pass."""

    @staticmethod
    def forward(ctx, h, weight, labels, chunk):
        h2, y = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
        grad = torch.empty_like(h2) if ctx.needs_input_grad[0] else None
        total = 0.0
        for i in range(0, len(y), chunk):
            logits, yc = (h2[i:i + chunk] @ weight.t()).float(), y[i:i + chunk]
            top = logits.amax(-1, keepdim=True)
            target = logits.gather(1, yc[:, None]) - top
            p = logits.sub_(top).exp_()  # the unnormalised softmax, in place
            z = p.sum(-1, keepdim=True)
            total += (z.log() - target).sum()  # -log softmax[y] = log z - (logit_y - top)
            if grad is not None:  # (softmax - onehot) W = ((p - z onehot) W) / z
                p[torch.arange(len(yc), device=p.device), yc] -= z.squeeze(1)
                grad[i:i + chunk] = ((p.to(weight.dtype) @ weight).float() * (1 / z)).to(h.dtype)
        if grad is not None:
            ctx.save_for_backward((grad / len(y)).view_as(h))
        return total / len(y)

    @staticmethod
    def backward(ctx, g):
        return ctx.saved_tensors[0] * g, None, None, None


def lm_loss(h, weight, labels, chunk: int = 1024):
    """The loss of final hidden states h [B, T, d]: labels are NOT shifted again here."""
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("lm_loss gives the head no gradient: use F.cross_entropy on the logits")
    return _ChunkedLMLoss.apply(h, weight, labels, chunk)


# Part 2: Ouroboros, the recursive model

@dataclass
class OuroborosConfig:
    prelude: int = 8  # layers kept at the start
    recurrent: int = 15  # the index of the layer that is looped
    coda: int = 8  # layers kept at the end
    rank: int = 32  # r, the rank of the SVD bases A, B
    alpha: float = 16.0  # the low-rank term's scale is alpha / r
    variant: str = "controller"  # what emits the diagonals: a key of controller.VARIANTS
    gate: bool = True  # h = g h_new + (1 - g) h_old (False: h = h_new)
    pool: Literal["causal", "mean"] = "causal"  # the controller reads the prefix mean, or the paper's whole mean
    style: int = 128  # the controller's width s
    max_depth: int = 64  # the most recurrent steps (a step embedding and a step-norm row each)
    adapters: str = ""  # "module:function" adding trainable modules, e.g. extras/coda_lora.py

    def split(self, n_layers: int):
        """(prelude, recurrent, coda, removed) layer indices for a model of n_layers."""
        P, R, C = self.prelude, self.recurrent, self.coda
        if not (0 <= P <= R < n_layers - C and C >= 0) or P + C + 1 == n_layers:
            raise ValueError(f"--prelude {P} --recurrent {R} --coda {C} does not fit {n_layers} layers")
        return list(range(P)), R, list(range(n_layers - C, n_layers)), [i for i in range(P, n_layers - C) if i != R]


class Ouroboros(nn.Module):
    """embed -> prelude -> [controller -> modulated recurrent layer -> step norm -> gate] x depth -> coda -> head.
    Only the controller, the gate and the step norms train (in fp32); with a bf16 base, run under autocast. The pruned
    baseline (the recurrent layer once, bare) is the decoder of the kept layers alone."""

    def __init__(self, base: Transformer, oc: OuroborosConfig, bases: dict):
        super().__init__()
        self.config, self.base = oc, base.requires_grad_(False)
        pre, r, post, _ = oc.split(base.config.num_hidden_layers)
        self.prelude, self.coda = [base.layers[str(i)] for i in pre], [base.layers[str(i)] for i in post]
        self.recurrent = base.layers[str(r)]
        for t, (A, B) in bases.items():  # wrapped in place: W x + b + (alpha/r) B (c * A x)
            parent, name = projection(self.recurrent, t)
            setattr(parent, name, SVDLoRA(getattr(parent, name), A, B, oc.alpha))
        d = base.config.hidden_size
        with torch.device(base.embed_tokens.weight.device):  # fp32: bf16 AdamW updates round away
            self.controller = VARIANTS[oc.variant](d, oc)
            self.step_norm = StepNorm(d, oc.max_depth)
            self.gate = Gate(d) if oc.gate else None
            if oc.adapters:  # built last: a seed still gives the same controller
                module, function = oc.adapters.split(":")
                getattr(importlib.import_module(module), function)(self)
        self.checkpoint_steps = False  # recompute each step in backward: memory flat in depth
        self.step_caches = None  # decoding (setup_caches); sums: a buffer, for CUDA graphs
        self.register_buffer("sums", None, persistent=False)

    def step(self, h, k: int, rope, pos=None):
        """Recurrent step k: h_old -> h."""
        at, prefix = torch.arange(h.shape[1], device=h.device), 0.0
        if pos is not None:  # decoding: step k attends to its own K/V (as Huginn) and continues its prefix sum
            self.recurrent.self_attn.kv_cache = self.step_caches[k]
            at, prefix = pos, self.sums[k].clone()
            self.sums[k] += h.float().sum(1, keepdim=True)
        diag = self.controller(h, k, at, prefix)  # c_t for every target t
        h_new = self.step_norm(self.recurrent(h, rope, pos, diag), k)  # the modulated layer, then RMSNorm_k
        return self.gate(h_new, h) if self.gate is not None else h_new  # h = g h_new + (1 - g) h_old

    def forward(self, ids, depth: int, labels=None, pos=None, every: bool = False):
        """Logits [B, T, V] after `depth` steps, or with labels the mean loss (every: over each step's readout, so that
        any step can be the last: extras/exits.py)."""
        states = self.readout(ids, range(1, depth + 1) if every else [depth], pos)
        if labels is None:
            return self.base.head(states[depth])
        return sum(self.base.head(h, labels) for h in states.values()) / len(states)

    def readout(self, ids, depths, pos=None) -> dict:
        """{depth: the coda's output after that many steps} for each of depths, from one run of the loop."""
        if bad := [d for d in depths if not 1 <= d <= self.config.max_depth]:
            raise ValueError(f"depth {bad[0]} must be in 1..{self.config.max_depth}")
        saving = self.checkpoint_steps and torch.is_grad_enabled()
        run = lambda save, fn, *args: checkpoint(fn, *args, use_reentrant=False) if save else fn(*args)
        x, rope = self.base.embed(ids, pos)
        x, out = through(self.prelude, x, rope, pos), {}
        for k in range(max(depths)):
            x = run(saving, self.step, x, k, rope, pos)
            if k + 1 in depths:  # several readouts (every): each coda recomputed in backward too
                out[k + 1] = run(saving and len(depths) > 1, through, self.coda, x, rope, pos)
        return out

    def trainable(self) -> dict:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def optimizer(self, lr: float, weight_decay: float, betas) -> torch.optim.AdamW:
        """AdamW over what trains, decaying matrices only (not biases, nor the step norms)."""
        decay = {p: p.dim() >= 2 and p is not self.step_norm.weight for p in self.trainable().values()}
        groups = [[p for p, d in decay.items() if d == want] for want in (True, False)]
        return torch.optim.AdamW([{"params": groups[0]}, {"params": groups[1], "weight_decay": 0.0}], lr=lr,
                                 betas=betas, weight_decay=weight_decay)

    def setup_caches(self, batch: int, max_len: int, depth: int):
        """The decoding state: a KVCache per layer and per step, and the controller's running sums."""
        cache = self.base.setup_caches(batch, max_len)
        self.step_caches = nn.ModuleList(cache() for _ in range(depth))
        self.recurrent.self_attn.kv_cache = None  # freed: each step has its own
        self.sums = torch.zeros(depth, batch, 1, self.base.config.hidden_size, device=self.base.lm_head.weight.device)
