"""What a run of train.py would split, train and hold in memory, from config.json alone: no weights are read.

    python extras/memory.py --model DIR --prelude 8 --recurrent 18 --coda 8 --depths 4,8,16 --seq-len 2048 ...

It takes train.py's flags. The model is built on the meta device, and a training step is run there under a
saved-tensors hook that counts each storage autograd keeps for backward, once.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402  (the reference's modules, from the repository root)

from controller import TARGETS, VARIANTS  # noqa: E402
from load_qwen import load_config  # noqa: E402
from model import Ouroboros, Transformer, projection  # noqa: E402
from train import cli, parse, placement  # noqa: E402


def kept_bytes(model: Ouroboros, batch: int, seq_len: int, depth: int, checkpointed: bool, every: bool) -> int:
    """The bytes autograd keeps for backward in a training step: each storage once, not the weights, nor attention's
    [T, T] scores (fused kernels keep none)."""
    weights, kept = {id(p.untyped_storage()) for p in model.parameters()}, {}

    def keep(t):
        if id(s := t.untyped_storage()) not in weights and tuple(t.shape[-2:]) != (seq_len, seq_len):
            kept[id(s)] = s.nbytes()
        return t
    model.checkpoint_steps = checkpointed
    ids = torch.zeros(batch, seq_len, dtype=torch.long, device=model.base.embed_tokens.weight.device)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(ids, depth, labels=ids, every=every).backward()
    return sum(kept.values())


def main(argv=None):
    cfg = parse(argv, __doc__)[0]
    config, dtype = load_config(cfg.model), placement(cfg.device, cfg.precision)[1]
    pre, r, post, removed = cfg.split(config.num_hidden_layers)
    with torch.device("meta"):  # bf16 everywhere keeps about what autocast keeps
        base = Transformer(config, pre + [r] + post)
        shapes = {t: getattr(*projection(base.layers[str(r)], t)).weight.shape for t in TARGETS
                  if VARIANTS[cfg.variant].low_rank}  # the bases load_ouroboros would build
        model = Ouroboros(base, cfg, {t: (torch.empty(cfg.rank, i), torch.empty(o, cfg.rank))
                                      for t, (o, i) in shapes.items()}).to(dtype)
    print(f"{config.num_hidden_layers} layers: prelude {pre}, recurrent {r}, coda {post}, {len(removed)} removed")
    for name, module in model.named_children():
        if n := sum(p.numel() for p in module.parameters() if p.requires_grad):
            print(f"{name:<12}{n:>12,} trainable")
    weights = sum(p.nbytes for p in model.parameters()) + 16 * sum(p.numel() for p in model.trainable().values())
    logits = 8 * min(1024, cfg.batch_size * cfg.seq_len) * config.vocab_size  # a chunk of them, fp32, twice
    print(f"peak memory of a step, batch {cfg.batch_size} x {cfg.seq_len}, {dtype}, GiB: weights {weights / 2**30:.2f}"
          f" (with what trains, its gradients and AdamW's moments) + logits {logits / 2**30:.2f} + activations:")
    for depth in cfg.depths:
        kept = [kept_bytes(model, cfg.batch_size, cfg.seq_len, depth, ck, cfg.readout == "every") for ck in (0, 1)]
        kept[1] += (kept[0] - kept[1]) / depth  # and one step's, recomputed in backward
        print(f"  depth {depth:2d}: " + "; with --checkpoint-steps ".join(
            f"{k / 2**30:.2f} -> {(weights + logits + k) / 2**30:.2f}" for k in kept))


if __name__ == "__main__":
    cli(main)
