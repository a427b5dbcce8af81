"""Benchmarks, one run, one table: every figure with the reference it is compared to, measured here.

    python extras/bench.py            # CPU: reduced shapes; GPU rows are listed as skipped
    python extras/bench.py --quick    # one timed repeat

Rows
 1. decoder forward, ours vs transformers' Qwen2ForCausalLM (SmolLM2-135M shape, batch 4 x 256)
 2. Ouroboros training step (forward + backward + AdamW), ours vs the same pruned-and-looped model
    assembled from transformers' Qwen2DecoderLayer the way the paper's code does it (diagonals set
    as module state, whole-sequence pooling, full logits); ours is timed with the same pooling (like
    for like) and with its default causal controller; tokens/s, MFU, peak memory
 3. controller overhead: one recurrent step with controller + SVD-LoRA + step norm + gate vs the
    bare layer (forward + backward)
 4. torch.compile of the recurrent step, on vs off
 5-6. the data pipeline's memory and speed: extras/bench_data.py
 7-8, 10-15. decoding: extras/bench_decode.py
 9. eval.py's per-window losses at depths 1, 4, 8, 16: one pass (the loop once, the coda reading out
    each depth) vs a forward per depth (8 windows of 256 tokens)
16. a training step with coda adapters (extras/coda_lora.py, r_c = 8 and 32) vs the controller alone
"""
import argparse
import dataclasses
import importlib.util
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402  (the reference's modules, from the repository root)
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from controller import TARGETS  # noqa: E402
from eval import per_window  # noqa: E402
from model import Ouroboros, OuroborosConfig, Qwen2Config, Transformer, projection, rope  # noqa: E402

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, rope_theta=1e5, rms_norm_eps=1e-5)
QWEN05 = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6)
QWEN3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
              num_attention_heads=16, num_key_value_heads=2, rope_theta=1e6)
H100_BF16_PEAK = 989e12  # dense bf16 tensor-core FLOP/s, H100 SXM datasheet


def turns(fns, reps=3):
    """Median of the seconds each fn() returns, after one warm-up call each. The calls take turns, so a
    change in the machine's speed (other load, clocks) hits every fn alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            ts.append(fn())
    return [statistics.median(ts) for ts in times]


def timed(fns, device, reps=3):
    """Median seconds of each whole fn() call, taking turns (turns); CUDA events time the GPU's queue."""
    return turns([lambda fn=fn: seconds(fn, device) for fn in fns], reps)


