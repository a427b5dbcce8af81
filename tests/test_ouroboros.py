"""The recursive model (model.py, Part 2; controller.py): what flows where (causality, the mean pool's leak, the
batch), what trains (gradients, frozen base, fp32 masters, sizes), where it starts (the bare looped layer), the SVD
bases, and the loss (chunked, shifted once, read out at every depth in one pass)."""
import copy
import typing

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_checkpoint, ouroboros, randomise_trainable
from controller import TARGETS, VARIANTS, Controller, Gate, StepNorm, svd_bases
from data import Windows
from load_qwen import load_model
from model import OuroborosConfig, lm_loss, through

SPLIT = dict(prelude=2, recurrent=3, coda=2)  # of 7 layers: 2 and 4 removed
POOLS = typing.get_args(OuroborosConfig.__annotations__["pool"])
KINDS = [(v, p) for v in VARIANTS for p in POOLS if v == "controller" or p == "causal"]  # pool is the controller's


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "qwen")
    hf = make_checkpoint(path, layers=7)
    return path, hf


def ids(*shape, seed=0):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def with_future_changed(x, at):
    y = x.clone()
    y[:, at:] = (y[:, at:] + 1) % 128
    return y


# ----------------------------------------------------------------------------------------------
# what flows where

@pytest.mark.parametrize("variant", VARIANTS)
def test_the_default_pool_is_causal(ckpt, variant):
    """Changing the tokens from position 12 on changes no logit before 12, for every variant (default pool)."""
    model = ouroboros(ckpt[0], **SPLIT, variant=variant)
    assert OuroborosConfig().pool == "causal" and model.controller.causal
    randomise_trainable(model)
    x = ids(1, 24)
    with torch.no_grad():
        a, b = model(x, depth=3), model(with_future_changed(x, 12), depth=3)
    assert torch.equal(a[:, :12], b[:, :12])
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-2  # and the change is real


def test_mean_pool_leaks_the_future(ckpt):
    """The paper's pool: position t reads the mean over the whole sequence, the tokens after t included."""
    model = ouroboros(ckpt[0], **SPLIT, pool="mean")
    assert not model.controller.causal
    randomise_trainable(model)
    x = ids(1, 24)
    with torch.no_grad():
        a, b = model(x, depth=3), model(with_future_changed(x, 12), depth=3)
    assert (a[:, :12] - b[:, :12]).abs().max() > 1e-3


@pytest.mark.parametrize("pool", POOLS)
def test_sequences_do_not_see_their_batch(ckpt, pool):
    model = ouroboros(ckpt[0], **SPLIT, pool=pool)
    randomise_trainable(model)
    a, b, c = ids(1, 16, seed=1), ids(1, 16, seed=2), ids(1, 16, seed=3)
    with torch.no_grad():
        ab, ac = model(torch.cat([a, b]), depth=2), model(torch.cat([a, c]), depth=2)
    assert (ab[0] - ac[0]).abs().max() < 1e-5
    assert (ab[1] - ac[1]).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------
# what trains

@pytest.mark.parametrize("variant,gate", [(v, g) for v in VARIANTS for g in (True, False)])
def test_every_trainable_tensor_gets_a_gradient(ckpt, variant, gate):
    model = ouroboros(ckpt[0], **SPLIT, variant=variant, gate=gate)
    randomise_trainable(model)
    model(ids(2, 16), depth=3, labels=ids(2, 16, seed=5)).backward()
    trainable = model.trainable()
    assert trainable and trainable.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in trainable.items():
        assert p.grad.abs().sum() > 0, name
    assert model.step_norm.weight.grad[3:].abs().sum() == 0  # the rows of steps that did not run get nothing
    assert ("gate.proj.weight" in trainable) == gate


def test_zero_heads_get_gradient_at_initialisation(ckpt):
    """The heads start at zero (the bare layer); they must not be a dead end: they are the first thing to move."""
    model = ouroboros(ckpt[0], **SPLIT)
    for t in TARGETS:
        assert not model.controller.heads[t].weight.any()
    model(ids(2, 16), depth=2, labels=ids(2, 16, seed=5)).backward()
    for t in TARGETS:
        assert model.controller.heads[t].weight.grad.abs().sum() > 0, t


