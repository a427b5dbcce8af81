"""The GPU's code path, as far as a CPU can exercise it: training, evaluation and cached decoding with every tensor on
a device that is not the CPU (the meta device)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from controller import TARGETS
from model import Ouroboros, OuroborosConfig, Qwen2Config, Transformer, projection

class NoCPU(TorchDispatchMode):
    """Fails on any op that makes a tensor of more than one element on the CPU (a 0-dim CPU tensor is a scalar that
    any device takes, as AdamW's step count is)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel() > 1:
                raise AssertionError(f"{func} made a tensor of shape {tuple(t.shape)} on the CPU")
        return out


def meta_model(variant: str):
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
                      num_key_value_heads=2)
    oc = OuroborosConfig(prelude=1, recurrent=2, coda=1, rank=4, style=8, variant=variant)
    with torch.device("meta"):
        base = Transformer(cfg, [0, 2, 4])
        shapes = {t: getattr(*projection(base.layers["2"], t)).weight.shape for t in TARGETS}
        return Ouroboros(base, oc, {t: (torch.empty(4, i), torch.empty(o, 4)) for t, (o, i) in shapes.items()})


@pytest.mark.parametrize("variant", ["controller", "static", "none"])
def test_no_tensor_is_made_on_the_cpu_in_training_evaluation_and_decoding(variant):
    """What would fail on a GPU with "expected all tensors on the same device" (a torch.arange without its device,
    a mask built on the CPU): here every tensor lives on the meta device, and one made on the CPU fails the test."""
    model = meta_model(variant)
    ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    opt = torch.optim.AdamW(model.trainable().values())
    with NoCPU():
        for checkpointed, every in ((False, False), (True, True)):  # the plain loop, and --checkpoint-steps --readout every
            model.checkpoint_steps = checkpointed
            model(ids, 3, labels=ids, every=every).backward()
            torch.nn.utils.clip_grad_norm_(model.trainable().values(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            states = model.readout(ids, [1, 3])  # evaluation: one pass reads out every depth
            losses = [model.base.head(h, ids) for h in states.values()] + [model.base(ids, ids)]
            model.setup_caches(2, 10, 3)  # cached decoding: a prompt, then a token at a time
            model(ids, 3, pos=torch.arange(8, device="meta"))
            logits = model(ids[:, :1], 3, pos=torch.tensor([8], device="meta"))
    assert all(x.device.type == "meta" for x in losses + [logits])


def test_the_meta_check_catches_a_tensor_made_on_the_cpu():
    with pytest.raises(AssertionError, match="on the CPU"), NoCPU():
        torch.zeros(2, 8, device="meta") + torch.arange(8)
