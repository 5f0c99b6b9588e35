import pytest
import torch
import torch.nn.functional as F

import pixelcnn
from errors import DataError
from metrics import ssim_per_image
from modules import (GatedPixelCNN, MaskedConv2d, PixelCNNConfig, VQVAE, VQVAEConfig, VectorQuantizer, build_prior,
                     columns_seen, rows_seen_above)
from prior import nucleus, sample_codes, slice_conditions
from train import PRESETS

TINY_VQ = dict(hidden=16, res_hidden=8, num_codes=32, code_dim=8)


def test_vqvae_shapes_through_every_module():
    torch.manual_seed(0)
    for n_down in (2, 3):
        model = VQVAE(VQVAEConfig(n_downsample=n_down, **TINY_VQ))
        x = torch.rand(3, 1, 64, 64)
        z = model.encoder(x)
        grid = 64 // 2 ** n_down
        assert z.shape == (3, 8, grid, grid)
        logits, vq_loss, indices, stats = model(x)
        assert logits.shape == x.shape
        assert indices.shape == (3, grid, grid) and indices.dtype == torch.long
        assert vq_loss.ndim == 0 and vq_loss >= 0
        assert 1 <= stats["perplexity"] <= 32
        assert model.decode_indices(indices).shape == x.shape


def test_quantizer_returns_codebook_vectors_and_passes_gradients_straight_through():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, ema=False, dead_code_steps=0)
    vq.eval()
    z = torch.randn(2, 4, 5, 5, requires_grad=True)
    quantized, _, indices, _ = vq(z)
    flat = quantized.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.allclose(flat, vq.codebook[indices.flatten()])
    # each chosen code is the nearest one by Euclidean distance
    distances = torch.cdist(z.detach().permute(0, 2, 3, 1).reshape(-1, 4), vq.codebook.detach())
    assert torch.equal(indices.flatten(), distances.argmin(1))
    weights = torch.randn_like(quantized)
    (quantized * weights).sum().backward()
    assert torch.allclose(z.grad, weights)


def test_ema_update_moves_codes_toward_assigned_encoder_outputs():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 2, ema=True, ema_decay=0.5, dead_code_steps=0)
    vq.initialized.fill_(True)
    vq.codebook.data = torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0], [10.0, -10.0]])
    vq.ema_sum.copy_(vq.codebook.data)
    target = torch.tensor([1.0, 1.0])
    z = target.view(1, 2, 1, 1).expand(1, 2, 3, 3).contiguous()
    before = (vq.codebook[0] - target).norm()
    vq.train()
    vq(z)
    after = (vq.codebook[0] - target).norm()
    assert after < before
    assert torch.allclose(vq.codebook[1], torch.tensor([10.0, 10.0]), atol=1e-3)  # unassigned: stay put


def is_row_of(rows, table):
    return (rows[:, None] == table[None]).all(-1).any(1)


def test_a_dead_code_is_restarted_from_encoder_outputs():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 3, ema=True, dead_code_steps=3)
    vq.train()
    z = torch.randn(1, 3, 4, 4)
    vq(z)  # seeds the codebook from z
    vq.codebook.data[5] = 1e3  # a code far from everything: never chosen
    vq.ema_sum[5] = 1e3
    for _ in range(3):
        vq(z)
    outputs = z.permute(0, 2, 3, 1).reshape(-1, 3)
    assert (vq.codebook[5].abs() < 1e2).all()
    assert is_row_of(vq.codebook[5:6].detach(), outputs).all()
    assert vq.steps_unused[5] < 3


def test_codebook_is_seeded_from_the_first_batch():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 3, ema=False, dead_code_steps=0)
    z = torch.randn(2, 3, 4, 4) + 50
    vq.train()
    vq(z)
    outputs = z.permute(0, 2, 3, 1).reshape(-1, 3)
    assert is_row_of(vq.codebook.detach(), outputs).all()


