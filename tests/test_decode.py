"""Decoding through the KV cache (model.setup_caches, then the positions given as `pos`) computes the plain forward's
logits: for the full model, the pruned baseline and Ouroboros with every registered controller (controller.VARIANTS)
and every pool that is causal, fed whole, in chunks or a token at a time. generate.py decodes through it, refuses a
controller that sees the future unless --no-cache, and its one-token step compiles."""
import dataclasses
import json
import os
import time
import typing

import pytest
import torch
import torch.nn.functional as F

import controller
import generate
from conftest import make_checkpoint, make_model_folder, needs_cuda, ouroboros, randomise_trainable
from eval import load_run
from load_qwen import load_model, load_ouroboros
from model import OuroborosConfig
from train import TrainConfig, save_checkpoint

SPLIT = dict(prelude=2, recurrent=3, coda=2)  # of 7 layers
TOL = 1e-4
POOLS = typing.get_args(OuroborosConfig.__annotations__["pool"])
FEEDS = ("whole", "chunks", "tokens")


def is_causal(variant, pool):
    """What the variant built with this pool declares: position t reads only positions <= t."""
    return controller.VARIANTS[variant](8, OuroborosConfig(pool=pool, rank=2, style=4, max_depth=2)).causal


CAUSAL = [(v, p) for v in controller.VARIANTS for p in POOLS if is_causal(v, p)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "qwen")
    make_checkpoint(path, layers=7)
    return path


def ids(*shape, seed=0):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def fed(forward, x, how):
    """The logits of x decoded by forward(ids, pos): whole (one prefill), in chunks (a prompt of 7 tokens, a chunk of
    5, then a token at a time) or a token at a time from the first."""
    T = x.shape[1]
    ends = {"whole": [T], "chunks": [7, 12, *range(13, T + 1)], "tokens": range(1, T + 1)}[how]
    out, start = [], 0
    for end in ends:
        out.append(forward(x[:, start:end], torch.arange(start, end, device=x.device)))
        start = end
    return torch.cat(out, 1)


def test_every_registered_variant_is_covered():
    """A new entry of controller.VARIANTS is decoded by the test below with every pool it is causal with."""
    assert {v for v, _ in CAUSAL} == set(controller.VARIANTS) and ("controller", "causal") in CAUSAL
    assert ("controller", "mean") not in CAUSAL


@pytest.mark.parametrize("variant,pool", CAUSAL)
@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("depth", [1, 3])
def test_cached_decoding_gives_the_plain_forward_logits(ckpt, variant, pool, gate, depth):
    model = ouroboros(ckpt, **SPLIT, variant=variant, pool=pool, gate=gate)
    randomise_trainable(model, scale=0.1)  # at 0.3 the no-gate loop is chaotic: rounding alone moves logits by 1e-3
    x = ids(2, 20)
    with torch.no_grad():
        want = model(x, depth=depth)
        assert (want - model(x, depth=depth + 1)).abs().max() > 1e-2  # the steps matter: one more shows
        for how in FEEDS:
            model.setup_caches(2, 24, depth)  # longer than the text: the positions not yet written are masked
            got = fed(lambda t, pos: model(t, depth, pos=pos), x, how)
            assert (got - want).abs().max() <= TOL, how


def test_full_model_cached_decoding(ckpt):
    model = load_model(ckpt)
    x = ids(2, 20)
    with torch.no_grad():
        want = model(x)
        for how in FEEDS:
            model.setup_caches(2, 20)
            assert (fed(lambda t, pos: model(t, pos=pos), x, how) - want).abs().max() <= TOL, how


def test_pruned_cached_decoding(ckpt):
    """The baseline, the decoder of the kept layers (their indices not contiguous), decodes through its cache."""
    model = load_model(ckpt, layers=[0, 1, 3, 5, 6])
    x = ids(1, 16)
    with torch.no_grad():
        want = model(x)
        for how in FEEDS:
            model.setup_caches(1, 16)
            assert (fed(lambda t, pos: model(t, pos=pos), x, how) - want).abs().max() <= TOL, how


def test_a_cpu_cache_attends_in_fp32_whatever_the_weights_and_autocast(ckpt):
    """bf16 weights on a CPU: every cache keeps K/V in fp32, and a query attends in fp32 even under bf16 autocast
    (which would cast attention to bf16), its output back in the query's dtype."""
    model = ouroboros(ckpt, torch.bfloat16, **SPLIT)
    model.setup_caches(1, 8, 2)
    caches = [layer.self_attn.kv_cache for layer in model.prelude + model.coda] + list(model.step_caches)
    assert len(caches) == 4 + 2 and all(c.k.dtype == c.v.dtype == torch.float32 for c in caches)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 5, 16, generator=g).to(torch.bfloat16) for n in (4, 2, 2))
    with torch.autocast("cpu", torch.bfloat16):
        got = caches[0].attend(torch.arange(5), q, k, v)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
    in_bf16 = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16))
    assert not torch.equal(in_bf16, want.to(torch.bfloat16))  # bf16 attention would show
    x = ids(1, 16)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):  # and decoding in bf16 stays near its plain forward
        model.setup_caches(1, 16, 2)
        got = fed(lambda t, pos: model(t, 2, pos=pos), x, "chunks")
        want = model(x, depth=2)
    assert (got.float() - want.float()).abs().max() < 0.1


def test_greedy_or_top_k_1_or_a_tiny_top_p_picks_the_argmax():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    best, g = logits.argmax(-1, keepdim=True), torch.Generator().manual_seed(0)
    assert torch.equal(generate.pick_token(logits, 0, 0, 1.0, g), best)
    assert torch.equal(generate.pick_token(logits, 1.0, 1, 1.0, g), best)
    assert torch.equal(generate.pick_token(logits, 1.0, 0, 1e-6, g), best)
    drawn = torch.cat([generate.pick_token(logits, 1.0, 0, 1.0, g) for _ in range(50)], 1)
    assert len(drawn[0].unique()) > 3  # sampling at temperature 1 does sample


