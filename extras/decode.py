"""Decoding: the KV cache, and cached decoding of the decoder and of Ouroboros with an exit per token.

The cached forward of the decoder is model.Transformer(ids, cache=...): its layers write their K/V
into the cache. Ouroboros decodes here, through its own prelude, steps and coda; the plain forward
(model.py, no cache) is the reference every cached path is tested against (tests/test_decode.py).
"""
import torch
import torch.nn.functional as F

from controller import Controller, latent_diff
from model import Ouroboros, rope_cos_sin


class KVCache:
    """The decoding state, preallocated once (gpt-fast style): keys and values of every attention
    slot at every position, written at the positions being decoded; `pos` positions are done.

    The full model has one slot per layer. Ouroboros has one per prelude layer, one per recurrent
    step (each step attends to its own K/V, as in Huginn) and one per coda layer, and it carries the
    controller's causal prefix mean as a running sum per step (`sums`, fp32)."""

    def __init__(self, cfg, slots: int, batch: int, max_len: int, like: torch.Tensor, steps: int = 0, dtype=None):
        """cfg: the decoder's Qwen2Config; like: a weight of the model (its device, and the dtype of the
        RoPE tables). dtype: of the K/V and of attention; default kv_dtype()."""
        shape = (slots, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype or kv_dtype(like), device=like.device)
        self.v = torch.zeros_like(self.k)
        self.sums = [torch.zeros(batch, cfg.hidden_size, device=like.device) for _ in range(steps)]
        self.cos, self.sin = rope_cos_sin(cfg, max_len, like.device, like.dtype)  # once, not per token
        self.pos = 0

    def rope(self, T: int):
        """The RoPE tables of the T positions after the `pos` done: what every forward asks first."""
        if self.pos + T > self.k.shape[3]:
            raise ValueError(f"{self.pos + T} positions do not fit a cache of {self.k.shape[3]}: make it longer")
        return self.cos[self.pos:self.pos + T], self.sin[self.pos:self.pos + T]

    def update(self, slot: int, k, v):
        """Write a chunk's K/V [B, n_kv, T, hd] at pos..pos+T-1; return the slot's K/V for 0..pos+T-1."""
        end = self.pos + k.shape[2]
        self.k[slot, :, :, self.pos:end] = k
        self.v[slot, :, :, self.pos:end] = v
        return self.k[slot, :, :, :end], self.v[slot, :, :, :end]

    def attend(self, slot: int, q, k, v):
        """Write a chunk's K/V into `slot`; its queries q [B, n_head, T, hd] attend over the slot's whole
        prefix, in the cache's dtype whatever autocast says. The causal mask is shifted by the prefix
        (a chunk after cached tokens), is_causal when there is none (it keeps the fused kernels), and
        one token needs none."""
        k, v = self.update(slot, k, v)
        T, S = q.shape[2], k.shape[2]
        mask = None if T in (1, S) else torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        with torch.autocast(q.device.type, enabled=False):
            y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, is_causal=T > 1 and T == S,
                                               enable_gqa=q.shape[1] != k.shape[1])
        return y.to(q.dtype)

    def carry(self, slot: int, stopped):
        """Tokens that stopped (stopped [B, T]) keep the K/V of their last computed step in `slot`."""
        end, m = self.pos + stopped.shape[1], stopped[:, None, :, None]
        for kv in (self.k, self.v):
            now = kv[slot, :, :, self.pos:end]
            now.copy_(torch.where(m, kv[slot - 1, :, :, self.pos:end], now))

    def running_sum(self, step: int, h):
        """(sum of step `step`'s input state over the positions before this chunk [B, d], their count);
        the chunk's states are added for the next call."""
        before = self.sums[step]
        self.sums[step] = before + h.float().sum(1)
        return before, self.pos

    def bytes_per_token(self) -> int:
        return 2 * self.k[:, 0, :, 0].numel() * self.k.element_size()


def kv_dtype(weight: torch.Tensor):
    """The K/V's dtype for a model whose weights are `weight`'s: fp32 on a CPU, whose bf16 attention
    kernels were slow for a few queries on the CPU measured (README, Decoding speed); the weights' elsewhere."""
    return torch.float32 if weight.device.type == "cpu" else weight.dtype


def new_cache(model, batch: int, max_len: int, depth: int = 0, dtype=None) -> KVCache:
    """The decoding state of `model`: one slot per layer of the decoder; for Ouroboros one per prelude
    layer, one per recurrent step of `depth` (the most any token will run; 1 for the pruned baseline)
    and one per coda layer."""
    if not isinstance(model, Ouroboros):
        return KVCache(model.config, len(model.layers), batch, max_len, model.embed_tokens.weight, dtype=dtype)
    model.check_depth(depth)
    slots = len(model.prelude_ids) + depth + len(model.coda_ids)
    return KVCache(model.base.config, slots, batch, max_len, model.base.embed_tokens.weight, depth, dtype)


def decode(model: Ouroboros, input_ids, cache: KVCache, exit=None):
    """Cached decoding of input_ids [B, T], which follow the cache's positions (the prompt, then a
    token at a time) -> (logits [B, T, V], the recurrent steps each token ran).

    exit = (criterion in EXITS, threshold): a token stops after the first step whose criterion falls
    below the threshold. For every later step k it counts as if its state had stayed h_e: step k's
    slot gets the K/V of its last computed step (as Huginn and Ouro fill them), and h_e enters step
    k's running sum. In a batch its later steps are computed and discarded while other rows run on;
    once every token has stopped none is computed. With an exit, a chunk of several tokens is decoded
    one token at a time."""
    if isinstance(model.diagonals, Controller) and model.diagonals.pool == "mean":
        raise ValueError("this run's controller pools over the whole sequence (pool='mean': it sees the future), "
                         "so each new token would change the diagonals before it: no cache; use --no-cache")
    if exit is not None and input_ids.shape[1] > 1:  # a stopped token's K/V are carried only after the
        # step, so later tokens of the same chunk would attend to K/V it never computed
        out = [decode(model, input_ids[:, t:t + 1], cache, exit) for t in range(input_ids.shape[1])]
        return torch.cat([o[0] for o in out], 1), torch.cat([o[1] for o in out], 1)
    depth, P = len(cache.sums), len(model.prelude_ids)
    x, cos, sin = model.embed_prelude(input_ids, cache)
    stopped = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    steps = torch.full(input_ids.shape, depth, device=input_ids.device)
    for k in range(depth):
        if exit is not None and stopped.all():  # nothing left to compute: carry every token forward
            cache.carry(P + k, stopped)
            cache.running_sum(k, x)
            continue
        h = model.step(x, k, cos, sin, cache)
        if exit is not None:
            cache.carry(P + k, stopped)
            h = torch.where(stopped[..., None], x, h)
            stop = ~stopped & (EXITS[exit[0]](model, x, h, k) < exit[1])
            steps[stop] = k + 1
            stopped |= stop
        x = h
    return model.coda_head(x, cos, sin, None, cache), steps


def learned(model, h_old, h, k: int):
    """1 - lambda_k of the run's trained exit head (controller.ExitHead): a token stops once lambda_k
    exceeds 1 - threshold."""
    if getattr(model, "exit_head", None) is None:
        raise ValueError("this run has no exit head: train one with python exits.py --run RUN")
    return 1 - model.exit_head(h_old, h, k)


# criterion(model, state before step k, state after it, k) per token: it stops below the threshold
EXITS = {"latent-diff": lambda model, h_old, h, k: latent_diff(h_old, h), "learned": learned}
