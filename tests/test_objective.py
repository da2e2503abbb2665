"""The MetaMAE objective, pinned draw for draw against an independent re-implementation of the
published code (tests/published_reference.py), and its gradients checked by finite differences."""
import re

import pytest
import torch

from metamae.modality import nearby_1d, nearby_2d
from metamae.model import ModelConfig, random_masking, support_set, weighted_mean, weighted_rows
from tests.conftest import SPECS, random_batch, tiny_model
from tests.published_reference import RefMetaMAE

# Our parameter names -> the published code's.
RENAMES = [("tokenizer.proj.", "patch_embed."), ("tokenizer.head.", "decoder_head."),
           ("enc_norm.", "norm_enc."), ("dec_norm.", "norm_dec."), ("dec_embed.", "decoder_embed.")]


def renamed(name: str) -> str:
    for ours, theirs in RENAMES:
        name = name.replace(ours, theirs)
    return name


def published_shape(spec):
    """The published constructor's (kind, channels, length or side, patch, vocab) for a spec."""
    if spec.kind == "timeseries":
        return "1d", spec.channels, spec.length, spec.patch, None
    if spec.kind == "tabular":
        return "1d", 1, spec.features, 1, None
    if spec.kind == "image":
        return "2d", spec.channels, spec.height, spec.patch, None
    return "tokens", None, spec.length, 1, spec.vocab


def reference_of(model) -> RefMetaMAE:
    """The published model with `model`'s weights copied in by name."""
    spec, cfg, obj = model.spec, model.config, model.objective
    kind, channels, length, patch, vocab = published_shape(spec)
    ref = RefMetaMAE(kind, channels, length, patch, vocab, enc_dim=cfg.enc_width, enc_depth=cfg.enc_depth,
                     enc_heads=cfg.enc_heads, dec_dim=cfg.dec_width, dec_depth=cfg.dec_depth,
                     dec_heads=cfg.dec_heads, dropout=cfg.dropout, mask_ratio=obj.mask_ratio,
                     inner_lr=obj.inner_lr, reg_weight=obj.contrastive_weight, s_ratio=obj.support_ratio,
                     first_order=obj.first_order, temperature=obj.temperature)
    ref.projector[3] = torch.nn.Linear(4 * cfg.enc_width, cfg.projector_dim, bias=False)
    ref = ref.to(torch.float64)
    state = {renamed(name): value for name, value in model.state_dict().items() if name != "inner_lr"}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    allowed = {"pos_embed", "decoder_pos_embed"} | ({k for k in missing if k.startswith("projector.")}
                                                  if obj.method == "mae" else set())
    assert set(missing) <= allowed and not unexpected
    return ref


