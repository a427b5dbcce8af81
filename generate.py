"""Sample from a trained Ouroboros run, its pruned baseline, or any pretrained Qwen2 / Llama folder.

    python generate.py --prompt "The os module"                    # the full SmolLM2-135M (offline default)
    python generate.py --model DIR --prompt "..."                  # any HF Qwen2 / Llama folder
    python generate.py --run runs/controller-s0 --prompt "..." --depth 8
    python generate.py --run runs/controller-s0 --pruned --prompt "..."

Decoding is cached, as in gpt-fast: the prompt in one pass into the KV cache (prefill), then one token at a
time, each step attending over the cache, with the logits of the plain forward (tests/test_decode.py).
--no-cache recomputes the whole sequence for every token: the reference. --compile compiles the one-token
step with static shapes (torch.compile, CUDA graphs on a GPU).
"""
import argparse
import json
import sys
import time

import torch

from load_qwen import DEFAULT_MODEL, load_config, load_model, load_tokenizer
from eval import load_pruned, load_run
from train import cli, placement, read_config


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
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


@torch.no_grad()
def generate(forward, prompt, new: int, pick, eos=(), cached=True, compile=False):
    """forward(ids, pos) -> logits: pos None is the plain forward over positions 0..T-1; a tensor of positions
    decodes through the cache. Returns (the new token ids, prefill seconds, decode seconds)."""
    T, device = prompt.shape[1], prompt.device
    one_token = torch.compile(forward, mode="reduce-overhead", fullgraph=True) if compile else forward
    t0 = time.perf_counter()
    logits = forward(prompt, torch.arange(T, device=device) if cached else None)
    tokens, seq = [], prompt
    for i in range(new):
        token = pick(logits[:, -1])
        tokens.append(token.item())  # the host needs it anyway: to stop at EOS
        if i == 0:
            prefill, t0 = time.perf_counter() - t0, time.perf_counter()
        if tokens[-1] in eos or i == new - 1:
            break
        if cached:  # decode_one_token: static shapes, the position as a tensor
            logits = one_token(token, torch.tensor([T + i], device=device))
        else:
            seq = torch.cat([seq, token], 1)
            logits = forward(seq, None)
    return tokens, prefill, time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a run folder written by train.py: sample the trained model")
    p.add_argument("--pruned", action="store_true", help="with --run: sample its pruned baseline instead")
    p.add_argument("--model", default=DEFAULT_MODEL, help="without --run: an HF folder (default: SmolLM2-135M)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--depth", type=int, default=8, help="recurrent steps per token")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=200, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence for every token")
    p.add_argument("--compile", action="store_true", help="compile the one-token step (CUDA graphs on a GPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 on GPUs and on CPUs with native bf16")
    p.add_argument("--json", action="store_true", help="print the token ids and timings as JSON")
    a = p.parse_args(argv)
    bad = [(a.max_new_tokens < 1, "--max-new-tokens must be at least 1"),
           (a.pruned and not a.run, "--pruned needs --run"),
           (not a.temperature >= 0 or a.top_k < 0, "--temperature and --top-k must not be negative"),
           (not 0 < a.top_p <= 1, "--top-p must lie in (0, 1]")]
    if found := [what for wrong, what in bad if wrong]:
        raise ValueError("; ".join(found))
    if a.precision == "auto":  # a CPU with native bf16 (AVX512-BF16, AMX) decodes faster in bf16; others in fp32
        native = any(getattr(torch.cpu, f"_is_{isa}_supported", bool)() for isa in ("avx512_bf16", "amx_tile"))
        a.precision = "bf16" if native else "auto"
    device, dtype, autocast = placement(a.device, a.precision)
    folder = read_config(a.run).model if a.run else a.model
    config, tok = load_config(folder), load_tokenizer(folder)
    prompt = torch.tensor([tok.encode(a.prompt).ids], device=device)
    new = min(a.max_new_tokens, config.max_position_embeddings - prompt.shape[1])
    if not 0 < prompt.shape[1] < config.max_position_embeddings:
        raise ValueError(f"--prompt is {prompt.shape[1]} tokens: give some, fewer than the model's context")
    if a.run is None or a.pruned:  # a plain decoder: the whole model, or the run's pruned baseline
        model = load_pruned(read_config(a.run), dtype, device, config) if a.pruned else load_model(
            folder, dtype, device, config=config)
        model.setup_caches(1, prompt.shape[1] + new)
        forward = lambda ids, pos: model(ids, pos=pos)
    else:
        model, cfg = load_run(a.run, dtype, device)
        if not model.controller.causal and not a.no_cache:
            raise ValueError(f"{a.run}'s controller sees the future (--pool mean): it cannot decode through a cache; "
                             "use --no-cache")
        model.setup_caches(1, prompt.shape[1] + new, a.depth)
        forward = lambda ids, pos: model(ids, a.depth, pos=pos)
    gen = torch.Generator(device).manual_seed(a.seed)
    pick = lambda logits: pick_token(logits, a.temperature, a.top_k, a.top_p, gen)
    eos = {config.eos_token_id} if isinstance(config.eos_token_id, int) else set(config.eos_token_id or ())
    with autocast:
        tokens, prefill, dt = generate(forward, prompt, new, pick, eos, not a.no_cache, a.compile)
    speed = (len(tokens) - 1) / dt if len(tokens) > 1 else float("nan")  # the forwards after the prefill
    if a.json:
        return print(json.dumps({"ids": tokens, "text": tok.decode(tokens), "tokens_per_s": speed,
                                 "prefill_s": prefill}))
    print(a.prompt + tok.decode(tokens))
    print(f"\n[{len(tokens)} tokens, {speed:.1f} tok/s after a prefill of {prompt.shape[1]} in {prefill * 1e3:.0f} ms]",
          file=sys.stderr)


if __name__ == "__main__":
    cli(main)