def test_the_base_stays_frozen_through_an_optimiser_step(ckpt):
    model = ouroboros(ckpt[0], **SPLIT)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.clone() for n, p in model.trainable().items()}
    assert any(n.endswith(".A") for n in frozen) and any("embed_tokens" in n for n in frozen)
    opt = torch.optim.AdamW(model.trainable().values(), lr=1e-2, weight_decay=0.1)
    model(ids(2, 16), depth=2, labels=ids(2, 16, seed=5)).backward()
    opt.step()
    after = dict(model.named_parameters())
    for n, p in frozen.items():
        assert torch.equal(after[n], p), n
    assert any(not torch.equal(after[n], p) for n, p in trainable.items())


def test_trainable_stays_fp32_over_a_bf16_base(ckpt):
    model = ouroboros(ckpt[0], **SPLIT, dtype=torch.bfloat16)
    assert model.base.embed_tokens.weight.dtype == torch.bfloat16
    assert model.recurrent.mlp.up_proj.A.dtype == torch.bfloat16
    assert {p.dtype for p in model.trainable().values()} == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 base runs under autocast, as train.py does
        loss = model(ids(1, 8), depth=2, labels=ids(1, 8, seed=1))
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.trainable().values())


def test_parameter_counts_match_the_formulas(ckpt):
    d, r, s, steps = 64, 32, 128, 64
    model = ouroboros(ckpt[0], **SPLIT)
    count = lambda m: sum(p.numel() for p in m.parameters())
    # W_u and its bias, E, W_1 and W_2 with biases, the seven heads H_t (no bias)
    controller = (d * 2 * s + 2 * s) + steps * s + (3 * s * 2 * s + 2 * s) + (2 * s * s + s) + 7 * s * r
    assert count(model.controller) == controller
    assert count(model.gate) == 2 * d * d + d
    assert count(model.step_norm) == steps * d
    assert sum(p.numel() for p in model.trainable().values()) == controller + 2 * d * d + d + steps * d
    static = ouroboros(ckpt[0], **SPLIT, variant="static", gate=False)
    assert sum(p.numel() for p in static.trainable().values()) == steps * 7 * r + steps * d
    none = ouroboros(ckpt[0], **SPLIT, variant="none")
    assert sum(p.numel() for p in none.trainable().values()) == 2 * d * d + d + steps * d
    # at the paper's d = 2048: 692,864 + 8,390,656 + 131,072 = 9,214,592
    assert count(Controller(2048, OuroborosConfig())) == 692_864 and count(Gate(2048)) == 8_390_656
    assert count(StepNorm(2048, 64)) == 131_072


# ----------------------------------------------------------------------------------------------
# where it starts: the bases, the initial state

def test_bases_are_the_best_rank_r_approximation_of_the_mean_residual(ckpt):
    """Eckart-Young: B A is the truncated SVD of R_t = mean over removed layers (W_t[i]) - W_t[recurrent]."""
    path, hf = ckpt
    model = ouroboros(path, **SPLIT, rank=8)
    sd = {k: v.double().numpy() for k, v in hf.state_dict().items()}
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    assert set(names) == set(TARGETS)
    for t, proj in names.items():
        w = lambda i: sd[f"model.layers.{i}.{proj}.weight"]
        residual = (w(2) + w(4)) / 2 - w(3)  # removed layers 2 and 4, recurrent 3
        U, S, Vt = np.linalg.svd(residual, full_matrices=False)
        best = (U[:, :8] * S[:8]) @ Vt[:8]
        lora = getattr(model.recurrent.self_attn if t in "qkvo" else model.recurrent.mlp, f"{t}_proj")
        got = (lora.B.double() @ lora.A.double()).numpy()
        assert np.abs(got - best).max() < 1e-5 * np.abs(best).max(), t
        assert np.linalg.norm(residual - got) == pytest.approx(np.sqrt((S[8:] ** 2).sum()), rel=1e-5)
        assert lora.A.shape == (8, residual.shape[1]) and lora.B.shape == (residual.shape[0], 8)
        assert not lora.A.requires_grad and not lora.B.requires_grad


def test_svd_bases_rank_checked():
    with pytest.raises(ValueError, match="rank 9 must be in 1..8"):
        svd_bases(torch.randn(8, 16), 9)


