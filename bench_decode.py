"""Benchmarks of decoding (bench.py's rows 7, 8 and 10-12), each against a reference measured in the
same run, the two sides taking turns.

    python bench_decode.py                      # random weights of SmolLM2's shape, and the converted
                                                # SmolLM2 itself against transformers' generate()
    python bench_decode.py --run runs/compare/every-readout-s0 --exit 0.3   # only row 12: a run's learned exit

Rows
 7. decoding one token at 512 tokens of context, Ouroboros at depth 8, batch 1: the KV cache vs
    recomputing the whole sequence; the cache's memory per token
 8. prefill of a 512-token prompt into the cache vs the plain forward of the same tokens
10. the full model decoding 64 tokens after a 512-token prompt, batch 1, greedy: ours vs transformers'
    generate() on the same weights and dtype (fp32, bf16), with the tokens compared
11. this machine's streaming matrix-vector bandwidth (fp32, bf16), and the decode speed it bounds
12. decoding at batch 1 with a run's learned exit vs its deepest fixed depth (--run, --exit)
"""
import argparse
import importlib.util
import sys

import torch

from bench import SMOLLM2, dtype_name, random_ouroboros, timed
from decode import decode, new_cache
from exits import attach_exit_head
from load_qwen import default_model, load_model
from data import load_splits
from run import Parser, cli, load_run


def rows_decode(device, dtype, reps, context=512, depth=8):
    model = random_ouroboros(SMOLLM2, dtype, device).eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    ids = torch.randint(0, SMOLLM2["vocab_size"], (1, context + 1), device=device)
    cache = new_cache(model, 1, context + 1, depth)

    def cached():  # the last token, after `context` cached ones: rewinding the position and the
        cache.pos, cache.sums = context, list(sums)  # controller's running sums makes every call the same
        return decode(model, ids[:, -1:], cache)[0]

    def prefill():
        return decode(model, ids[:, :-1], new_cache(model, 1, context + 1, depth))[0]

    with torch.no_grad(), autocast:
        decode(model, ids[:, :-1], cache)
        sums = list(cache.sums)  # running_sum replaces the tensors, so a copy of the list keeps them
        delta = (cached()[0, -1].float() - model(ids, depth)[0, -1].float()).abs().max().item()
        t_cached, t_full = timed([cached, lambda: model(ids, depth)], device, reps)
        t_prefill, t_forward = timed([prefill, lambda: model(ids[:, :-1], depth)], device, reps)
    shape = f"SmolLM2 shape, 8 + [15] x {depth} + 8, batch 1, {dtype_name(dtype)}"
    kib = cache.bytes_per_token() / 2**10
    return [(f"7. decode one token after {context} of context, {shape}", f"{1 / t_cached:,.1f} tok/s KV cache",
             f"{1 / t_full:,.2f} tok/s recomputing the sequence", t_full / t_cached,
             f"KV cache {kib:.1f} KiB per token ({len(cache.k)} slots); max|dlogits| vs the full forward {delta:.1e}"),
            (f"8. prefill {context} tokens, {shape}", f"{context / t_prefill:,.0f} tok/s into the cache",
             f"{context / t_forward:,.0f} tok/s plain forward", t_forward / t_prefill, "")]


def matvec_bandwidth(dtype, device, reps=3, n=8192) -> float:
    """Bytes per second that a [n, n] @ [n] product streams, this machine's bound for decoding weights."""
    W, x = torch.randn(n, n, device=device).to(dtype), torch.randn(n, device=device).to(dtype)
    (t,) = timed([lambda: W @ x], device, reps)
    return W.numel() * W.element_size() / t


def greedy(step, prompt, n: int) -> list:
    """n greedy tokens after the prompt, step(ids) -> logits [1, T, V] continuing the sequence."""
    logits, out = step(prompt), []
    for _ in range(n):
        out.append(logits[:, -1].argmax(-1, keepdim=True))
        logits = step(out[-1])
    return torch.cat(out, 1)[0].tolist() if out else []