def test_quantizer_runs_in_float32_under_bf16_autocast():
    vq = VectorQuantizer(8, 4, dead_code_steps=0)
    vq.train()
    z = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        quantized, loss, _, _ = vq(z)
    assert quantized.dtype == torch.float32 and loss.dtype == torch.float32
    assert vq.codebook.dtype == torch.float32


def input_gradient_map(forward, height, width, row, col, channels):
    """|d output[row, col] / d input| summed over channels, as a (height, width) map."""
    x = torch.randn(1, channels, height, width, dtype=torch.float64, requires_grad=True)
    out = forward(x)
    out[0, :, row, col].sum().backward()
    return x.grad[0].abs().sum(0)


def raster(height, width):
    return torch.arange(height * width).view(height, width)


def test_masked_conv_type_a_never_sees_current_or_later_positions():
    torch.manual_seed(0)
    conv = MaskedConv2d(2, 3, 5, "A").double()
    for row, col in [(0, 0), (3, 4), (7, 7), (4, 0)]:
        grad = input_gradient_map(conv, 8, 8, row, col, 2)
        pos = row * 8 + col
        assert (grad[raster(8, 8) >= pos] == 0).all()
        if pos > 0:
            assert grad[raster(8, 8) < pos].sum() > 0


def test_masked_conv_type_b_sees_current_but_never_later_positions():
    torch.manual_seed(0)
    conv = MaskedConv2d(2, 3, 5, "B").double()
    grad = input_gradient_map(conv, 8, 8, 3, 4, 2)
    assert (grad[raster(8, 8) > 3 * 8 + 4] == 0).all()
    assert grad[3, 4] > 0


def prior_input_gradients(model, indices, row, col):
    """Gradient of the logits at (row, col) with respect to every input code's embedding."""
    embedded = model.embed(indices).detach().requires_grad_(True)
    original = model.embed.forward
    model.embed.forward = lambda *_: embedded
    try:
        logits = model(indices, torch.zeros(len(indices), dtype=torch.long))
    finally:
        model.embed.forward = original
    logits[0, :, row, col].sum().backward()
    return embedded.grad[0].abs().sum(0)


def test_gated_pixelcnn_is_causal_and_has_no_blind_spot():
    torch.manual_seed(0)
    cfg = PixelCNNConfig(num_codes=10, hidden=8, n_layers=4, kernel=5, n_conditions=2)
    model = build_prior(cfg).double()
    h = w = 8
    indices = torch.randint(0, 10, (1, h, w))
    for row, col in [(0, 0), (0, 5), (1, 0), (3, 3), (4, 7), (7, 0), (7, 7)]:
        grad = prior_input_gradients(model, indices, row, col)
        pos = raster(h, w)
        assert (grad[pos >= row * w + col] == 0).all(), (row, col)
        # every earlier position is seen, including the up-right ones a plain stack misses
        assert (grad[pos < row * w + col] > 0).all(), (row, col)


def test_plain_pixelcnn_is_causal_but_has_a_blind_spot():
    torch.manual_seed(0)
    cfg = PixelCNNConfig(num_codes=10, kind="plain", hidden=8, n_layers=4, n_conditions=2)
    model = build_prior(cfg).double()
    indices = torch.randint(0, 10, (1, 8, 8))
    grad = prior_input_gradients(model, indices, 5, 3)
    assert (grad[raster(8, 8) >= 5 * 8 + 3] == 0).all()
    assert grad[4, 7] == 0  # up and to the right: the blind spot of stacked masked convolutions


@pytest.mark.parametrize("kind,n_layers,kernel", [("gated", 2, 5), ("gated", 3, 3), ("gated", 1, 7),
                                                    ("plain", 2, 5), ("plain", 5, 5)])
