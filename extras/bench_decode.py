"""Benchmarks of decoding (bench.py's rows 7, 8 and 10-15), each against a reference measured in the
same run, the two sides taking turns.

    python extras/bench_decode.py               # random weights of SmolLM2's shape, and the converted
                                                # SmolLM2 itself against transformers' generate()
    python extras/bench_decode.py --run runs/compare/every-readout-s0 --exit 0.3   # only row 12: a run's exit

Rows
 7. decoding one token at 512 tokens of context, Ouroboros at depth 8, batch 1: the KV cache vs
    recomputing the whole sequence; the cache's memory per token
 8. prefill of a 512-token prompt into the cache vs the plain forward of the same tokens
10. the full model decoding 64 tokens after a 512-token prompt, batch 1, greedy: generate.generate (cached) vs
    transformers' generate() on the same weights and dtype (fp32, bf16), with the tokens compared, and the share
    of the bound that the matrix-vector bandwidth (measured again in the row) sets
11. this machine's streaming matrix-vector bandwidth (fp32, bf16), and the decode speed it bounds
12. decoding at batch 1 with a run's learned exit vs its deepest fixed depth (--run, --exit)
13. bf16 weights decoding with the K/V in fp32 (setup_caches' choice on a CPU) vs in bf16: the full
    model, and Ouroboros at depth 8
14. where a decoded token's time goes: the model's matrix-vector products alone vs the whole step
15. bf16 against fp32 on real text: the same top-1 next token, greedy tokens identical
"""
import argparse
import importlib.util
import json.decoder
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402  (the reference's modules, from the repository root)
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import SMOLLM2, dtype_name, random_ouroboros, seconds, timed, turns  # noqa: E402
from data import load_splits  # noqa: E402
from eval import load_run  # noqa: E402
from exits import attach_exit_head, decode  # noqa: E402
from generate import generate  # noqa: E402
from load_qwen import DEFAULT_MODEL, load_model, load_tokenizer  # noqa: E402
from model import KVCache  # noqa: E402
from train import cli  # noqa: E402

DOC = "/usr/share/doc/python3.11/html/_sources/library/functions.rst.txt"  # real text, as in test_qwen_gguf


def greedy(logits):
    return logits.argmax(-1, keepdim=True)


def rows_decode(device, dtype, reps, context=512, depth=8):
    model = random_ouroboros(SMOLLM2, dtype, device).eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    ids = torch.randint(0, SMOLLM2["vocab_size"], (1, context + 1), device=device)
    pos = torch.arange(context + 1, device=device)

    def prefill():  # into fresh caches
        model.setup_caches(1, context + 1, depth)
        return model(ids[:, :-1], depth, pos=pos[:-1])

    def cached():  # the last token, after `context` cached ones: rewinding the controller's running sums makes
        model.sums.copy_(sums)  # every call the same
        return model(ids[:, -1:], depth, pos=pos[-1:])

    with torch.no_grad(), autocast:
        prefill()
        sums = model.sums.clone()
        delta = (cached()[0, -1].float() - model(ids, depth)[0, -1].float()).abs().max().item()
        t_cached, t_full = timed([cached, lambda: model(ids, depth)], device, reps)
        t_prefill, t_forward = timed([prefill, lambda: model(ids[:, :-1], depth)], device, reps)
    shape = f"SmolLM2 shape, 8 + [15] x {depth} + 8, batch 1, {dtype_name(dtype)}"
    caches = [layer.self_attn.kv_cache for layer in model.prelude + model.coda] + list(model.step_caches)
    kib = sum(2 * c.k[0, :, 0].numel() * c.k.element_size() for c in caches) / 2**10
    return [(f"7. decode one token after {context} of context, {shape}", f"{1 / t_cached:,.1f} tok/s KV cache",
             f"{1 / t_full:,.2f} tok/s recomputing the sequence", t_full / t_cached,
             f"KV cache {kib:.1f} KiB per token ({len(caches)} caches); max|dlogits| vs the full forward {delta:.1e}"),
            (f"8. prefill {context} tokens, {shape}", f"{context / t_prefill:,.0f} tok/s into the cache",
             f"{context / t_forward:,.0f} tok/s plain forward", t_forward / t_prefill, "")]


def matvec_bandwidth(dtype, device, reps=3, n=8192) -> float:
    """Bytes per second that a [n, n] @ [n] product streams, this machine's bound for decoding weights."""
    W, x = torch.randn(n, n, device=device).to(dtype), torch.randn(n, device=device).to(dtype)
    (t,) = timed([lambda: W @ x], device, reps)
    return W.numel() * W.element_size() / t


def row_generate(model_dir, dtype, device, reps, context=512, new=64):
    """generate.generate, cached (under autocast in bf16, as generate.py runs it), against transformers'
    generate(): both timed after the prompt's pass (theirs: `new` tokens less 1 token's time)."""
    from transformers import AutoModelForCausalLM
    ours = load_model(model_dir, dtype, device)
    theirs = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    prompt = torch.randint(0, ours.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)
    ours.setup_caches(1, context + new)

    def ours_decode():
        with torch.autocast(device.type, torch.bfloat16, enabled=dtype == torch.bfloat16):
            return generate(lambda ids, pos: ours(ids, pos=pos), prompt, new, greedy)

    hf = lambda n: theirs.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, context:].tolist()
    with torch.no_grad():
        same = ours_decode()[0] == hf(new)
        t_ours, t_hf, t_hf1 = turns([lambda: ours_decode()[2], lambda: seconds(lambda: hf(new), device),
                                     lambda: seconds(lambda: hf(1), device)], reps)
    ours_tps, hf_tps = (new - 1) / t_ours, (new - 1) / (t_hf - t_hf1)
    weights = sum(p.numel() * p.element_size() for p in ours.parameters())
    bound = matvec_bandwidth(dtype, device, reps) / weights
    return (f"10. decode {new} tokens after {context}, SmolLM2-135M, batch 1, greedy, {dtype_name(dtype)}",
            f"{ours_tps:,.1f} tok/s generate.generate", f"{hf_tps:,.1f} tok/s transformers generate()",
            ours_tps / hf_tps, f"tokens identical: {same}; {ours_tps / bound:.0%} of the {bound:,.1f} tok/s that the "
            f"matrix-vector bandwidth measured in this row bounds for {weights / 2**20:,.0f} MiB of weights")