def row_generate(model_dir, dtype, device, reps, context=512, new=64):
    """Ours, cached, against transformers' generate() (its decode: 64 tokens less 1, the prefill's)."""
    from transformers import AutoModelForCausalLM
    ours = load_model(model_dir, dtype, device)
    theirs = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    prompt = torch.randint(0, ours.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)

    def ours_decode(n):
        cache = new_cache(ours, 1, context + new)
        return greedy(lambda ids: ours(ids, cache=cache), prompt, n)

    hf = lambda n: theirs.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, context:].tolist()
    with torch.no_grad():
        same = ours_decode(new - 1) == hf(new)[:new - 1]
        t_ours, t_ours1, t_hf, t_hf1 = timed([lambda: ours_decode(new - 1), lambda: ours_decode(0),
                                              lambda: hf(new), lambda: hf(1)], device, reps)
    ours_tps, hf_tps = (new - 1) / (t_ours - t_ours1), (new - 1) / (t_hf - t_hf1)
    weights = sum(p.numel() * p.element_size() for p in ours.parameters())
    bound = matvec_bandwidth(dtype, device, reps) / weights
    return (f"10. decode {new} tokens after {context}, SmolLM2-135M, batch 1, greedy, {dtype_name(dtype)}",
            f"{ours_tps:,.1f} tok/s", f"{hf_tps:,.1f} tok/s transformers generate()", ours_tps / hf_tps,
            f"tokens identical: {same}; {ours_tps / bound:.0%} of the {bound:,.1f} tok/s that row 11's bandwidth "
            f"bounds for {weights / 2**20:,.0f} MiB of weights")


def row_bandwidth(device, reps):
    fp32, bf16 = (matvec_bandwidth(d, device, reps) for d in (torch.float32, torch.bfloat16))
    return ("11. streaming matrix-vector product, 8192 x 8192", f"{fp32 / 1e9:,.1f} GB/s fp32",
            f"{bf16 / 1e9:,.1f} GB/s bf16", fp32 / bf16, "decoding one token reads every weight once: this bounds it")


def row_exit(run, threshold, device, reps, context=64, new=64):
    """Batch 1 with the learned exit against the run's deepest depth: greedy tokens after a prompt of its
    held-out text, the time of the prompt alone taken off both sides (as row 10 does)."""
    model, cfg = load_run(run, torch.float32, device)
    attach_exit_head(model, run)
    depth, steps = max(cfg.depths), []
    prompt = torch.tensor(load_splits(cfg)[1][:context].astype("int64"), device=device)[None]

    def run_with(exit, n):
        cache = new_cache(model, 1, context + new + 1, depth)

        def step(ids):
            logits, ran = decode(model, ids, cache, exit)
            steps.append(ran)
            return logits
        return greedy(step, prompt, n)

    with torch.no_grad():
        run_with(("learned", threshold), new)
        mean = torch.cat([s.flatten() for s in steps[1:]]).float().mean().item()  # after the prompt
        t_exit, t_exit0, t_full, t_full0 = timed([lambda: run_with(("learned", threshold), new),
                                                  lambda: run_with(("learned", threshold), 0),
                                                  lambda: run_with(None, new), lambda: run_with(None, 0)], device, reps)
    exit_tps, full_tps = new / (t_exit - t_exit0), new / (t_full - t_full0)
    return (f"12. decode {new} tokens after {context} of held-out text, batch 1, greedy, {run}, learned exit < "
            f"{threshold:g} vs depth {depth}", f"{exit_tps:,.1f} tok/s with the exit", f"{full_tps:,.1f} tok/s at "
            f"depth {depth}", exit_tps / full_tps, f"{mean:.2f} recurrent steps per new token instead of {depth}")


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one timed repeat instead of three")
    p.add_argument("--run", default=None, help="only row 12, of this run with an exit head (exits.py)")
    p.add_argument("--exit", type=float, default=0.3, help="row 12's threshold on 1 - lambda")
    a = p.parse_args(argv)
    reps, cpu = 1 if a.quick else 3, torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads", flush=True)
    if a.run:
        return table([row_exit(a.run, a.exit, cpu, reps)])
    rows = rows_decode(cpu, torch.float32, reps)
    if importlib.util.find_spec("transformers") is None:
        print("skipped: row 10, transformers is not installed (pip install -r requirements-test.txt)")
    else:
        rows += [row_generate(default_model(), dtype, cpu, reps) for dtype in (torch.float32, torch.bfloat16)]
    table(rows + [row_bandwidth(cpu, reps)])


def table(rows):
    print("\n| benchmark | ours | reference | ratio (ours faster if > 1) | notes |\n|---|---|---|---|---|")
    for name, ours, ref, ratio, note in rows:
        print(f"| {name} | {ours} | {ref} | {ratio:.2f}x | {note} |")


if __name__ == "__main__":
    cli(main, sys.argv[1:])