def test_rows_seen_above_matches_what_the_gradient_reaches(kind, n_layers, kernel):
    torch.manual_seed(0)
    cfg = PixelCNNConfig(num_codes=10, kind=kind, hidden=8, n_layers=n_layers, kernel=kernel,
                         n_conditions=0, grid_size=12)
    model = build_prior(cfg).double()
    row, col, seen = 11, 5, rows_seen_above(cfg)
    grad = prior_input_gradients(model, torch.randint(0, 10, (1, 12, 12)), row, col)
    assert grad[row - seen].sum() > 0
    assert grad[:row - seen].sum() == 0


def test_the_default_prior_sees_the_whole_grid_of_the_default_vqvae():
    grid = PRESETS["quick"]["image_size"] // 2 ** VQVAEConfig().n_downsample
    assert rows_seen_above(PixelCNNConfig(grid_size=grid)) >= grid - 1


def test_a_prior_too_shallow_for_its_grid_is_reported_with_the_layers_that_would_fit():
    note = pixelcnn.receptive_field_note(PixelCNNConfig(grid_size=64, n_layers=20, kernel=7))
    assert note.startswith("warning") and "--n-layers 21" in note   # 1 + 21 * 3 = 64 >= 63
    assert not pixelcnn.receptive_field_note(PixelCNNConfig(grid_size=32)).startswith("warning")


def test_conditioning_changes_the_output_distribution():
    torch.manual_seed(0)
    for kind in ("gated", "plain"):
        model = build_prior(PixelCNNConfig(num_codes=10, kind=kind, hidden=8, n_layers=2, n_conditions=4, dropout=0.0))
        torch.nn.init.normal_(model.layers[0].cond.weight if kind == "gated" else model.cond.weight)
        indices = torch.randint(0, 10, (1, 6, 6))
        a = model(indices, torch.tensor([0]))
        b = model(indices, torch.tensor([3]))
        assert not torch.allclose(a, b)


def test_sampling_with_a_fixed_seed_is_reproducible_and_in_range():
    torch.manual_seed(0)
    model = build_prior(PixelCNNConfig(num_codes=10, hidden=8, n_layers=2, n_conditions=4)).eval()
    cond = torch.tensor([0, 3])
    a = sample_codes(model, 2, 5, 6, cond, generator=torch.Generator().manual_seed(7))
    b = sample_codes(model, 2, 5, 6, cond, generator=torch.Generator().manual_seed(7))
    c = sample_codes(model, 2, 5, 6, cond, generator=torch.Generator().manual_seed(8))
    assert a.shape == (2, 5, 6) and a.min() >= 0 and a.max() < 10
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("kind", ["gated", "plain"])
def test_cropped_sampling_uses_the_same_logits_as_the_full_model(kind):
    """Sampling with greedy decoding (temperature -> 0) must reproduce the full model's argmax,
    although it only evaluates the rows (plain) or the row band left of the position (gated)."""
    torch.manual_seed(0)
    model = build_prior(PixelCNNConfig(num_codes=12, hidden=8, n_layers=3, kernel=5, n_conditions=3,
                                       kind=kind)).eval()
    assert isinstance(model, GatedPixelCNN) == (kind == "gated")
    cond = torch.tensor([1, 2])
    codes = sample_codes(model, 2, 6, 7, cond, temperature=1e-4, generator=torch.Generator().manual_seed(0))
    logits = model(codes, cond)
    # each sampled code is the argmax of the full model's logits given the codes before it
    assert torch.equal(codes, logits.argmax(1))


