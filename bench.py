"""Benchmarks, one run, one table: every figure with the reference it is compared to, measured here.

    python bench.py            # CPU: reduced shapes; GPU rows are listed as skipped
    python bench.py --quick    # fewer repeats

Rows
 1. decoder forward, ours vs transformers' Qwen2ForCausalLM (SmolLM2-135M shape, batch 4 x 256)
 2. Ouroboros training step (forward + backward + AdamW), ours vs the same pruned-and-looped model
    assembled from transformers' Qwen2DecoderLayer the way the paper's code does it (diagonals set
    as module state, whole-sequence pooling, full logits); tokens/s, MFU, peak memory
 3. controller overhead: one recurrent step with controller + SVD-LoRA + step norm + gate vs the
    bare layer (forward + backward)
 4. torch.compile of the recurrent step, on vs off
"""
import argparse
import importlib.util
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from controller import TARGETS
from model import Ouroboros, OuroborosConfig, Qwen2Config, Transformer, projection

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, rope_theta=1e5, rms_norm_eps=1e-5)
QWEN05 = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6)
QWEN3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
              num_attention_heads=16, num_key_value_heads=2, rope_theta=1e6)
H100_BF16_PEAK = 989e12  # dense bf16 tensor-core FLOP/s, H100 SXM datasheet


def timed(fn, device, warmup=1, reps=3):
    """Median seconds of fn() after warm-up; CUDA events on a GPU, so no host clock races the queue."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def random_ouroboros(shape: dict, prelude, coda, rank, dtype, device, pool="causal"):
    cfg = Qwen2Config(**shape, tie_word_embeddings=True)
    n = cfg.num_hidden_layers
    oc = OuroborosConfig(prelude, n // 2, coda, rank, pool=pool)
    pre, r, post, _ = oc.split(n)
    torch.manual_seed(0)
    with torch.device(device):
        base = Transformer(cfg, pre + [r] + post).to(dtype)
        lin = {t: getattr(*projection(base.layers[str(r)], t)) for t in TARGETS}
        bases = {t: (0.02 * torch.randn(rank, m.in_features, dtype=dtype), 0.02 * torch.randn(m.out_features, rank, dtype=dtype))
                 for t, m in lin.items()}
    model = Ouroboros(base, oc, bases)
    with torch.no_grad():  # off the zero initialisation, so every term is really computed
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    return model


def train_flops(cfg: Qwen2Config, oc: OuroborosConfig, B, T, depth):
    """Matmul FLOPs of one training step. The base is frozen: its layers need activation gradients
    (1x their forward) but no weight gradients, and nothing flows back into the prelude."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    tokens = B * T
    linear = 2 * tokens * (d * q + 2 * d * kv + q * d + 3 * d * f)
    attention = 2 * 2 * B * T * T * q / 2  # QK^T and PV, causal half
    layer_fwd, layer_bwd = linear + attention, linear + 2 * attention
    lora = 2 * tokens * oc.rank * (2 * (d + q) + 2 * (d + kv) * 2 + 2 * (d + f) * 2 + (f + d))
    trainable = 2 * tokens * (2 * d * d + d * 2 * oc.style) * 3  # gate + controller input: fwd, act grad, weight grad
    head = 2 * tokens * d * cfg.vocab_size
    return (oc.prelude * layer_fwd + depth * (layer_fwd + layer_bwd + 2 * lora + trainable)
            + oc.coda * (layer_fwd + layer_bwd) + 2 * head)


# ----------------------------------------------------------------------------------------------
# the reference: the paper's construction from transformers' own layers

class StatefulLoRA(nn.Module):
    """The paper's wrapper: the controller writes `c` into the module before each step."""

    def __init__(self, base, A, B, scale):
        super().__init__()
        self.base, self.A, self.B, self.scale, self.c = base, A, B, scale, None

    def forward(self, x):
        return self.base(x) + self.scale * ((x @ self.A.t()) * self.c[:, None]) @ self.B.t()


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
        self.layers = nn.ModuleDict()
        for i, layer in ours.base.layers.items():
            theirs = Qwen2DecoderLayer(hf, int(i)).to(device, dtype)
            theirs.load_state_dict({k.replace(".base.", "."): v for k, v in layer.state_dict().items()
                                    if not k.endswith((".A", ".B"))})
            self.layers[i] = theirs.requires_grad_(False)
        r = str(ours.recurrent_id)
        self.recurrent, self.loras = self.layers[r], {}
        for t in TARGETS:
            lo = getattr(*projection(ours.recurrent, t))
            parent, name = projection(self.recurrent, t)
            self.loras[t] = StatefulLoRA(getattr(parent, name), lo.A, lo.B, lo.scale)
            setattr(parent, name, self.loras[t])
        self.prelude_ids, self.coda_ids = ours.prelude_ids, ours.coda_ids
        self.controller, self.step_norm, self.gate = ours.diagonals, ours.step_norm, ours.gate

    def forward(self, ids, depth, labels):
        h = self.embed(ids)
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        pe = self.rotary(h, pos)
        run = lambda i, x: self.layers[str(i)](x, position_embeddings=pe, position_ids=pos)
        for i in self.prelude_ids:
            h = run(i, h)
        for k in range(depth):
            for t, c in self.controller(h, k).items():  # pool="mean": one diagonal per sequence
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
        t_ours = timed(lambda: ours(ids), device, reps=reps)
        t_theirs = timed(lambda: theirs(ids).logits, device, reps=reps)
    tok = ids.numel()
    return (f"1. decoder forward, SmolLM2-135M shape, 4x256, {dtype_name(dtype)}",
            f"{tok / t_ours:,.0f} tok/s", f"{tok / t_theirs:,.0f} tok/s", t_theirs / t_ours, f"max|dlogits| {delta:.1e}")