def row_kv_dtype(model_dir, device, reps, context=512, new=64, depth=8):
    """bf16 weights, decoding with the K/V (and attention) in fp32, as setup_caches keeps them on a CPU, vs in
    bf16 as before: the full model, and Ouroboros at depth 8 on random weights of its shape."""
    full, ouro = load_model(model_dir, torch.bfloat16, device), random_ouroboros(SMOLLM2, torch.bfloat16, device)
    prompt = torch.randint(0, SMOLLM2["vocab_size"], (1, context), generator=torch.Generator().manual_seed(0))
    models = (("SmolLM2-135M", full, lambda: full.setup_caches(1, context + new),
               lambda ids, pos: full(ids, pos=pos)),
              (f"Ouroboros 8 + [15] x {depth} + 8", ouro, lambda: ouro.setup_caches(1, context + new, depth),
               lambda ids, pos: ouro(ids, depth, pos=pos)))
    out = []
    for name, model, setup, forward in models:
        def run(kv):
            setup()
            for cache in [m for m in model.modules() if isinstance(m, KVCache)]:
                cache.to(kv)  # fp32 is setup_caches' choice on a CPU; bf16 the path before it
            return generate(forward, prompt.to(device), new, greedy)
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16):
            same = run(torch.float32)[0] == run(torch.bfloat16)[0]
            t32, t16 = turns([lambda: run(torch.float32)[2], lambda: run(torch.bfloat16)[2]], reps)
        out.append((f"13. decode {new} tokens after {context}, {name}, batch 1, greedy, bf16 weights",
                    f"{(new - 1) / t32:,.1f} tok/s K/V in fp32", f"{(new - 1) / t16:,.1f} tok/s K/V in bf16 "
                    "(the path before)", t16 / t32, f"tokens identical: {same}"))
    return out


def row_profile(model_dir, dtype, device, reps, context=512, new=32):
    """Where one decoded token's time goes: the model's own matrix-vector products alone (its weights, at
    its shapes, in the order decoding reads them) against the whole cached decode step."""
    model = load_model(model_dir, dtype, device)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]  # the layers' q k v o gate up down, lm_head
    inputs = [torch.randn(1, m.in_features, dtype=dtype, device=device) for m in linears]
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))

    def matvecs():
        start = time.perf_counter()
        for m, x in zip(linears, inputs):
            F.linear(x, m.weight, m.bias)
        return time.perf_counter() - start

    def decoding():  # `new` tokens decoded after the prompt's pass
        return generate(lambda ids, pos: model(ids, pos=pos), prompt.to(device), new + 1, greedy)[2] / new
    model.setup_caches(1, context + new)
    with torch.no_grad():
        t_mv, t_token = turns([matvecs, decoding], reps)
    gbs = sum(m.weight.numel() * m.weight.element_size() for m in linears) / t_mv / 1e9
    return (f"14. one decoded token, SmolLM2-135M, batch 1, {dtype_name(dtype)}: its {len(linears)} matrix-vector "
            "products alone vs the whole step", f"{t_mv * 1e3:,.1f} ms matrix-vector products ({gbs:,.1f} GB/s)",
            f"{t_token * 1e3:,.1f} ms the decode step", None, f"{t_mv / t_token:.0%} of the step; the rest "
            f"({(t_token - t_mv) * 1e3:,.1f} ms): attention, norms, RoPE, the cache, Python and dispatch")


def row_bandwidth(device, reps):
    fp32, bf16 = (matvec_bandwidth(d, device, reps) for d in (torch.float32, torch.bfloat16))
    return ("11. streaming matrix-vector product, 8192 x 8192", f"{fp32 / 1e9:,.1f} GB/s fp32",
            f"{bf16 / 1e9:,.1f} GB/s bf16", fp32 / bf16, "decoding one token reads every weight once: this bounds it")