def test_sampling_a_grid_wider_than_the_horizontal_stacks_reach_crops_columns_exactly():
    """With 2 layers of kernel 3 a code's row band is 3 columns; on a 9-wide grid most positions
    are sampled from a band that starts right of column 0."""
    torch.manual_seed(0)
    model = build_prior(PixelCNNConfig(num_codes=12, hidden=8, n_layers=2, kernel=3, n_conditions=3,
                                       grid_size=9)).eval()
    assert columns_seen(model.cfg) == 3
    cond = torch.tensor([0, 2])
    codes = sample_codes(model, 2, 5, 9, cond, temperature=1e-4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(codes, model(codes, cond).argmax(1))


def test_tiny_vqvae_overfits_a_handful_of_images():
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 24), torch.linspace(-1, 1, 24), indexing="ij")
    images = torch.stack([((xx - a) ** 2 / 0.4 + (yy - b) ** 2 / 0.25 < 1).float() * (0.4 + 0.5 * c)
                          for a, b, c in [(0, 0, 1), (0.2, -0.1, 0.5), (-0.2, 0.1, 0.7), (0.1, 0.2, 0.3)]])
    images = images[:, None]
    model = VQVAE(VQVAEConfig(hidden=32, res_hidden=16, num_codes=32, code_dim=16, dead_code_steps=20))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        logits, vq_loss, _, _ = model(images)
        loss = F.mse_loss(torch.sigmoid(logits), images) + vq_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert ssim_per_image(images, model.reconstruct(images)).mean() > 0.9


@pytest.mark.parametrize("kind", ["gated", "plain"])
def test_a_new_conditioned_prior_starts_unconditioned_and_learns_the_condition(kind):
    """The slice embedding starts at zero (a random start saturated the gates and slowed
    learning); its gradient must still reach it, or conditioning would never be learnt."""
    torch.manual_seed(0)
    model = build_prior(PixelCNNConfig(num_codes=10, kind=kind, hidden=8, n_layers=2, n_conditions=4, dropout=0.0))
    indices = torch.randint(0, 10, (2, 6, 6))
    assert torch.equal(model(indices, torch.tensor([0, 0])), model(indices, torch.tensor([3, 3])))
    F.cross_entropy(model(indices, torch.tensor([1, 2])), indices).backward()
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.num_embeddings == 4]
    assert embeddings
    for embedding in embeddings:
        touched = embedding.weight.grad.abs().sum(1)
        assert (touched[[1, 2]] > 0).all() and (touched[[0, 3]] == 0).all()


def test_a_bfloat16_prior_step_runs_the_network_in_bfloat16_and_keeps_float32_weights():
    torch.manual_seed(0)
    model = build_prior(PixelCNNConfig(num_codes=10, hidden=8, n_layers=2, n_conditions=4))
    seen = []
    model.head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    codes = torch.randint(0, 10, (4, 6, 6))
    before = [p.detach().clone() for p in model.parameters()]
    loss = pixelcnn.train_step(model, model, optimizer, scheduler, codes, torch.tensor([0, 1, 2, 3]), "bfloat16")
    assert seen == [torch.bfloat16]
    assert torch.isfinite(loss).all() and loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_nucleus_keeps_the_fewest_likeliest_codes_that_reach_top_p_and_renormalises():
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.97, 0.01, 0.01, 0.01]])
    kept = nucleus(probs, 0.75)
    assert torch.allclose(kept, torch.tensor([[0.0, 0.625, 0.375, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(nucleus(probs, 1.0), probs)


def test_sampling_with_a_tiny_top_p_draws_the_most_likely_code_everywhere():
    torch.manual_seed(0)
    model = build_prior(PixelCNNConfig(num_codes=10, hidden=8, n_layers=2, n_conditions=0, grid_size=4)).eval()
    greedy = sample_codes(model, 2, 4, 4, top_p=1e-6, generator=torch.Generator().manual_seed(1))
    again = sample_codes(model, 2, 4, 4, top_p=1e-6, generator=torch.Generator().manual_seed(2))
    assert torch.equal(greedy, again)  # no randomness left: the likeliest code at every position


def test_slice_conditions_are_the_positions_or_none_and_refuse_a_position_beyond_the_prior():
    positions = torch.tensor([0, 5, 31])
    assert torch.equal(slice_conditions(positions, 32), positions)
    assert slice_conditions(positions, 0) is None  # an unconditioned prior
    assert slice_conditions(positions.numpy(), 32).dtype == torch.long
    with pytest.raises(DataError, match=r"slice index 31 is beyond the prior's 8 positions \(--n-conditions\)"):
        slice_conditions(positions, 8)
