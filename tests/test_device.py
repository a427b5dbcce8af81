"""The GPU's code path, as far as a CPU can exercise it: training, evaluation and cached decoding with every tensor on
a device that is not the CPU (the meta device), and --dry-run's memory estimate against a step measured here."""
import json
import os
import subprocess
import sys

import pytest
import torch
import train
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from controller import TARGETS
from model import Ouroboros, OuroborosConfig, Qwen2Config, Transformer, projection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
            losses = [model.base.head(h, ids) for h in states.values()] + [model.pruned(ids, ids)]
            model.setup_caches(2, 10, 3)  # cached decoding: a prompt, then a token at a time
            model(ids, 3, pos=torch.arange(8, device="meta"))
            logits = model(ids[:, :1], 3, pos=torch.tensor([8], device="meta"))
    assert all(x.device.type == "meta" for x in losses + [logits])


def test_the_meta_check_catches_a_tensor_made_on_the_cpu():
    with pytest.raises(AssertionError, match="on the CPU"), NoCPU():
        torch.zeros(2, 8, device="meta") + torch.arange(8)


STEP = """import json, os, sys, threading, time, torch
sys.path.insert(0, {root!r})
from load_qwen import load_config
from model import Ouroboros, OuroborosConfig, Transformer, projection
from controller import TARGETS
def anon():  # resident bytes less those of mapped files (the libraries, which a busy machine may page out)
    resident, shared = map(int, open("/proc/self/statm").read().split()[1:3])
    return (resident - shared) * os.sysconf("SC_PAGE_SIZE")
peak, done = [0], threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.001)
cfg = load_config({folder!r})
oc = OuroborosConfig(prelude=1, recurrent=2, coda=1, rank=16)
before = anon()
threading.Thread(target=watch, daemon=True).start()
base = Transformer(cfg, [0, 2, 5])
shapes = {{t: getattr(*projection(base.layers["2"], t)).weight.shape for t in TARGETS}}
model = Ouroboros(base, oc, {{t: (0.02 * torch.randn(16, i), 0.02 * torch.randn(o, 16)) for t, (o, i) in shapes.items()}})
model.checkpoint_steps = sys.argv[1] == "1"
ids = torch.randint(0, cfg.vocab_size, (4, 512))
opt = torch.optim.AdamW(model.trainable().values())
model(ids, 4, labels=ids).backward()
opt.step()
done.set()
print(json.dumps((peak[0] - before) / 2**30))
"""


def test_dry_run_estimates_the_peak_memory_of_a_step_within_25_percent(tmp_path, capsys):
    """--dry-run's peak (the weights, what trains with AdamW, a chunk of the loss's logits, the activations counted
    on the meta device) against one training step measured on this CPU in fp32: the growth of its peak resident
    memory from before the model was built (sampled every millisecond), with and without --checkpoint-steps. (On an H200 at the Qwen2.5-3B shape
    it estimated 8.84 / 10.57 / 14.03 GiB at depths 4 / 8 / 16 where 9.53 / 11.55 / 15.59 were measured.)"""
    shape = dict(vocab_size=8192, hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                 num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True)
    (tmp_path / "config.json").write_text(json.dumps(dict(shape, model_type="llama", eos_token_id=0)))
    train.main(["--model", str(tmp_path), "--dry-run", "--prelude", "1", "--recurrent", "2", "--coda", "1", "--rank",
                "16", "--batch-size", "4", "--seq-len", "512", "--depths", "4", "--device", "cpu"])
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  depth")][0]
    estimate = [float(part.split()[-1]) for part in row.split(";")]
    script = tmp_path / "step.py"
    script.write_text(STEP.format(root=ROOT, folder=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")  # large blocks go back at free
    measured = [json.loads(subprocess.run([sys.executable, str(script), flag], capture_output=True, text=True, env=env,
                                          check=True).stdout) for flag in ("0", "1")]
    print(f"estimated {estimate} GiB, measured {measured} GiB")
    for e, m in zip(estimate, measured):
        assert abs(e - m) <= 0.25 * m