@pytest.mark.compile
def test_the_one_token_step_compiles_on_the_cpu_and_gives_the_same_logits(ckpt, monkeypatch):
    """generate.py --compile: torch.compile(fullgraph=True) of the one-token step of Ouroboros (its caches and
    running sums updated in place) is captured whole, without a graph break, and decodes the uncompiled logits.
    The backend here is aot_eager (dynamo's graph, AOT autograd's functionalised in-place writes): inductor's C++
    kernels took ~53 s to build cold on 2 cores. The device check compiles with inductor and CUDA graphs."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, fullgraph=kw["fullgraph"], backend="aot_eager"))
    torch._dynamo.reset()
    model = ouroboros(ckpt, prelude=1, recurrent=2, coda=1)
    randomise_trainable(model, scale=0.1)

    def decode(cached, compile):
        seen = []
        pick = lambda logits: seen.append(logits) or logits.argmax(-1, keepdim=True)
        model.setup_caches(1, 12, 2)
        tokens, *_ = generate.generate(lambda t, pos: model(t, 2, pos=pos), ids(1, 6), 5, pick, (), cached, compile)
        return tokens, torch.cat(seen)

    t0 = time.perf_counter()
    compiled = decode(True, True)
    print(f"compiled and decoded in {time.perf_counter() - t0:.1f} s")
    plain = decode(False, False)
    assert compiled[0] == plain[0] and len(compiled[0]) == 5
    assert (compiled[1] - plain[1]).abs().max() <= TOL


@needs_cuda
@pytest.mark.cuda
def test_cached_decoding_on_cuda_in_bf16_is_near_the_plain_forward(ckpt):
    oc = OuroborosConfig(**SPLIT)
    model = load_ouroboros(ckpt, oc, torch.bfloat16, "cuda")
    randomise_trainable(model, scale=0.1)
    x = ids(2, 20).cuda()
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        want = model(x, depth=3).float()
        model.setup_caches(2, 20, 3)
        assert model.step_caches[0].k.dtype == torch.bfloat16  # on a GPU the cache keeps the weights' dtype
        got = fed(lambda t, pos: model(t, 3, pos=pos), x, "chunks").float()
    assert (got - want).abs().max() <= 0.1 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


# ----------------------------------------------------------------------------------------------
# generate.py

class SeesTheFuture(controller.StaticDiagonals):
    """A controller that declares it reads positions after t: decoding through a cache must refuse it."""
    causal = False


def make_run(folder, model, **settings):
    """A run folder as train.py leaves it (config.json, checkpoint.safetensors), its trainable tensors random."""
    cfg = TrainConfig(model=model, out=folder, prelude=1, recurrent=2, coda=1, rank=8, **settings)
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f)
    m = load_ouroboros(model, cfg)
    randomise_trainable(m, scale=0.1)
    save_checkpoint(os.path.join(folder, "checkpoint.safetensors"), m, torch.optim.AdamW(m.trainable().values()), 0)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    model = make_model_folder(str(tmp / "model"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(controller.VARIANTS, "future", SeesTheFuture)
        return {"model": model, "causal": make_run(str(tmp / "causal"), model),
                "mean": make_run(str(tmp / "mean"), model, pool="mean"),
                "future": make_run(str(tmp / "future"), model, variant="future")}


def sample(run, *flags):
    return ["--run", run, "--prompt", "the cat sat", "--device", "cpu", "--precision", "fp32", *flags]


def test_generate_cached_equals_no_cache_and_the_plain_forwards_argmax(runs, capsys):
    outs = []
    for extra in ([], ["--no-cache"]):
        generate.main(sample(runs["causal"], "--depth", "3", "--max-new-tokens", "12", "--temperature", "0", "--json",
                             *extra))
        outs.append(json.loads(capsys.readouterr().out))
    tokens = outs[0]["ids"]
    assert tokens == outs[1]["ids"] and len(tokens) == 12 and len(set(tokens)) > 2
    model, _ = load_run(runs["causal"])  # each token is the argmax of the plain forward, by a clear margin
    prompt = [int(t) for t in generate.load_tokenizer(runs["model"]).encode("the cat sat").ids]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]), depth=3)[0, len(prompt) - 1:-1]
    top2 = logits.topk(2).values
    assert logits.argmax(-1).tolist() == tokens and (top2[:, 0] - top2[:, 1]).min() > 1e-3


@pytest.mark.parametrize("run", ["mean", "future"])
def test_generate_refuses_a_controller_that_sees_the_future_but_samples_it_without_the_cache(runs, run, capsys):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(controller.VARIANTS, "future", SeesTheFuture)
        assert not load_run(runs[run])[0].controller.causal
        with pytest.raises(ValueError, match="sees the future.*use --no-cache"):
            generate.main(sample(runs[run]))
        generate.main(sample(runs[run], "--no-cache", "--max-new-tokens", "3"))
        assert "tok/s" in capsys.readouterr().err
        generate.main(sample(runs[run], "--pruned", "--max-new-tokens", "3"))  # the baseline has no controller
        assert "tok/s" in capsys.readouterr().err


def test_generate_samples_a_model_folder(runs, capsys):
    generate.main(["--model", runs["model"], "--prompt", "the cat", "--max-new-tokens", "4", "--device", "cpu",
                   "--json", "--seed", "3"])
    out = json.loads(capsys.readouterr().out)
    assert 1 <= len(out["ids"]) <= 4 and all(0 <= t < 264 for t in out["ids"])
