"""The recursive model: causality, leaks, gradients, SVD bases, initial state, frozen base, sizes."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_checkpoint, ouroboros, randomise_trainable
from controller import TARGETS, Controller, Gate, StepNorm, svd_bases
from load_qwen import load_model
from model import lm_loss

SPLIT = dict(prelude=2, recurrent=3, coda=2)  # of 7 layers: removed 2, 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "qwen")
    hf = make_checkpoint(path, layers=7)
    return path, hf


def ids(*shape, seed=0):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", ["controller", "static"])
def test_default_is_causal(ckpt, variant):
    model = ouroboros(ckpt[0], **SPLIT, variant=variant)
    randomise_trainable(model)
    x = ids(1, 24)
    y = x.clone()
    y[0, 12:] = (y[0, 12:] + 1) % 128  # change the future from position 12 on
    with torch.no_grad():
        a, b = model(x, depth=3), model(y, depth=3)
    assert torch.equal(a[:, :12], b[:, :12])  # the past does not see it
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-2  # and the change is real


def test_mean_pool_leaks_the_future(ckpt):
    model = ouroboros(ckpt[0], **SPLIT, pool="mean")
    randomise_trainable(model)
    x = ids(1, 24)
    y = x.clone()
    y[0, 12:] = (y[0, 12:] + 1) % 128
    with torch.no_grad():
        a, b = model(x, depth=3), model(y, depth=3)
    assert (a[:, :12] - b[:, :12]).abs().max() > 1e-3


@pytest.mark.parametrize("pool", ["causal", "mean"])
def test_sequences_do_not_see_their_batch(ckpt, pool):
    model = ouroboros(ckpt[0], **SPLIT, pool=pool)
    randomise_trainable(model)
    a, b, c = ids(1, 16, seed=1), ids(1, 16, seed=2), ids(1, 16, seed=3)
    with torch.no_grad():
        ab, ac = model(torch.cat([a, b]), depth=2), model(torch.cat([a, c]), depth=2)
    assert (ab[0] - ac[0]).abs().max() < 1e-5
    assert (ab[1] - ac[1]).abs().max() > 1e-2


@pytest.mark.parametrize("variant,gate", [("controller", True), ("static", True), ("none", True),
                                          ("controller", False)])
def test_every_trainable_tensor_gets_a_gradient(ckpt, variant, gate):
    model = ouroboros(ckpt[0], **SPLIT, variant=variant, gate=gate)
    randomise_trainable(model)
    model(ids(2, 16), depth=3, labels=ids(2, 16, seed=5)).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # rows of steps that did not run get nothing
    assert model.step_norm.weight.grad[3:].abs().sum() == 0


def test_heads_get_gradient_at_initialisation(ckpt):
    """Zero heads must not be a dead end: they are the first thing to move."""
    model = ouroboros(ckpt[0], **SPLIT)
    model(ids(2, 16), depth=2, labels=ids(2, 16, seed=5)).backward()
    for t in TARGETS:
        assert model.diagonals.heads[t].weight.grad.abs().sum() > 0, t


def test_bases_are_the_best_rank_r_approximation_of_the_mean_residual(ckpt):
    path, hf = ckpt
    model = ouroboros(path, **SPLIT, rank=8)
    sd = {k: v.double().numpy() for k, v in hf.state_dict().items()}
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    for t, proj in names.items():
        w = lambda i: sd[f"model.layers.{i}.{proj}.weight"]
        residual = (w(2) + w(4)) / 2 - w(3)  # removed layers 2 and 4, recurrent 3
        U, S, Vt = np.linalg.svd(residual, full_matrices=False)
        best = (U[:, :8] * S[:8]) @ Vt[:8]
        lora = model.recurrent.self_attn if t in "qkvo" else model.recurrent.mlp
        lora = getattr(lora, f"{t}_proj")
        got = (lora.B.double() @ lora.A.double()).numpy()
        assert np.abs(got - best).max() < 1e-5 * np.abs(best).max(), t
        assert lora.A.shape == (8, residual.shape[1]) and lora.B.shape == (residual.shape[0], 8)


def test_svd_bases_rank_checked():
    with pytest.raises(ValueError, match="rank 9 must be in 1..8"):
        svd_bases(torch.randn(8, 16), 9)


def test_initial_state_lora_zero_and_gate_88_percent(ckpt):
    model = ouroboros(ckpt[0], **SPLIT)
    x = torch.randn(2, 5, 64)
    diag = model.diagonals(x, 0)
    for t in TARGETS:
        assert torch.equal(diag[t], torch.zeros(2, 5, 8 * 4))  # rank 32
    q = model.recurrent.self_attn.q_proj
    assert torch.equal(q(x, diag["q"]), q.base(x))  # the LoRA delta is exactly zero
    h_new, h_old = torch.ones(2, 5, 64), torch.zeros(2, 5, 64)
    mixed = model.gate(h_new, h_old)
    assert torch.allclose(mixed, torch.full_like(mixed, 0.1192), atol=1e-4)  # g = sigmoid(-2)
    assert torch.allclose(model.gate(h_old, h_new), torch.full_like(mixed, 0.8808), atol=1e-4)


def test_base_is_frozen_through_an_optimiser_step(ckpt):
    model = ouroboros(ckpt[0], **SPLIT)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith(".A") for n in frozen) and any("embed_tokens" in n for n in frozen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model(ids(2, 16), depth=2, labels=ids(2, 16, seed=5)).backward()
    opt.step()
    after = dict(model.named_parameters())
    for n, p in frozen.items():
        assert torch.equal(after[n], p), n
    assert any(not torch.equal(after[n], p) for n, p in trainable.items())
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)


def test_trainable_stays_fp32_with_bf16_base(ckpt):
    model = ouroboros(ckpt[0], **SPLIT, dtype=torch.bfloat16)
    assert model.base.embed_tokens.weight.dtype == torch.bfloat16
    assert model.recurrent.mlp.up_proj.A.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 base runs under autocast, as train.py does
        assert model(ids(1, 8), depth=2).shape == (1, 8, 128)


def test_parameter_counts_match_the_formulas(ckpt):
    d, r, s, steps = 64, 32, 128, 64
    model = ouroboros(ckpt[0], **SPLIT)
    count = lambda m: sum(p.numel() for p in m.parameters())
    controller = (d * 2 * s + 2 * s) + steps * s + (3 * s * 2 * s + 2 * s) + (2 * s * s + s) + 7 * s * r
    assert count(model.diagonals) == controller
    assert count(model.gate) == 2 * d * d + d
    assert count(model.step_norm) == steps * d
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == controller + 2 * d * d + d + steps * d
    static = ouroboros(ckpt[0], **SPLIT, variant="static", gate=False)
    assert sum(p.numel() for p in static.parameters() if p.requires_grad) == steps * 7 * r + steps * d
    # at the paper's d = 2048: 692,864 + 8,390,656 + 131,072 = 9,214,592
    assert count(Controller(2048, 32, 128, 64, "causal")) == 692_864 and count(Gate(2048)) == 8_390_656
    assert count(StepNorm(2048, 64)) == 131_072


def test_pruned_is_the_kept_layers_run_once(ckpt):
    path, _ = ckpt
    model = ouroboros(path, **SPLIT)
    kept = load_model(path, layers=[0, 1, 3, 5, 6])
    x = ids(2, 16)
    with torch.no_grad():
        assert torch.allclose(model.pruned(x), kept(x), atol=1e-6)
        assert (model(x, depth=1) - kept(x)).abs().max() > 1e-3  # step norm + gate change it


def test_no_gate_depth_one_is_the_normalised_layer(ckpt):
    """variant none, no gate: one step is exactly the step-normed recurrent layer."""
    model = ouroboros(ckpt[0], **SPLIT, variant="none", gate=False)
    x = ids(1, 12)
    with torch.no_grad():
        h, cos, sin = model.embed_prelude(x)
        h = model.recurrent(h, cos, sin)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        assert torch.allclose(model(x, depth=1), model.coda_head(h, cos, sin, None), atol=1e-5)


def test_depth_and_split_errors(ckpt):
    model = ouroboros(ckpt[0], **SPLIT)
    with pytest.raises(ValueError, match="depth 65 must be in 1..64"):
        model(ids(1, 4), depth=65)
    with pytest.raises(ValueError, match="recurrent layer 1 must lie between"):
        ouroboros(ckpt[0], prelude=2, recurrent=1, coda=2)
    with pytest.raises(ValueError, match="recurrent layer 5 must lie between"):
        ouroboros(ckpt[0], prelude=2, recurrent=5, coda=2)
    with pytest.raises(ValueError, match="nothing is removed"):
        ouroboros(ckpt[0], prelude=3, recurrent=3, coda=3)
    with pytest.raises(ValueError, match="must leave room"):
        ouroboros(ckpt[0], prelude=4, recurrent=3, coda=3)
    with pytest.raises(ValueError, match="variant must be"):
        ouroboros(ckpt[0], **SPLIT, variant="dynamic")
    with pytest.raises(ValueError, match="pool must be"):
        ouroboros(ckpt[0], **SPLIT, pool="max")


def test_checkpointed_steps_give_the_same_gradients(ckpt):
    model = ouroboros(ckpt[0], **SPLIT)
    randomise_trainable(model)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.checkpoint_steps = flag
        model(ids(2, 16), depth=3, labels=ids(2, 16, seed=5)).backward()
        grads.append(model.diagonals.state_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0


def test_chunked_loss_matches_cross_entropy_and_its_gradient():
    torch.manual_seed(0)
    h = torch.randn(2, 7, 16, requires_grad=True)
    w = torch.randn(50, 16)
    y = torch.randint(0, 50, (2, 7))
    y[1, 3] = -100  # ignored
    want = F.cross_entropy((h @ w.t()).reshape(-1, 50), y.reshape(-1), ignore_index=-100)
    (gw,) = torch.autograd.grad(want, h)
    got = lm_loss(h, w, y, chunk=3)  # chunks that do not divide the 14 tokens
    (gg,) = torch.autograd.grad(2 * got, h)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(gg, 2 * gw, atol=1e-6)
    with pytest.raises(ValueError, match="labels"):
        lm_loss(h, w, y[:, 1:])


def test_chunked_loss_gradient_in_bf16_when_the_model_is_confident():
    """With p(target) near 1 the gradient (p - 1) is tiny; it must be formed in fp32 before the bf16
    matmul, or bf16's rounding of p near 1 swamps it (a 10% error instead of the matmul's 2%)."""
    torch.manual_seed(0)
    w = torch.randn(50, 16).bfloat16()
    y = torch.randint(0, 50, (2, 7))
    h = (w[y].float() + 0.1 * torch.randn(2, 7, 16)).bfloat16()  # mean p(target) ~ 0.99
    h64 = h.double().requires_grad_()
    (want,) = torch.autograd.grad(F.cross_entropy((h64 @ w.double().t()).reshape(-1, 50), y.reshape(-1)), h64)
    hb = h.clone().requires_grad_()
    (got,) = torch.autograd.grad(lm_loss(hb, w, y), hb)
    assert (got.double() - want).norm() / want.norm() < 0.05


@pytest.mark.parametrize("variant,pool,gate", [("controller", "causal", True), ("controller", "mean", True),
                                               ("static", "causal", True), ("none", "causal", False)])
def test_one_pass_readout_equals_separate_forwards(ckpt, variant, pool, gate):
    """eval.py's readout (the loop run once, the coda reading out each depth) gives what a forward at
    each depth gives: logits, and each window's loss of every objective read out through the head."""
    model = ouroboros(ckpt[0], **SPLIT, variant=variant, pool=pool, gate=gate)
    randomise_trainable(model)
    x, depths = ids(3, 20), [1, 3, 4, 7]
    labels = [ids(3, 20, seed=1), ids(3, 20, seed=2)]
    with torch.no_grad():
        states = model.readout(x, depths)
        assert list(states) == depths
        for d, h in states.items():
            want = model(x, depth=d)
            assert (model.base.head(h) - want).abs().max() <= 1e-5
            for y in labels:
                for b in range(3):
                    assert abs(model.base.head(h[b:b + 1], y[b:b + 1]) - F.cross_entropy(want[b], y[b])) <= 1e-5
        assert (model.base.head(states[1]) - model.base.head(states[7])).abs().max() > 1e-3  # the depths really differ