def test_at_initialisation_the_model_is_the_bare_looped_layer(ckpt):
    """Zero heads: every diagonal is 0 and the LoRA term adds exactly nothing; the gate keeps sigmoid(2) = 88.08% of
    the old state in every channel. So depth k is: the unmodulated layer, RMS-normalised, mixed in at 11.92%."""
    model = ouroboros(ckpt[0], **SPLIT)
    x = torch.randn(2, 5, 64)
    diag = model.controller(x, 0, torch.arange(5))
    assert diag.keys() == set(TARGETS) and all(torch.equal(c, torch.zeros(2, 5, 32)) for c in diag.values())
    q = model.recurrent.self_attn.q_proj
    assert torch.equal(q(x, diag["q"]), q.base(x))  # the LoRA delta is exactly zero
    mixed = model.gate(torch.ones(2, 5, 64), torch.zeros(2, 5, 64))
    assert torch.allclose(mixed, torch.full_like(mixed, 0.1192), atol=1e-4)  # g = sigmoid(-2)
    assert torch.allclose(model.gate(torch.zeros(2, 5, 64), torch.ones(2, 5, 64)), torch.full_like(mixed, 0.8808),
                          atol=1e-4)
    tokens, g = ids(2, 12), torch.sigmoid(torch.tensor(-2.0))
    with torch.no_grad():
        h, rope = model.base.embed(tokens)
        h = through(model.prelude, h, rope)
        for _ in range(3):
            new = model.recurrent(h, rope)
            h = (1 - g) * h + g * new * torch.rsqrt(new.pow(2).mean(-1, keepdim=True) + 1e-6)
        want = model.base.head(through(model.coda, h, rope))
        assert (model(tokens, depth=3) - want).abs().max() < 1e-5
        assert (model(tokens, depth=3) - model(tokens, depth=1)).abs().max() > 1e-2


def test_the_pruned_baseline_is_transformers_model_with_the_removed_layers_deleted(ckpt):
    """eval.py's and generate.py's baseline: the decoder of the kept layers, the recurrent one once and bare."""
    path, hf = ckpt
    pre, r, post, removed = OuroborosConfig(**SPLIT).split(7)
    pruned = load_model(path, layers=pre + [r] + post)
    cut = copy.deepcopy(hf)
    cut.model.layers = torch.nn.ModuleList(layer for i, layer in enumerate(hf.model.layers) if i not in removed)
    cut.config.num_hidden_layers = len(cut.model.layers)
    x = ids(2, 16)
    with torch.no_grad():
        assert (pruned(x) - cut(x, use_cache=False).logits).abs().max() < 1e-5
        assert (ouroboros(path, **SPLIT)(x, depth=1) - pruned(x)).abs().max() > 1e-3  # step norm + gate change it


def test_no_gate_depth_one_is_the_normalised_layer(ckpt):
    """variant none, no gate: one step is exactly the recurrent layer, RMS-normalised (step norm weights 1)."""
    model = ouroboros(ckpt[0], **SPLIT, variant="none", gate=False)
    x = ids(1, 12)
    with torch.no_grad():
        h, rope = model.base.embed(x)
        h = model.recurrent(through(model.prelude, h, rope), rope)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        assert torch.allclose(model(x, depth=1), model.base.head(through(model.coda, h, rope)), atol=1e-5)


def test_depth_and_split_are_checked(ckpt):
    model = ouroboros(ckpt[0], **SPLIT)
    for depth in (0, 65):
        with pytest.raises(ValueError, match=f"depth {depth} must be in 1..64"):
            model(ids(1, 4), depth=depth)
    assert OuroborosConfig(**SPLIT).split(7) == ([0, 1], 3, [5, 6], [2, 4])
    for bad in (dict(prelude=2, recurrent=1, coda=2), dict(prelude=2, recurrent=5, coda=2),  # in prelude / coda
                dict(prelude=3, recurrent=3, coda=3), dict(prelude=4, recurrent=3, coda=3),  # nothing removed / no room
                dict(prelude=2, recurrent=3, coda=-1)):
        with pytest.raises(ValueError, match="does not fit 7 layers"):
            OuroborosConfig(**bad).split(7)


# ----------------------------------------------------------------------------------------------
# the loss

def test_labels_are_shifted_exactly_once(ckpt):
    """The training loss is that of predicting token t+1 from a window's own labels. The authors' code shifted the
    already-shifted labels again and trained on t+2; this fails for that mistake."""
    model = ouroboros(ckpt[0], **SPLIT)
    randomise_trainable(model, scale=0.1)
    tokens = np.random.default_rng(0).integers(0, 128, 200).astype(np.uint32)
    x, y = Windows(tokens, 32).batch([0, 1])
    with torch.no_grad():
        loss = model(x, depth=2, labels=y)  # what the training loop computes
        logits = model(x, depth=2)
    window = torch.from_numpy(tokens[:66].astype(np.int64))
    once = (F.cross_entropy(logits[0], window[1:33]) + F.cross_entropy(logits[1], window[33:65])) / 2
    twice = F.cross_entropy(logits[0, :-1], window[2:33])
    assert abs(loss.item() - once.item()) < 1e-5
    assert abs(loss.item() - twice.item()) > 1e-2