def seconds(fn, device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def step_memory(fn, device):
    """GiB that one call of fn allocates at its peak above what is already held (None on a CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - held) / 2**30


def random_ouroboros(shape: dict, dtype, device, **split):
    """Ouroboros on random weights of a model's shape: 8 + [the middle layer] + 8, rank 32, unless `split` says."""
    cfg = Qwen2Config(**shape, tie_word_embeddings=True)
    n = cfg.num_hidden_layers
    oc = OuroborosConfig(**{"prelude": 8, "recurrent": n // 2, "coda": 8, "rank": 32, **split})
    pre, r, post, _ = oc.split(n)
    torch.manual_seed(0)
    with torch.device(device):
        base = Transformer(cfg, pre + [r] + post)
        for name, p in base.named_parameters():  # scaled like a trained model (HF init std 0.02), not N(0, 1)
            if "norm" not in name:
                nn.init.normal_(p, std=0.02)
        base = base.to(dtype)
        lin = {t: getattr(*projection(base.layers[str(r)], t)) for t in TARGETS}
        bases = {t: (0.02 * torch.randn(oc.rank, m.in_features, dtype=dtype),
                     0.02 * torch.randn(m.out_features, oc.rank, dtype=dtype)) for t, m in lin.items()}
    model = Ouroboros(base, oc, bases)
    with torch.no_grad():  # off the zero initialisation, so every term is really computed
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    return model


def train_flops(cfg: Qwen2Config, oc: OuroborosConfig, B, T, depth, attention=True):
    """Matmul FLOPs of one training step (forward + backward), counted term by term.

    The base is frozen: its layers need activation gradients (1x their forward matmuls, 2x for
    attention) but no weight gradients, and nothing flows back into the prelude, nor into the input
    of step 0. The controller and gate also get weight gradients (3x their forward). Attention is
    counted at the causal half. tests/test_bench.py checks the matmul count against torch's own
    FlopCounterMode. Returns (whole training step, one recurrent step k >= 1, that step through the
    bare layer).
    """
    d, f, hd, s, r = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, oc.style, oc.rank
    q, kv, n = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, B * T
    mm = lambda rows, i, o: 2 * rows * i * o  # one [rows, i] @ [i, o]
    qkv = mm(n, d, q) + 2 * mm(n, d, kv)                              # the projections that read the layer input
    layer = qkv + mm(n, q, d) + 3 * mm(n, d, f)
    attn = 2 * mm(B * T, hd, T) * cfg.num_attention_heads / 2 if attention else 0  # QK^T and PV
    shapes = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f), "down": (f, d)}
    lora = sum(mm(n, i, r) + mm(n, r, o) for i, o in shapes.values())
    lora_qkv_in = sum(mm(n, r, shapes[t][0]) for t in ("q", "k", "v"))
    rows = n if oc.pool == "causal" else B                          # controller: per token or per sequence
    reads_h = mm(rows, d, 2 * s)
    controller = reads_h + mm(rows, 3 * s, 2 * s) + mm(rows, 2 * s, s) + len(shapes) * mm(rows, s, r)
    gate = mm(n, 2 * d, d)
    step = 2 * (layer + lora) + 3 * attn + 3 * (controller + gate)  # forward + backward
    first = step - qkv - lora_qkv_in - reads_h                      # step 0: its input needs no gradient
    head = mm(n, d, cfg.vocab_size)
    total = (oc.prelude * (layer + attn) + first + (depth - 1) * step
             + oc.coda * (2 * layer + 3 * attn) + 2 * head)
    return total, step, 2 * layer + 3 * attn


# ----------------------------------------------------------------------------------------------
# the reference: the paper's construction from transformers' own layers

class StatefulLoRA(nn.Module):
    """The paper's wrapper: the controller writes `c` into the module before each step."""

    def __init__(self, base, A, B, scale):
        super().__init__()
        self.base, self.A, self.B, self.scale, self.c = base, A, B, scale, None

    def forward(self, x):
        return self.base(x) + self.scale * ((x @ self.A.t()) * self.c) @ self.B.t()


class TransformersLooped(nn.Module):
    def __init__(self, ours: Ouroboros):
        super().__init__()
        from transformers import Qwen2Config as HFConfig
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding
        c = ours.base.config
        hf = HFConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps)
        hf._attn_implementation = "sdpa"
        device, dtype = ours.base.embed_tokens.weight.device, ours.base.embed_tokens.weight.dtype
        self.oc, self.rotary = ours.config, Qwen2RotaryEmbedding(hf).to(device)
        self.embed, self.norm, self.head = ours.base.embed_tokens, ours.base.norm, ours.base.lm_head
        self.prelude_ids, r, self.coda_ids, _ = ours.config.split(c.num_hidden_layers)
        self.layers = nn.ModuleDict()
        for i, layer in ours.base.layers.items():
            theirs = Qwen2DecoderLayer(hf, int(i)).to(device, dtype)
            theirs.load_state_dict({k.replace(".base.", "."): v for k, v in layer.state_dict().items()
                                    if not k.endswith((".A", ".B"))})
            self.layers[i] = theirs.requires_grad_(False)
        self.recurrent, self.loras = self.layers[str(r)], {}
        for t in TARGETS:
            lo = getattr(*projection(ours.recurrent, t))
            parent, name = projection(self.recurrent, t)
            self.loras[t] = StatefulLoRA(getattr(parent, name), lo.A, lo.B, lo.scale)
            setattr(parent, name, self.loras[t])
        self.controller, self.step_norm, self.gate = ours.controller, ours.step_norm, ours.gate

    def forward(self, ids, depth, labels):
        h = self.embed(ids)
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        pe = self.rotary(h, pos)
        run = lambda i, x: self.layers[str(i)](x, position_embeddings=pe, position_ids=pos)
        for i in self.prelude_ids:
            h = run(i, h)
        for k in range(depth):
            for t, c in self.controller(h, k, pos[0]).items():  # pool="mean": one diagonal per sequence
                self.loras[t].c = c
            h = self.gate(self.step_norm(self.recurrent(h, position_embeddings=pe, position_ids=pos), k), h)
        for i in self.coda_ids:
            h = run(i, h)
        logits = self.head(self.norm(h)).float()  # the full [B, T, V] logits, as the paper's code does
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


