"""What trains in Ouroboros: the controller (or an ablation), the gate and the step norms; and the SVD-LoRA term.

At recurrent step k the controller reads the hidden state h and emits a diagonal c_t in R^r for each projection t
of the recurrent layer, which then computes

    y = W_t x + b_t + (alpha / r) * B_t (c_t * (A_t x))

with A_t, B_t frozen rank-r bases from the SVD of the mean residual of the removed layers.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the recurrent layer's seven projections


def svd_bases(residual: torch.Tensor, rank: int):
    """A = V^T[:r] [r, in] and B = U[:, :r] * S[:r] [out, r], in fp32: B @ A is the best rank-r approximation of
    residual [out, in] (Eckart-Young)."""
    if not 0 < rank <= min(residual.shape):
        raise ValueError(f"--rank {rank} must be in 1..{min(residual.shape)} for a {tuple(residual.shape)} weight")
    U, S, Vh = torch.linalg.svd(residual.float(), full_matrices=False)
    return Vh[:rank].contiguous(), (U[:, :rank] * S[:rank]).contiguous()


class SVDLoRA(nn.Module):
    """A frozen linear layer plus the low-rank term the controller modulates. Nothing here trains."""

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, alpha: float):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(A, requires_grad=False)  # [r, in]
        self.B = nn.Parameter(B, requires_grad=False)  # [out, r]
        self.scale = alpha / A.shape[0]

    def forward(self, x, c=None):
        """c: the diagonal per token [B, T, r], per sequence [B, 1, r] or static [r]; None: the bare layer."""
        y = self.base(x)
        if c is None:
            return y
        return y + self.scale * F.linear(F.linear(x, self.A.to(x.dtype)) * c.to(x.dtype), self.B.to(x.dtype))


class Controller(nn.Module):
    """The paper's CompactController: the pooled state and a step embedding -> one diagonal per target.

        u = SiLU(W_u pool(h)),  e = E[k],  z = SiLU(W_2 SiLU(W_1 [u; e])),  c_t = H_t z

    pool="causal" (our fix, the default): position t reads the mean of h over positions <= t. pool="mean" (the
    paper's): one diagonal per sequence, from the mean over all of it, so that position t sees the future: a leak
    kept to be measured.
    """
    low_rank = True

    def __init__(self, dim: int, oc):
        super().__init__()
        s, self.causal = oc.style, oc.pool == "causal"
        self.state_proj = nn.Linear(dim, 2 * s)  # W_u
        self.step_embed = nn.Embedding(oc.max_depth, s)  # E
        self.mlp = nn.Sequential(nn.Linear(3 * s, 2 * s), nn.SiLU(), nn.Linear(2 * s, s), nn.SiLU())  # W_1, W_2
        self.heads = nn.ModuleDict({t: nn.Linear(s, oc.rank, bias=False) for t in TARGETS})  # H_t
        for head in self.heads.values():
            nn.init.zeros_(head.weight)  # zero diagonals at start: the loop begins as the bare layer

    def forward(self, h, step: int, pos, prefix=0.0):
        """h [B, T, d] at positions pos [T]; prefix [B, 1, d]: the sum of h over earlier positions (decoding)."""
        h = h.float()  # a running sum over thousands of positions needs fp32
        pooled = (prefix + h.cumsum(1)) / (pos + 1).unsqueeze(-1) if self.causal else h.mean(1, keepdim=True)
        u = F.silu(self.state_proj(pooled))
        e = self.step_embed.weight[step].expand(*u.shape[:-1], -1)
        z = self.mlp(torch.cat([u, e], dim=-1))
        return {t: head(z) for t, head in self.heads.items()}


class StaticDiagonals(nn.Module):
    """Ablation: a learned table of diagonals, one per (step, target), blind to the input."""
    causal = low_rank = True

    def __init__(self, dim: int, oc):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(oc.max_depth, len(TARGETS), oc.rank))

    def forward(self, h, step: int, pos, prefix=0.0):
        return {t: self.table[step, i] for i, t in enumerate(TARGETS)}


class NoDiagonals(nn.Module):
    """Ablation: no low-rank term at all; only the gate and the step norms train."""
    causal, low_rank = True, False

    def __init__(self, dim: int, oc):
        super().__init__()

    def forward(self, h, step: int, pos, prefix=0.0):
        return None


# --variant: what emits the diagonals; a new controller is an entry here (README, "Fork it"). `causal`: position t
# reads only positions <= t (the cache refuses others); `low_rank`: it needs SVD bases.
VARIANTS = {"controller": Controller, "static": StaticDiagonals, "none": NoDiagonals}


class Gate(nn.Module):
    """h = g * h_new + (1 - g) * h_old, g = sigmoid(W [h_new; h_old] + b). W = 0 and b = -2 at start: every
    channel keeps sigmoid(2) = 88.08% of the old state."""

    def __init__(self, dim: int, bias: float = -2.0):
        super().__init__()
        self.proj = nn.Linear(2 * dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, bias)

    def forward(self, h_new, h_old):
        g = torch.sigmoid(self.proj(torch.cat([h_new, h_old], dim=-1)))
        return h_old + g * (h_new - h_old)  # = g h_new + (1 - g) h_old, one multiply fewer


class StepNorm(nn.Module):
    """RMSNorm with its own weight row for every recurrent step ([max_depth, d], init 1)."""

    def __init__(self, dim: int, max_depth: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(max_depth, dim))

    def forward(self, x, step: int):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight[step] * xf).to(x.dtype)
