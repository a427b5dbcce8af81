"""extras/memory.py: what the paper's 3B setting would train and hold, from its config.json alone, and the estimate
against a training step measured on this CPU."""
import contextlib
import io
import json
import os
import subprocess
import sys

import memory
from conftest import ROOT


def run(argv):
    """memory.main(argv); what it prints."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        memory.main(argv)
    return out.getvalue()


QWEN25_3B = {"model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
             "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6,
             "rope_theta": 1000000.0, "tie_word_embeddings": True, "max_position_embeddings": 32768,
             "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 70, "hidden_act": "silu"}


def test_dry_run_of_a_qwen25_3b_config(tmp_path):
    """The paper's 3B configuration from its config.json alone: the split, what trains (controller 692,864 at d=2048
    r=32 s=128; gate 2d^2 + d; a step norm row of d per step), and the peak memory of a step at each depth."""
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_3B))
    out = run(["--model", str(tmp_path), "--prelude", "8", "--recurrent", "18", "--coda", "8",
                "--device", "cpu", "--depths", "4,8,16"])
    lines = out.splitlines()
    assert lines[0] == (f"36 layers: prelude {list(range(8))}, recurrent 18, coda {list(range(28, 36))}, 19 removed")
    counts = {line.split()[0]: int(line.split()[1].replace(",", "")) for line in lines if line.endswith(" trainable")}
    assert counts == {"controller": 692_864, "gate": 8_390_656, "step_norm": 64 * 2048}
    d, ffn, kv, r = 2048, 11008, 256, 32  # the weights: 17 kept layers, the tied embedding, the bases, what trains
    layer = 2 * (d * d + d) + 2 * (d * kv + kv) - d + 3 * d * ffn + 2 * d
    bases = r * (4 * d + 2 * (d + kv) + 3 * (d + ffn))
    trained = sum(counts.values())
    weights = (4 * (17 * layer + 151936 * d + d + bases + trained) + 16 * trained) / 2**30  # + gradients, AdamW
    logits = 8 * 1024 * 151936 / 2**30  # a chunk of 1024 tokens' logits and their softmax, fp32
    (head,) = [line for line in lines if line.startswith("peak memory")]
    assert head == (f"peak memory of a step, batch 8 x 256, torch.float32, GiB: weights {weights:.2f} (with what "
                    f"trains, its gradients and AdamW's moments) + logits {logits:.2f} + activations:")
    rows = {int(line.split()[1][:-1]): [[float(x) for x in part.split()[-3::2]] for part in line.split(";")]
            for line in lines if line.startswith("  depth")}
    assert sorted(rows) == [4, 8, 16]
    for (kept, peak), (kept_ck, peak_ck) in rows.values():
        assert abs(peak - (weights + logits + kept)) <= 0.011 and abs(peak_ck - (weights + logits + kept_ck)) <= 0.011
        assert kept_ck < kept
    assert rows[4][0][0] < rows[8][0][0] < rows[16][0][0]  # activations grow with depth
    assert rows[16][1][0] - rows[4][1][0] < 0.2 * (rows[16][0][0] - rows[4][0][0])  # and barely, checkpointed


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
    """The estimated peak (the weights, what trains with AdamW, a chunk of the loss's logits, the activations counted
    on the meta device) against one training step measured on this CPU in fp32: the growth of its peak resident
    memory from before the model was built (sampled every millisecond), with and without --checkpoint-steps. (On an H200 at the Qwen2.5-3B shape
    it estimated 8.84 / 10.57 / 14.03 GiB at depths 4 / 8 / 16 where 9.53 / 11.55 / 15.59 were measured.)"""
    shape = dict(vocab_size=8192, hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                 num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True)
    (tmp_path / "config.json").write_text(json.dumps(dict(shape, model_type="llama", eos_token_id=0)))
    memory.main(["--model", str(tmp_path), "--prelude", "1", "--recurrent", "2", "--coda", "1", "--rank",
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