def time_train_step(model, ids, labels, depth, device, autocast, reps):
    """(seconds per forward + backward + AdamW step, peak GPU GiB or None)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with autocast:
            loss = model(ids, depth, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, device, reps=reps)
    return seconds, torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def row_train(shape_name, shape, B, T, depth, device, dtype, reps, prelude=8, coda=8, peak=None):
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    ids = torch.randint(0, shape["vocab_size"], (B, T), device=device)
    labels = torch.randint(0, shape["vocab_size"], (B, T), device=device)
    ours = random_ouroboros(shape, prelude, coda, 32, dtype, device)
    t_o, m_o = time_train_step(ours, ids, labels, depth, device, autocast, reps)
    # The reference, built on the same weights, must compute what ours computes with pool="mean".
    theirs = TransformersLooped(ours)
    ours.diagonals.pool = "mean"
    with torch.no_grad(), autocast:
        delta = abs(ours(ids, depth, labels).item() - theirs(ids, depth, labels).item())
    t_t, m_t = time_train_step(theirs, ids, labels, depth, device, autocast, reps)
    cfg = Qwen2Config(**shape)
    flops = train_flops(cfg, OuroborosConfig(prelude, cfg.num_hidden_layers // 2, coda), B, T, depth)
    mfu = f", MFU {flops / t_o / peak:.0%} vs {flops / t_t / peak:.0%}" if peak else ""
    mem = f", peak {m_o:.1f} vs {m_t:.1f} GiB" if m_o is not None else ""
    return (f"2. train step {shape_name}, {B}x{T}, depth {depth}, {dtype_name(dtype)}",
            f"{B * T / t_o:,.0f} tok/s", f"{B * T / t_t:,.0f} tok/s", t_t / t_o,
            f"{flops / 1e12:.2f} TFLOP/step{mfu}{mem}; |dloss| vs ours {delta:.1e}")


def row_overhead(device, dtype, reps):
    model = random_ouroboros(SMOLLM2, 8, 8, 32, dtype, device)
    h = torch.randn(4, 256, 576, device=device, dtype=dtype, requires_grad=True)
    cos, sin = model.base.rope(256, h)

    def bare():
        model.recurrent(h, cos, sin).sum().backward()

    def full():
        model.step(h, 3, cos, sin).sum().backward()

    t_bare, t_full = timed(bare, device, reps=reps), timed(full, device, reps=reps)
    return (f"3. one recurrent step (fwd+bwd), SmolLM2 shape, 4x256, {dtype_name(dtype)}",
            f"{t_full * 1e3:.1f} ms controller", f"{t_bare * 1e3:.1f} ms bare layer", t_bare / t_full,
            f"controller step costs {t_full / t_bare:.2f}x the bare layer")


def row_compile(device, dtype, reps):
    B, T, depth = (2, 256, 4) if device.type == "cpu" else (4, 2048, 8)
    model = random_ouroboros(SMOLLM2, 8, 8, 32, dtype, device)
    ids = torch.randint(0, 49152, (B, T), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def step():
        with autocast:
            model(ids, depth=depth, labels=ids).backward()

    eager = timed(step, device, reps=reps)
    eager_step = model.step
    model.step = torch.compile(eager_step)  # as train.py --compile: k symbolic after one recompile
    t = time.perf_counter()
    step()
    compile_s = time.perf_counter() - t
    compiled = timed(step, device, warmup=1, reps=reps)
    return (f"4. torch.compile of the step, SmolLM2 shape, {B}x{T}, depth {depth}, {dtype_name(dtype)}",
            f"{B * T / compiled:,.0f} tok/s compiled", f"{B * T / eager:,.0f} tok/s eager", eager / compiled,
            f"first compiled step {compile_s:.0f}s")


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
                rows.append(row_train(name, shape, 2, 2048, 8, gpu, torch.bfloat16, reps, peak=H100_BF16_PEAK))
        else:
            rows.append(row_train("SmolLM2 shape", SMOLLM2, 2, 256, 4, cpu, torch.float32, reps))
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

    print("\n| benchmark | ours | reference | ratio (ours faster if > 1) | notes |\n|---|---|---|---|---|")
    for name, ours, ref, ratio, note in rows:
        print(f"| {name} | {ours} | {ref} | {ratio:.2f}x | {note} |")
    for s in skipped:
        print(f"skipped: {s}")


if __name__ == "__main__":
    main()
