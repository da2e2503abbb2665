"""Meta-gradients: finite differences, first vs second order, the inner step, determinism, shapes."""
import pytest
import torch
from torch.func import functional_call

from metamae.train import compile_loss
from tests.conftest import SPECS, random_batch, tiny_model


def fixed_draws(model, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = model.tokenizer.num_tokens
    return torch.rand(batch, N, generator=g), torch.rand(batch, N, generator=g)


def loss_of(model, names, x, u0, u1):
    """total loss as a function of the named parameters (everything else fixed)."""
    params = dict(model.named_parameters())

    def f(*values):
        return functional_call(model, {**params, **dict(zip(names, values))}, (x,),
                               {"masking_noise": u0, "support_noise": u1}).total
    return f


@pytest.mark.parametrize("kind", ["timeseries", "image", "tokens"])
def test_second_order_meta_gradient_matches_finite_differences(kind):
    model = tiny_model(kind, mask_ratio=0.5, inner_lr=0.3, learn_inner_lr=True, contrastive_weight=0.5)
    x = random_batch(model.spec, 4, torch.Generator().manual_seed(0), torch.float64)
    u0, u1 = fixed_draws(model, 4)
    u1 = u1 * 0.2                              # a support set with hidden tokens in it (6 of 8, 13 of 16,
                                               # 8 of 10 at most: the inner step's last block is pruned)
    names = ["encoder.0.attn.proj.weight", "encoder.1.mlp.fc2.bias", "cls_token",
             "decoder.0.attn.qkv.weight", "decoder.0.mlp.fc1.bias", "dec_embed.bias",
             "tokenizer.head.bias", "inner_lr"]
    params = dict(model.named_parameters())
    inputs = tuple(params[n].detach().clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(loss_of(model, names, x, u0, u1), inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def grads(model, x, u0, u1):
    model.zero_grad()
    model(x, masking_noise=u0, support_noise=u1).total.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_first_order_differs_from_second_order_and_equals_detached_inner_gradient():
    second = tiny_model("timeseries", first_order=False, contrastive_weight=1.0)
    first = tiny_model("timeseries", first_order=True, contrastive_weight=1.0)
    x = random_batch(second.spec, 6, torch.Generator().manual_seed(0), torch.float64)
    u0, u1 = fixed_draws(second, 6)
    g2, g1 = grads(second, x, u0, u1), grads(first, x, u0, u1)

    # The same computation by hand, with ∇_z detached.
    model = tiny_model("timeseries", contrastive_weight=1.0)
    model.zero_grad()
    target = model.tokenizer.targets(x)
    z, mask, restore = model.encode(x, u0)
    from metamae.model import support_set, weighted_mean
    support = support_set(mask, model.tokenizer.nearby(mask == 0), u1, model.objective.support_ratio)
    inner = weighted_mean(model.tokenizer.token_loss(model.decode(z, restore), target), support)
    grad_z, = torch.autograd.grad(inner * x.shape[0], z)
    z_star = z - model.inner_lr * grad_z.detach()
    recon = weighted_mean(model.tokenizer.token_loss(model.decode(z_star, restore), target), mask)
    (recon + model.contrast(z, z_star)).backward()
    by_hand = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert g1.keys() == by_hand.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], by_hand[name], rtol=1e-10, atol=1e-12, msg=name)
    differing = [n for n in g1 if not torch.allclose(g1[n], g2[n], rtol=1e-6, atol=1e-9)]
    assert any(n.startswith("encoder.") for n in differing)
    assert any(n.startswith("decoder.") for n in differing)


@pytest.mark.parametrize("first_order", [False, True])
def test_compiled_meta_gradients_equal_the_eager_ones(first_order):
    """Under torch.compile the inner gradient goes through torch.func; first order still drops its
    graph. aot_eager traces what inductor would compile, without building C++ (test_train.py
    compiles with inductor). A batch of another size, drawing its own masks, compiles again."""
    settings = dict(first_order=first_order, contrastive_weight=1.0, mask_ratio=0.85)   # a pruned block compiled
    eager, compiled = tiny_model("timeseries", **settings), tiny_model("timeseries", **settings)
    compile_loss(compiled, backend="aot_eager")
    x = random_batch(eager.spec, 6, torch.Generator().manual_seed(0), torch.float64)
    u0, u1 = fixed_draws(eager, 6)
    g_eager, g_compiled = grads(eager, x, u0, u1), grads(compiled, x, u0, u1)
    assert g_compiled.keys() == g_eager.keys()
    for name in g_eager:
        torch.testing.assert_close(g_compiled[name], g_eager[name], rtol=1e-9, atol=1e-12, msg=name)
    assert torch.isfinite(compiled(x[:4]).total)


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_a_small_inner_step_lowers_the_support_loss(kind):
    model = tiny_model(kind, inner_lr=0.05)
    model.eval()                                                # no dropout, fixed batch-norm
    x = random_batch(model.spec, 8, torch.Generator().manual_seed(0), torch.float64)
    losses = model(x, *fixed_draws(model, 8))
    assert losses.support_after < losses.support_before


def test_more_inner_steps_lower_the_support_loss_further():
    x = random_batch(SPECS["image"], 8, torch.Generator().manual_seed(0), torch.float64)
    after = []
    for steps in (1, 3):
        model = tiny_model("image", inner_lr=0.05, inner_steps=steps).eval()
        after.append(model(x, *fixed_draws(model, 8)).support_after)
    assert after[1] < after[0]


@pytest.mark.parametrize("method", ["metamae", "mae"])
def test_every_modality_gives_finite_losses_and_gradients(kind, method):
    model = tiny_model(kind, dtype=torch.float32, method=method)
    x = random_batch(model.spec, 4, torch.Generator().manual_seed(0))
    losses = model(x)
    losses.total.backward()
    assert losses.total.shape == () and torch.isfinite(losses.total)
    for value in losses.scalars().values():
        assert value == value and abs(value) != float("inf")
    assert (losses.contrastive is None) == (method == "mae")
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    N = model.tokenizer.num_tokens
    z, mask, restore = model.encode(x, torch.rand(4, N))
    K = int(N * (1 - model.objective.mask_ratio))
    assert z.shape == (4, 1 + K, 16) and mask.shape == (4, N) and mask.sum() == 4 * (N - K)
    assert model.features(x).shape == (4, 16)
    assert model.features(x, per_token=True).shape == (4, N, 16)


def test_the_same_seed_gives_the_same_loss_and_gradients_twice():
    runs = []
    for _ in range(2):
        model = tiny_model("image", dtype=torch.float32, seed=7, dropout=0.1)
        x = random_batch(model.spec, 4, torch.Generator().manual_seed(1))
        torch.manual_seed(3)                                    # dropout
        losses = model(x, generator=torch.Generator().manual_seed(5))
        losses.total.backward()
        runs.append((losses.total.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    other = tiny_model("image", dtype=torch.float32, seed=7, dropout=0.1)
    x = random_batch(other.spec, 4, torch.Generator().manual_seed(1))
    assert not torch.equal(other(x, generator=torch.Generator().manual_seed(6)).total.detach(), runs[0][0])
