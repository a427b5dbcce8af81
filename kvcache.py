"""The KV cache that decodes the decoder and Ouroboros (model.py)."""
import torch


class KVCache:
    """The decoding state, preallocated once (gpt-fast style): keys and values of every attention
    slot at every position, written at the positions being decoded; `pos` positions are done.

    The full model has one slot per layer. Ouroboros has one per prelude layer, one per recurrent
    step (each step attends to its own K/V, as in Huginn) and one per coda layer, and it carries the
    controller's causal prefix mean as a running sum per step (`sums`, fp32)."""

    def __init__(self, cfg, slots: int, batch: int, max_len: int, like: torch.Tensor, steps: int = 0):
        """cfg: the decoder's Qwen2Config; like: a tensor of the dtype and device the K/V are kept in."""
        shape = (slots, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.v = torch.zeros_like(self.k)
        self.sums = [torch.zeros(batch, cfg.hidden_size, device=like.device) for _ in range(steps)]
        self.pos = 0

    def update(self, slot: int, k, v):
        """Write a chunk's K/V [B, n_kv, T, hd] at pos..pos+T-1; return the slot's K/V for 0..pos+T-1."""
        end = self.pos + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"{end} positions do not fit a cache of {self.k.shape[3]}: make it longer")
        self.k[slot, :, :, self.pos:end] = k
        self.v[slot, :, :, self.pos:end] = v
        return self.k[slot, :, :, :end], self.v[slot, :, :, :end]

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