def row_exit(run, threshold, device, reps, context=64, new=64):
    """Batch 1 with the learned exit against the run's deepest depth: greedy tokens after a prompt of its
    held-out text, timed after the prompt's pass."""
    model, cfg = load_run(run, torch.float32, device)
    attach_exit_head(model, run)
    depth, steps = max(cfg.depths), []
    prompt = torch.tensor(load_splits(cfg)[1][:context].astype("int64"), device=device)[None]

    def with_exit(ids, pos):
        logits, ran = decode(model, ids, pos, ("learned", threshold))
        steps.append(ran)
        return logits

    def run_with(forward):  # `new` tokens decoded after the prompt's pass
        model.setup_caches(1, context + new, depth)
        return generate(forward, prompt, new + 1, greedy)[2]

    fixed = lambda ids, pos: model(ids, depth, pos=pos)
    with torch.no_grad():
        run_with(with_exit)
        mean = torch.cat([s.flatten() for s in steps[1:]]).float().mean().item()  # after the prompt
        t_exit, t_full = turns([lambda: run_with(with_exit), lambda: run_with(fixed)], reps)
    return (f"12. decode {new} tokens after {context} of held-out text, batch 1, greedy, {run}, learned exit < "
            f"{threshold:g} vs depth {depth}", f"{new / t_exit:,.1f} tok/s with the exit", f"{new / t_full:,.1f} "
            f"tok/s at depth {depth}", t_full / t_exit, f"{mean:.2f} recurrent steps per new token instead of {depth}")


def row_agreement(model_dir, device, windows=8, length=256, new=48):
    """bf16 against fp32 on documentation text: how often the plain forwards rank the same next token first
    (teacher-forced), and how many greedy tokens, decoded through the cache, stay identical after a prompt of it."""
    tok = load_tokenizer(model_dir)
    text_file = DOC if os.path.isfile(DOC) else json.decoder.__file__  # Python's docs, or a stdlib source
    text = open(text_file, encoding="utf-8").read()
    ids = torch.tensor(tok.encode(text).ids[:windows * length], device=device).view(windows, length)
    fp32, bf16 = (load_model(model_dir, dtype, device) for dtype in (torch.float32, torch.bfloat16))
    with torch.no_grad():
        a, b = fp32(ids), bf16(ids).float()
        same_top = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        logp = [lg.log_softmax(-1).gather(-1, ids[:, 1:, None]) for lg in (a, b)]  # of the true next token
        dlogp = (logp[0] - logp[1]).abs().mean().item()
        runs = []
        for model in (fp32, bf16):
            model.setup_caches(1, 64 + new)
            runs.append(generate(lambda x, pos: model(x, pos=pos), ids[:1, :64], new, greedy)[0])
    first = next((i for i, (x, y) in enumerate(zip(*runs)) if x != y), new)
    return (f"15. bf16 vs fp32, SmolLM2-135M, {windows} x {length} tokens of {os.path.basename(text_file)}",
            f"{same_top:.1%} same top-1 next token", f"{dlogp:.3f} mean absolute difference of log p(true next token)",
            None, f"greedy after 64 of its tokens: the first {first} of {new} identical")


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one timed repeat instead of three")
    p.add_argument("--run", default=None, help="only row 12, of this run with an exit head (extras/exits.py head)")
    p.add_argument("--exit", type=float, default=0.3, help="row 12's threshold on 1 - lambda")
    a = p.parse_args(argv)
    reps, cpu = 1 if a.quick else 3, torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads", flush=True)
    table([row_exit(a.run, a.exit, cpu, reps)] if a.run else every_row(cpu, reps))


def every_row(cpu, reps):
    yield from rows_decode(cpu, torch.float32, reps)
    if importlib.util.find_spec("transformers") is None:
        print("skipped: row 10, transformers is not installed (pip install -r requirements-test.txt)")
    else:
        yield from (row_generate(DEFAULT_MODEL, dtype, cpu, reps) for dtype in (torch.float32, torch.bfloat16))
    yield row_bandwidth(cpu, reps)
    yield from row_kv_dtype(DEFAULT_MODEL, cpu, reps)
    yield from (row_profile(DEFAULT_MODEL, dtype, cpu, reps) for dtype in (torch.float32, torch.bfloat16))
    yield row_agreement(DEFAULT_MODEL, cpu)


def table(rows):
    """Print each row as it is measured, so that a failure late in the run keeps the rows before it."""
    print("\n| benchmark | ours | reference | ratio (ours faster if > 1) | notes |\n|---|---|---|---|---|", flush=True)
    for name, ours, ref, ratio, note in rows:
        print(f"| {name} | {ours} | {ref} | {'' if ratio is None else f'{ratio:.2f}x'} | {note} |", flush=True)


if __name__ == "__main__":
    cli(main)
