"""Sample from a trained Ouroboros run, its pruned baseline, or any pretrained Qwen2 / Llama folder.

    python generate.py --prompt "The os module"                        # the full SmolLM2-135M (offline)
    python generate.py --model DIR --prompt "..."                      # any HF Qwen2 / Llama folder
    python generate.py --run runs/controller-causal-s0 --prompt "..." --depth 8
    python generate.py --run runs/controller-causal-s0 --prompt "..." --exit latent-diff 0.05
    python generate.py --run runs/controller-causal-s0 --pruned --prompt "..."

Decoding is cached (decode.py): the prompt in one pass, then one token at a time, computing the
same logits as the full forward (tests/test_decode.py, in fp32; on a CPU the cache attends in fp32).
--no-cache recomputes the whole sequence for every token. --exit lets each token stop looping once the
criterion falls below the threshold.
"""
import argparse
import json
import math
import sys
import time

import torch

from load_qwen import default_model, load_config, load_model, load_tokenizer
from decode import EXITS, decode, new_cache
from exits import attach_exit_head
from run import Parser, add_flags, cli, load_run, placement, read_settings

DEPTH = 8  # recurrent steps per token unless --depth says


def pick_token(logits, temperature: float, top_k: int, top_p: float, generator):
    """logits [B, V] -> next token [B, 1]: greedy at temperature 0, else sampled after top-k, then top-p."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:  # nucleus: the most likely tokens whose mass reaches top_p (always at least one)
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


@torch.no_grad()
def generate(advance, prompt, max_new_tokens: int, pick, eos=()):
    """advance(ids [1, T]) -> (logits [1, T, V], recurrent steps [1, T]) continues the sequence so far.
    Returns (new token ids, the steps run at the position that predicted each, prefill s, decode s)."""
    t0 = time.perf_counter()
    logits, steps = advance(prompt)
    prefill = time.perf_counter() - t0
    tokens, depths = [], []
    for i in range(max_new_tokens):
        nxt = pick(logits[:, -1])
        tokens.append(nxt.item())
        depths.append(steps[0, -1].item())
        if tokens[-1] in eos or i == max_new_tokens - 1:
            break
        logits, steps = advance(nxt)
    return tokens, depths, prefill, time.perf_counter() - t0 - prefill


def decoder(model, a, max_len: int, exit=None):
    """advance(new ids) -> (logits, recurrent steps per token) for generate(): through a KV cache, or
    recomputing the whole sequence for every token (--no-cache): by the plain forward, or with an exit
    by decoding it all again from a fresh cache, the reference that carrying the cache is tested against."""
    if a.no_cache:
        forward, steps = ((model, 0) if a.run is None else (model.pruned, 1) if a.pruned
                          else (lambda ids: model(ids, a.depth), a.depth))
        again = lambda ids: decode(model, ids, new_cache(model, 1, ids.shape[1], a.depth), exit)
        seq = []

        def recompute(ids):
            seq.append(ids)
            if exit:
                logits, ran = again(torch.cat(seq, dim=1))
                return logits[:, -ids.shape[1]:], ran[:, -ids.shape[1]:]
            return forward(torch.cat(seq, dim=1))[:, -ids.shape[1]:], torch.full_like(ids, steps)
        return recompute
    if a.run is None:  # the full model: no loop, 0 recurrent steps
        cache = new_cache(model, 1, max_len)
        return lambda ids: (model(ids, cache=cache), torch.zeros_like(ids))
    if a.pruned:
        cache = new_cache(model, 1, max_len, 1)
        return lambda ids: (model.pruned(ids, cache=cache), torch.ones_like(ids))
    cache = new_cache(model, 1, max_len, a.depth)
    return lambda ids: decode(model, ids, cache, exit)


def check(a):
    """The exit (criterion, threshold) or None; every problem of the flags at once, before anything loads."""
    problems, exit = [], None
    if a.run is not None and a.model:
        problems.append("--model and --run: a run names its own model (in its config.json); give one")
    if a.depth is not None and a.depth < 1:
        problems.append(f"--depth {a.depth} must be at least 1")
    if a.run is None and (a.pruned or a.depth is not None or a.exit):
        problems.append("--pruned, --depth and --exit need --run (a trained Ouroboros run)")
    if a.pruned and (a.depth is not None or a.exit):
        problems.append("the pruned baseline runs the recurrent layer once: no --depth or --exit")
    if a.exit:
        try:
            exit = (a.exit[0], float(a.exit[1]))
        except ValueError:
            exit = (a.exit[0], math.nan)
        if exit[0] not in EXITS or math.isnan(exit[1]):
            problems.append(f"--exit {a.exit[0]} {a.exit[1]}: give a criterion ({', '.join(EXITS)}) and a number, "
                            "e.g. --exit latent-diff 0.05")
    if a.max_new_tokens < 1 or a.top_k < 0 or not 0 <= a.temperature < math.inf or not 0 < a.top_p <= 1:
        problems.append(f"--max-new-tokens {a.max_new_tokens}, --temperature {a.temperature}, --top-k {a.top_k}, "
                        f"--top-p {a.top_p}: give --max-new-tokens >= 1, a finite --temperature >= 0, --top-k >= 0 "
                        "and --top-p in (0, 1]")
    if problems:
        raise ValueError("; ".join(problems))
    return exit


def room(prompt: int, new: int, context: int) -> int:
    """How many tokens to generate after a prompt of `prompt` tokens: `new`, clipped to the model's context
    (with a notice), since the cache is allocated for all of them."""
    if prompt == 0:
        raise ValueError("--prompt encodes to no tokens: give some text")
    if prompt >= context:
        raise ValueError(f"--prompt is {prompt} tokens, the model's context {context} positions: shorten it")
    if prompt + new > context:
        print(f"--max-new-tokens {new} clipped to {context - prompt}: the model's context is {context} positions",
              file=sys.stderr)
    return min(new, context - prompt)


def parser():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="a run folder written by train.py: sample the trained model")
    p.add_argument("--pruned", action="store_true", help="with --run: sample the pruned baseline instead")
    p.add_argument("--prompt", required=True)
    p.add_argument("--depth", type=int, default=None, help=f"recurrent steps per token (default {DEPTH})")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=200, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exit", nargs=2, metavar=("CRITERION", "THRESHOLD"),
                   help=f"adaptive depth per token: {', '.join(EXITS)} and a threshold, e.g. latent-diff 0.05")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence for every token")
    add_flags(p, ("model", "device", "precision"))
    p.add_argument("--json", action="store_true", help="print token ids and per-token depth as JSON")
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    exit = check(a)
    device, dtype, autocast = placement(a.device, a.precision, decoding=True)
    run = read_settings(a.run) if a.run is not None else None  # the small files first: a bad one is named
    model_dir = run.model if run else a.model or default_model()
    config = load_config(model_dir)
    tok = load_tokenizer(model_dir, config=config)
    if run and not a.pruned:
        a.depth = DEPTH if a.depth is None else a.depth
        if a.depth > run.ouroboros.max_steps:
            raise ValueError(f"--depth {a.depth}: {a.run} has step norms for {run.ouroboros.max_steps} steps at most")
    prompt = torch.tensor([tok.encode(a.prompt).ids], device=device)
    new = room(prompt.shape[1], a.max_new_tokens, config.max_position_embeddings)
    model = attach_exit_head(load_run(a.run, dtype, device, config)[0], a.run) if run else load_model(
        model_dir, dtype, device, config=config)
    advance = decoder(model, a, prompt.shape[1] + new, exit)
    gen = torch.Generator(device).manual_seed(a.seed)
    pick = lambda logits: pick_token(logits, a.temperature, a.top_k, a.top_p, gen)
    eos = config.eos_token_id
    with autocast:
        stops = {eos} if isinstance(eos, int) else set(eos or [])
        tokens, depths, prefill, dt = generate(advance, prompt, new, pick, stops)
    speed = (len(tokens) - 1) / dt if len(tokens) > 1 else float("nan")  # forward passes after the prefill
    if a.json:
        print(json.dumps({"prompt_ids": prompt[0].tolist(), "ids": tokens, "depths": depths,
                          "text": tok.decode(tokens), "tokens_per_s": speed, "prefill_s": prefill}))
        return
    print(a.prompt + tok.decode(tokens))
    what = "full model" if run is None else "pruned baseline" if a.pruned else f"depth {a.depth}"
    steps = f", {sum(depths) / len(depths):.2f} recurrent steps per token" if exit else ""
    print(f"\n[{what}, {'no cache' if a.no_cache else 'cached'}: {len(tokens)} tokens, {speed:.1f} tok/s{steps}; "
          f"prefill of {prompt.shape[1]} tokens {prefill * 1e3:.0f} ms]", file=sys.stderr)


if __name__ == "__main__":
    cli(main, sys.argv[1:])