# ----------------------------------------------------------------------------------------------

def row_forward(device, dtype, reps):
    from transformers import Qwen2Config as HFConfig, Qwen2ForCausalLM
    cfg = Qwen2Config(**SMOLLM2, tie_word_embeddings=True)
    hf_cfg = HFConfig(**SMOLLM2, tie_word_embeddings=True)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    theirs = Qwen2ForCausalLM(hf_cfg).to(device, dtype).eval()
    ours = Transformer(cfg).to(device, dtype).eval()
    ours.load_state_dict({k.removeprefix("model."): v for k, v in theirs.state_dict().items()})
    ids = torch.randint(0, cfg.vocab_size, (4, 256), device=device)
    with torch.no_grad():
        delta = (ours(ids).float() - theirs(ids).logits.float()).abs().max().item()
        t_ours, t_theirs = timed([lambda: ours(ids), lambda: theirs(ids).logits], device, reps)
    tok = ids.numel()
    return (f"1. decoder forward, SmolLM2-135M shape, 4x256, {dtype_name(dtype)}",
            f"{tok / t_ours:,.0f} tok/s", f"{tok / t_theirs:,.0f} tok/s", t_theirs / t_ours,
            f"max|dlogits| {delta:.1e}")


def train_step(model, ids, labels, depth, autocast, pool):
    """One forward + backward + AdamW step, as a function for timed(); pool: the controller's pooling."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model.controller.causal = pool == "causal"  # ours and the reference share one controller
        with autocast:
            loss = model(ids, depth, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def row_train(shape_name, shape, device, dtype, reps, peak=None):
    B, T, depth = (2, 256, 4) if device.type == "cpu" else (2, 2048, 8)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    ids = torch.randint(0, shape["vocab_size"], (B, T), device=device)
    labels = torch.randint(0, shape["vocab_size"], (B, T), device=device)
    ours = random_ouroboros(shape, dtype, device, pool="mean")
    theirs = TransformersLooped(ours)
    # Like for like: the reference computes the paper's whole-sequence mean pooling, so ours is timed
    # with it too, and the two losses are checked equal on the same weights. Our default, the causal
    # controller, is timed alongside.
    with torch.no_grad(), autocast:
        delta = abs(ours(ids, depth, labels).item() - theirs(ids, depth, labels).item())
    steps = [train_step(model, ids, labels, depth, autocast, pool)
             for model, pool in ((ours, "mean"), (theirs, "mean"), (ours, "causal"))]
    t_o, t_t, t_causal = timed(steps, device, reps)
    m_o, m_t, m_causal = (step_memory(step, device) for step in steps)
    cfg, oc = ours.base.config, ours.config
    flops = train_flops(cfg, oc, B, T, depth)[0]
    flops_causal = train_flops(cfg, dataclasses.replace(oc, pool="causal"), B, T, depth)[0]
    note = f"{flops / 1e12:.2f} TFLOP/step; |dloss| {delta:.1e}"
    causal = f"causal controller (our default): {B * T / t_causal:,.0f} tok/s"
    if peak:
        note += f"; MFU {flops / t_o / peak:.0%} vs {flops / t_t / peak:.0%}"
        causal += f", MFU {flops_causal / t_causal / peak:.0%}"
    if m_o is not None:
        weights = torch.cuda.memory_allocated() / 2**30
        note += f"; step memory {m_o:.1f} vs {m_t:.1f} GiB above the {weights:.1f} GiB both models hold"
        causal += f", {m_causal:.1f} GiB"
    return (f"2. train step {shape_name}, {B}x{T}, depth {depth}, {dtype_name(dtype)}, mean pool",
            f"{B * T / t_o:,.0f} tok/s", f"{B * T / t_t:,.0f} tok/s", t_t / t_o, f"{note}; {causal}")


def row_overhead(device, dtype, reps):
    model = random_ouroboros(SMOLLM2, dtype, device)
    B, T = 4, 256
    h = torch.randn(B, T, SMOLLM2["hidden_size"], device=device, dtype=dtype, requires_grad=True)
    tables = rope(model.base.config, torch.arange(T, device=device), dtype)

    def bare():
        model.recurrent(h, tables).sum().backward()

    def full():
        model.step(h, 3, tables).sum().backward()

    t_full, t_bare = timed([full, bare], device, reps)
    _, step, bare_flops = train_flops(model.base.config, model.config, B, T, 1)
    return (f"3. one recurrent step (fwd+bwd), SmolLM2 shape, {B}x{T}, {dtype_name(dtype)}",
            f"{t_full * 1e3:.1f} ms controller", f"{t_bare * 1e3:.1f} ms bare layer", t_bare / t_full,
            f"controller step costs {t_full / t_bare:.2f}x the bare layer; its FLOPs are {step / bare_flops:.2f}x")


def row_compile(device, dtype, reps):
    B, T, depth = (2, 256, 4) if device.type == "cpu" else (4, 2048, 8)
    model = random_ouroboros(SMOLLM2, dtype, device)
    ids = torch.randint(0, SMOLLM2["vocab_size"], (B, T), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    eager_step, compiled_step = model.step, torch.compile(model.step)  # as train.py --compile

    def run(step_fn):
        def step():
            model.step = step_fn
            with autocast:
                model(ids, depth=depth, labels=ids).backward()
        return step

    t = time.perf_counter()
    run(compiled_step)()  # compiles k = 0, then once more with k symbolic
    if device.type == "cuda":
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - t
    compiled, eager = timed([run(compiled_step), run(eager_step)], device, reps)
    return (f"4. torch.compile of the step, SmolLM2 shape, {B}x{T}, depth {depth}, {dtype_name(dtype)}",
            f"{B * T / compiled:,.0f} tok/s compiled", f"{B * T / eager:,.0f} tok/s eager", eager / compiled,
            f"first compiled step {compile_s:.0f}s")


def row_readout(device, dtype, reps, depths=(1, 4, 8, 16), batch=8, T=256):
    model = random_ouroboros(SMOLLM2, dtype, device).eval()
    ids, labels = (torch.randint(0, SMOLLM2["vocab_size"], (batch, T), device=device) for _ in range(2))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    with torch.no_grad(), autocast:
        losses = lambda h: per_window(lambda b, y: model.base.head(h[b:b + 1], y), batch, [labels])  # as eval.py
        one = lambda: [losses(h) for h in model.readout(ids, list(depths)).values()]
        each = lambda: [losses(model.readout(ids, [d])[d]) for d in depths]
        delta = max((a - b).abs().max().item() for a, b in zip(one(), each()))
        t_one, t_each = timed([one, each], device, reps)
    shown = ", ".join(map(str, depths))
    return (f"9. eval losses at depths {shown}, SmolLM2 shape, {batch} x {T}, {dtype_name(dtype)}",
            f"{batch / t_one:.2f} windows/s one pass", f"{batch / t_each:.2f} windows/s a forward per depth",
            t_each / t_one, f"max|dloss| {delta:.1e}")


def row_coda(device, dtype, reps):
    B, T, depth = (2, 256, 4) if device.type == "cpu" else (2, 2048, 8)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    ids, labels = (torch.randint(0, SMOLLM2["vocab_size"], (B, T), device=device) for _ in range(2))
    models = [random_ouroboros(SMOLLM2, dtype, device, adapters=a)
              for a in ("", "extras.coda_lora:r8", "extras.coda_lora:r32")]
    alone, r8, r32 = timed([train_step(m, ids, labels, depth, autocast, "causal") for m in models], device, reps)
    n = [f"{sum(p.numel() for p in m.trainable().values()):,}" for m in models]
    return (f"16. train step with coda adapters, SmolLM2 shape, {B}x{T}, depth {depth}, {dtype_name(dtype)}",
            f"{B * T / r8:,.0f} tok/s r_c = 8", f"{B * T / alone:,.0f} tok/s the controller alone", alone / r8,
            f"r_c = 32: {B * T / r32:,.0f} tok/s, {alone / r32:.2f}x; trainable {n[1]} (r_c = 8), {n[2]} (32), "
            f"{n[0]} (alone)")


def dtype_name(dtype):
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one timed repeat instead of three")
    p.add_argument("--skip-compile", action="store_true")
    a = p.parse_args()
    reps = 1 if a.quick else 3
    cpu, rows, skipped = torch.device("cpu"), [], []
    gpu = torch.device("cuda") if torch.cuda.is_available() else None
    have_hf = importlib.util.find_spec("transformers") is not None  # optional: the reference for rows 1-2
    if not have_hf:
        skipped.append("rows 1-2: transformers is not installed (pip install -r requirements-test.txt)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, GPU: "
          f"{torch.cuda.get_device_name() if gpu else 'none'}", flush=True)
    if have_hf:
        rows.append(row_forward(cpu, torch.float32, reps))
        if gpu:
            rows.append(row_forward(gpu, torch.bfloat16, reps))
            torch.backends.cuda.matmul.allow_tf32 = True
            for name, shape in (("Qwen2.5-0.5B shape", QWEN05), ("Qwen2.5-3B shape", QWEN3B)):
                rows.append(row_train(name, shape, gpu, torch.bfloat16, reps, peak=H100_BF16_PEAK))
        else:
            rows.append(row_train("SmolLM2 shape", SMOLLM2, cpu, torch.float32, reps))
            skipped.append("row 2 at Qwen2.5-0.5B / 3B shapes, 2x2048, depth 8, bf16: needs a CUDA GPU")
    rows.append(row_overhead(cpu, torch.float32, reps))
    if gpu:
        rows.append(row_overhead(gpu, torch.bfloat16, reps))
    if not a.skip_compile:
        rows.append(row_compile(gpu or cpu, torch.bfloat16 if gpu else torch.float32, reps))
    else:
        skipped.append("row 4: --skip-compile")
    if not gpu:
        skipped.append("bf16 rows and MFU against the H100 peak: no CUDA GPU here")
    rows.append(row_readout(gpu or cpu, torch.bfloat16 if gpu else torch.float32, reps))
    rows.append(row_coda(gpu or cpu, torch.bfloat16 if gpu else torch.float32, reps))

    print("\n| benchmark | ours | reference | ratio (ours faster if > 1) | notes |\n|---|---|---|---|---|")
    for name, ours, ref, ratio, note in rows:
        print(f"| {name} | {ours} | {ref} | {ratio:.2f}x | {note} |")
    for s in skipped:
        print(f"skipped: {s}")


if __name__ == "__main__":
    main()
