"""Coda adapters: plain LoRA on the coda layers' projections, trained with the controller, the gate and the step
norms. The paper's future work ("allowing downstream layers to adapt"), and the README's fork guide followed through
the reference's one hook, the `adapters` setting:

    python train.py --adapters extras.coda_lora:r8        # rank 8 on all seven projections of every coda layer
    python train.py --adapters extras.coda_lora:r8_attn   # rank 8 on q, k, v and o only

Each wrapped projection computes

    y = W x + b + (alpha / r_c) * B A x,    A ~ N(0, 1 / in), B = 0

so that, as in LoRA, the adapters start as the identity: at step 0 the model is the controller-only model.
"""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from controller import TARGETS
from model import Ouroboros, projection


class LoRA(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.A = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))  # [r_c, in]
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))  # [out, r_c]; zero: the identity at start

    def forward(self, x):  # fp32 masters, cast to the activations' dtype (bf16 under autocast)
        return self.base(x) + self.scale * F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype))


def attach(model: Ouroboros, rank: int, targets=TARGETS):
    """Wrap `targets` of every coda layer in a LoRA of rank r_c = rank, scaled by the model's alpha / r_c."""
    for layer in model.coda:
        for t in targets:
            parent, name = projection(layer, t)
            setattr(parent, name, LoRA(getattr(parent, name), rank, model.config.alpha))


# The hook's names: --adapters extras.coda_lora:<one of these>
r8, r32 = functools.partial(attach, rank=8), functools.partial(attach, rank=32)
r8_attn, r32_attn = (functools.partial(attach, rank=r, targets=("q", "k", "v", "o")) for r in (8, 32))