def draws(model, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    N = model.tokenizer.num_tokens
    return torch.rand(batch, N, generator=g), torch.rand(batch, N, generator=g)


@pytest.mark.parametrize("kind", ["timeseries", "tabular", "tokens", "image"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("mask_ratio", [0.6, 0.85])        # the inner step prunes its last block, more at 0.85
def test_metamae_matches_published_code_draw_for_draw(kind, first_order, mask_ratio):
    model = tiny_model(kind, mask_ratio=mask_ratio, inner_lr=0.5, contrastive_weight=1.0, first_order=first_order)
    ref = reference_of(model)
    x = random_batch(model.spec, 6, torch.Generator().manual_seed(1), torch.float64)
    u0, u1 = draws(model, 6, seed=2)
    ours = model(x, masking_noise=u0, support_noise=u1)
    theirs = ref.metamae_loss(x, u0, u1)
    for ours_term, their_term in [(ours.total, "loss"), (ours.reconstruction, "recon"),
                                  (ours.contrastive, "contrastive")]:
        torch.testing.assert_close(ours_term, theirs[their_term], rtol=1e-10, atol=1e-12)
    ours_grads = torch.autograd.grad(ours.total, [p for p in model.parameters() if p.requires_grad])
    ref_params = dict(ref.named_parameters())
    their_grads = torch.autograd.grad(theirs["loss"], list(ref_params.values()), allow_unused=True)
    their_grads = dict(zip(ref_params, their_grads))
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    for name, grad in zip(trained, ours_grads):
        torch.testing.assert_close(grad, their_grads[renamed(name)], rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("kind", ["timeseries", "tokens", "image"])
def test_mae_matches_published_code(kind):
    model = tiny_model(kind, method="mae", mask_ratio=0.75)
    ref = reference_of(model)
    x = random_batch(model.spec, 4, torch.Generator().manual_seed(3), torch.float64)
    u0, _ = draws(model, 4, seed=4)
    torch.testing.assert_close(model(x, masking_noise=u0).total, ref.mae_loss(x, u0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_a_pruned_last_block_gives_the_whole_decoders_support_loss_and_second_order_gradients(kind):
    model = tiny_model(kind, mask_ratio=0.85)
    x = random_batch(model.spec, 6, torch.Generator().manual_seed(5), torch.float64)
    u0, _ = draws(model, 6, seed=6)
    z, mask, restore = model.encode(x, u0)
    support = support_set(mask, model.tokenizer.nearby(mask == 0), torch.zeros_like(mask), ratio=1.0)  # largest
    bound = (z.shape[1] - 1) * (1 + model.tokenizer.neighbours)
    rows = weighted_rows(support, bound)
    assert rows is not None and rows.shape == (6, bound)
    assert torch.equal(torch.zeros_like(support).scatter(1, rows, 1.0) * support, support)   # all rows read
    target, weight = model.tokenizer.targets(x), model.decoder[0].mlp.fc1.weight
    results = []
    for r in (None, rows):
        pred = model.decode(z, restore, twice_differentiable=True, rows=r)
        loss = weighted_mean(model.tokenizer.token_loss(pred, target), support)
        grad_z, = torch.autograd.grad(loss, z, create_graph=True)
        grad_weight, = torch.autograd.grad((grad_z * grad_z).sum(), weight)        # through ∇_z
        results.append((loss, grad_z, grad_weight))
    for whole, pruned in zip(*results):
        torch.testing.assert_close(pruned, whole, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_a_visible_token_has_at_most_neighbours_hidden_tokens_nearby(kind):
    tokenizer = tiny_model(kind).tokenizer
    one_visible = torch.eye(tokenizer.num_tokens, dtype=torch.bool)         # row i: only token i visible
    assert (tokenizer.nearby(one_visible).sum(1) - 1).max() <= tokenizer.neighbours


def test_the_loss_evaluates_under_no_grad_as_with_grad():
    model = tiny_model("image", mask_ratio=0.5)
    x = random_batch(model.spec, 4, torch.Generator().manual_seed(0), torch.float64)
    u0, u1 = draws(model, 4, seed=1)
    with torch.no_grad():                                     # a validation pass: the inner step still runs
        evaluated = model(x, masking_noise=u0, support_noise=u1)
    trained = model(x, masking_noise=u0, support_noise=u1)
    assert evaluated.support_after < evaluated.support_before and not evaluated.total.requires_grad
    torch.testing.assert_close(evaluated.total, trained.total.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("objective, message", [
    ({"mask_ratio": 0.0}, "objective.mask_ratio is 0.0"),
    ({"mask_ratio": 0.99}, "leaves none of the 16 tokens"),         # image 8 × 8, patch 2: int(16 · 0.01) = 0
    ({"support_ratio": 1.5}, "objective.support_ratio is 1.5"),
    ({"inner_lr": -1.0}, "objective.inner_lr=-1.0"),
])
def test_an_objective_that_cannot_be_computed_is_refused_naming_the_key(objective, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny_model("image", **objective)


def test_a_batch_that_does_not_fit_the_spec_is_named():
    model = tiny_model("image")                                   # 2 × 8 × 8 examples
    x = torch.zeros(4, 3, 8, 8, dtype=torch.float64)
    for run in (lambda: model(x), lambda: model.features(x)):
        with pytest.raises(ValueError, match=re.escape("a batch of shape (4, 3, 8, 8) does not fit the image "
                                                       "input")):
            run()


def test_model_sizes_that_do_not_fit_are_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"model.enc_width=30, model.enc_depth=2, model.enc_heads=4"):
        ModelConfig(enc_width=30, enc_depth=2, enc_heads=4)
    with pytest.raises(ValueError, match="model.dropout is 1.0"):
        ModelConfig(dropout=1.0)


def test_mask_keeps_int_n_times_one_minus_m():
    kept, mask, restore = random_masking(torch.zeros(2, 64, 4), 0.85, torch.rand(2, 64))
    assert kept.shape == (2, 9, 4) and mask.sum().item() == 2 * 55      # int(64 · 0.15) = 9
    assert torch.equal(restore.sort(dim=1).values, torch.arange(64).expand(2, 64))


def test_support_set_1d_holds_visible_and_only_adjacent_hidden_tokens():
    mask = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 0, 1, 1.]])
    everything = torch.zeros_like(mask)                      # u1 = 0 < r: keep every candidate
    support = support_set(mask, nearby_1d(mask == 0), everything, ratio=0.1)
    assert support.tolist() == [[1, 1, 0, 1, 1, 1, 1, 1, 1, 0]]
    nothing = torch.ones_like(mask)                           # u1 = 1 >= r: only visible tokens
    assert support_set(mask, nearby_1d(mask == 0), nothing, 0.1).tolist() == [(1 - mask).tolist()[0]]


def test_support_set_2d_uses_the_4_neighbourhood():
    visible = torch.zeros(1, 4, 4, dtype=torch.bool)
    visible[0, 1, 1] = True                                   # one visible token at row 1, column 1
    near = nearby_2d(visible.view(1, 16), 4, 4).view(4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    for r, c in [(1, 1), (0, 1), (2, 1), (1, 0), (1, 2)]:
        expected[r, c] = True
    assert torch.equal(near, expected)                        # no diagonals, no wrap-around
    corner = torch.zeros(1, 16, dtype=torch.bool)
    corner[0, 3] = True                                       # row 0, last column: no wrap to row 1
    assert nearby_2d(corner, 4, 4).view(4, 4).nonzero().tolist() == [[0, 2], [0, 3], [1, 3]]


def test_support_set_draws_with_probability_r():
    torch.manual_seed(0)
    mask = (torch.rand(200, 50) < 0.7).double()
    near = nearby_1d(mask == 0)
    support = support_set(mask, near, torch.rand(200, 50), ratio=0.3)
    candidates = (mask == 1) & near
    chosen = (support == 1) & candidates
    assert torch.all(support[mask == 0] == 1)
    assert torch.all(support[(mask == 1) & ~near] == 0)
    assert abs(chosen.sum() / candidates.sum() - 0.3) < 0.03