@pytest.mark.parametrize("every", [False, True])
def test_checkpointed_steps_give_the_same_gradients(ckpt, every):
    model = ouroboros(ckpt[0], **SPLIT)
    randomise_trainable(model)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.checkpoint_steps = flag
        model(ids(2, 16), depth=3, labels=ids(2, 16, seed=5), every=every).backward()
        grads.append({n: p.grad.clone() for n, p in model.trainable().items()})
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], atol=1e-6, rtol=1e-5), n
    assert grads[0]["controller.state_proj.weight"].abs().sum() > 0


def test_every_readout_is_the_mean_of_each_depths_loss(ckpt):
    model = ouroboros(ckpt[0], **SPLIT)
    randomise_trainable(model)
    x, y = ids(2, 16), ids(2, 16, seed=5)
    with torch.no_grad():
        every = model(x, depth=3, labels=y, every=True)
        each = [model(x, depth=d, labels=y) for d in (1, 2, 3)]
    assert abs(every - sum(each) / 3) < 1e-5 and abs(every - each[-1]) > 1e-3


def test_chunked_loss_is_cross_entropy_and_its_gradient():
    torch.manual_seed(0)
    h = torch.randn(2, 7, 16, requires_grad=True)
    w = torch.randn(50, 16)
    y = torch.randint(0, 50, (2, 7))
    want = F.cross_entropy((h @ w.t()).reshape(-1, 50), y.reshape(-1))
    (gw,) = torch.autograd.grad(want, h)
    got = lm_loss(h, w, y, chunk=3)  # chunks that do not divide the 14 tokens
    (gg,) = torch.autograd.grad(2 * got, h)  # the incoming gradient is applied
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(gg, 2 * gw, atol=1e-6)
    with pytest.raises(ValueError, match="gives the head no gradient"):  # a trainable head would silently get none
        lm_loss(h, w.requires_grad_(), y)


def test_chunked_loss_gradient_in_bf16_when_the_model_is_confident():
    """With p(target) near 1 the gradient (p - 1) is tiny; it must be formed in fp32 before the bf16 matmul, or
    bf16's rounding of p near 1 swamps it (a 10% error instead of the matmul's 2%)."""
    torch.manual_seed(0)
    w = torch.randn(50, 16).bfloat16()
    y = torch.randint(0, 50, (2, 7))
    h = (w[y].float() + 0.1 * torch.randn(2, 7, 16)).bfloat16()  # mean p(target) ~ 0.99
    h64 = h.double().requires_grad_()
    loss64 = F.cross_entropy((h64 @ w.double().t()).reshape(-1, 50), y.reshape(-1))
    (want,) = torch.autograd.grad(loss64, h64)
    hb = h.clone().requires_grad_()
    loss = lm_loss(hb, w, y)
    (got,) = torch.autograd.grad(loss, hb)
    assert got.dtype == torch.bfloat16 and abs(loss.item() - loss64.item()) < 1e-3
    assert (got.double() - want).norm() / want.norm() < 0.05


@pytest.mark.parametrize("variant,pool", KINDS)
@pytest.mark.parametrize("gate", [True, False])
def test_one_pass_readout_equals_separate_forwards(ckpt, variant, pool, gate):
    """readout (the loop run once, the coda reading out each depth asked for) gives what a forward at each depth
    gives: logits, and each window's loss read out through the head."""
    model = ouroboros(ckpt[0], **SPLIT, variant=variant, pool=pool, gate=gate)
    randomise_trainable(model, scale=0.1)
    x, depths, y = ids(3, 20), [1, 3, 4, 7], ids(3, 20, seed=1)
    with torch.no_grad():
        states = model.readout(x, depths)
        assert list(states) == depths
        for d, h in states.items():
            want = model(x, depth=d)
            assert (model.base.head(h) - want).abs().max() <= 1e-5
            for b in range(3):
                assert abs(model.base.head(h[b:b + 1], y[b:b + 1]) - F.cross_entropy(want[b], y[b])) <= 1e-5
        assert (model.base.head(states[1]) - model.base.head(states[7])).abs().max() > 1e-3  # the depths differ
