"""The trainable parts of Ouroboros: controller, SVD-LoRA modulation, gate and per-step norm.

At recurrent step k the controller reads the hidden state h and emits one diagonal c_t in R^r per
target projection t; the frozen recurrent layer then computes, for every t,

    y = W_t x + b_t + (alpha / r) * B_t (c_t * (A_t x))

with A_t, B_t frozen rank-r bases from the SVD of the mean residual of the removed layers. The
step's output is normalised by a per-step RMSNorm and mixed into the state by a learned gate.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the recurrent layer's seven projections


def svd_bases(residual: torch.Tensor, rank: int):
    """Frozen bases of the best rank-r approximation B @ A of `residual` [out, in] (Eckart-Young).

    residual = mean over removed layers i of (W[i] - W[recurrent]); the SVD runs in fp32.
    Returns A = V^T[:r] [r, in] and B = U[:, :r] * S[:r] [out, r].
    """
    if not 0 < rank <= min(residual.shape):
        raise ValueError(f"rank {rank} must be in 1..{min(residual.shape)} for a {tuple(residual.shape)} weight")
    U, S, Vh = torch.linalg.svd(residual.float(), full_matrices=False)
    return Vh[:rank].contiguous(), (U[:, :rank] * S[:rank]).contiguous()


class SVDLoRA(nn.Module):
    """A frozen linear layer plus the controller-modulated low-rank term. Nothing here trains."""

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, alpha: float):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(A, requires_grad=False)  # [r, in]
        self.B = nn.Parameter(B, requires_grad=False)  # [out, r]
        self.scale = alpha / A.shape[0]

    def forward(self, x, c=None):
        """c: diagonal [B, T, r] (causal), [B, r] (sequence mean) or [r] (static); None: the bare layer."""
        y = self.base(x)
        if c is None:
            return y
        if c.dim() == 2:
            c = c.unsqueeze(1)  # one diagonal per sequence: broadcast over positions
        return y + self.scale * F.linear(F.linear(x, self.A.to(x.dtype)) * c.to(x.dtype), self.B.to(x.dtype))


class Controller(nn.Module):
    """The paper's CompactController: hidden state + step embedding -> one diagonal per target.

    pool="causal" (default): position t sees the mean of h over positions <= t, so every token gets
    its own diagonals [B, T, r] and nothing flows from the future; the model stays autoregressive.
    pool="mean": the paper's mean over the whole sequence, one diagonal per sequence [B, r]. It
    lets position t see tokens after t (a leak of the future that makes training loss look better
    than anything a left-to-right decoder can achieve); it exists so that effect can be measured.
    """

    def __init__(self, dim: int, rank: int, style: int, max_steps: int, pool: str):
        super().__init__()
        if pool not in ("causal", "mean"):
            raise ValueError(f"pool must be 'causal' or 'mean', not {pool!r}")
        self.pool = pool
        self.state_proj = nn.Linear(dim, 2 * style)                      # u = SiLU(W_u h)
        self.step_embed = nn.Embedding(max_steps, style)                 # e = E[k]
        self.mlp = nn.Sequential(nn.Linear(3 * style, 2 * style), nn.SiLU(),
                                 nn.Linear(2 * style, style), nn.SiLU())  # z = MLP([u; e])
        self.heads = nn.ModuleDict({t: nn.Linear(style, rank, bias=False) for t in TARGETS})  # c_t = H_t z
        for head in self.heads.values():
            nn.init.zeros_(head.weight)  # zero diagonals at start: the loop begins as the bare layer

    def pooled(self, h, prefix=None):
        """prefix (cached decoding): (sum of h over the positions before h [B, d], their count)."""
        h = h.float()  # a running sum over thousands of positions needs fp32
        if self.pool == "mean":
            return h.mean(dim=1)
        total, start = h.cumsum(dim=1), 0
        if prefix is not None:
            total, start = prefix[0][:, None] + total, prefix[1]
        count = torch.arange(start + 1, start + h.shape[1] + 1, device=h.device, dtype=h.dtype)
        return total / count[:, None]

    def forward(self, h, step: int, prefix=None):
        u = F.silu(self.state_proj(self.pooled(h, prefix)))
        e = self.step_embed.weight[step].expand(*u.shape[:-1], -1)
        z = self.mlp(torch.cat([u, e], dim=-1))
        return {t: head(z) for t, head in self.heads.items()}


class StaticDiagonals(nn.Module):
    """Ablation: a learned table of diagonals, one per (step, target), blind to the input."""

    def __init__(self, rank: int, max_steps: int):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(max_steps, len(TARGETS), rank))

    def forward(self, h, step: int, prefix=None):  # prefix: unused, the table is blind to the input
        return {t: self.table[step, i] for i, t in enumerate(TARGETS)}


class ExitHead(nn.Module):
    """The learned exit: after step k, lambda_k = sigmoid(w . [rms(h_k); log ||h_k - h_{k-1}|| / ||h_k||; e_k] + b),
    the chance that stopping here reads out within epsilon of the deepest step's loss (its training label).
    It is trained after the controller with everything else frozen (Ouro's second stage): exits.py."""

    def __init__(self, dim: int, max_steps: int, width: int = 16):
        super().__init__()
        self.step_embed = nn.Embedding(max_steps, width)  # e_k
        self.proj = nn.Linear(dim + 1 + width, 1)         # w, b

    def forward(self, h_old, h, step: int):
        change = latent_diff(h_old, h).clamp_min(1e-12).log()  # Huginn's criterion, as a feature
        h = h.float()
        e = self.step_embed.weight[step].expand(*h.shape[:-1], -1)
        return torch.sigmoid(self.proj(torch.cat([F.rms_norm(h, h.shape[-1:]), change[..., None], e], -1))).squeeze(-1)


def latent_diff(h_old, h):
    """Huginn's exit criterion: the relative change of the state, ||h_k - h_{k-1}|| / ||h_k||, per token."""
    h_old, h = h_old.float(), h.float()
    return (h - h_old).norm(dim=-1) / h.norm(dim=-1)


class Gate(nn.Module):
    """h = g * h_new + (1 - g) * h_old, g = sigmoid(W [h_new; h_old] + b).

    W = 0 and b = -2 at start: every channel keeps sigmoid(2) = 88.08% of the old state.
    """

    def __init__(self, dim: int, bias: float = -2.0):
        super().__init__()
        self.proj = nn.Linear(2 * dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, bias)

    def forward(self, h_new, h_old):
        g = torch.sigmoid(self.proj(torch.cat([h_new, h_old], dim=-1)))
        return h_old + g * (h_new - h_old)  # = g h_new + (1 - g) h_old, one multiply fewer


class StepNorm(nn.Module):
    """RMSNorm with its own weight row for every recurrent step ([max_steps, d], init 1)."""

    def __init__(self, dim: int, max_steps: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(max_steps, dim))

    def forward(self, x, step: int):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight[step] * xf).to(x.dtype)
