"""Two-level codes (VQ-VAE-2): the VQ-VAE's coarse and fine grids, the detail prior over the fine
codes given the coarse ones, and the run from train.py through pixelcnn.py to predict.py and
anomaly.py."""
import json
import shutil

import numpy as np
import pytest
import torch

import anomaly
import maps
import pixelcnn
import predict
import train
from c2st import random_subset
from checkpoint import TrainedModels, load_prior, load_trained_pair, load_vqvae
from codes import decode_all, encode_all_levels
from errors import CheckpointError, FlagError
from modules import PixelCNNConfig, Priors, VQVAE, VQVAEConfig, build_prior
from prior import RowBiases, bands_at, heal_codes, sample_codes, sample_fine, sample_levels


def detail_prior(num_codes=10, context_codes=7, grid_size=8, n_layers=2):
    torch.manual_seed(0)
    return build_prior(PixelCNNConfig(num_codes=num_codes, hidden=8, n_layers=n_layers, kernel=3, n_conditions=0,
                                      context_codes=context_codes, grid_size=grid_size)).eval()


def test_a_two_level_vqvae_at_256_has_a_32_and_a_64_grid_and_decodes_both():
    model = VQVAE(VQVAEConfig(hidden=16, res_hidden=8, num_codes=16, code_dim=8, n_downsample=2, levels=2)).eval()
    x = torch.rand(2, 1, 256, 256)
    coarse, fine = model.encode_levels(x)
    assert coarse.shape == (2, 32, 32) and fine.shape == (2, 64, 64)
    assert torch.equal(model.encode_to_indices(x), coarse)  # what the prior models
    # decoding the codes it chose gives exactly its reconstruction
    torch.testing.assert_close(model.decode_indices([coarse, fine]), model.reconstruct(x))
    assert decode_all(model, [coarse, fine], batch_size=1).shape == x.shape
    with pytest.raises(ValueError, match="2 code level"):
        model.decode_indices(fine)


def test_the_fine_codes_depend_on_the_coarse_ones():
    """The decoder reads both levels: other coarse codes under the same fine ones change the picture."""
    model = VQVAE(VQVAEConfig(hidden=16, res_hidden=8, num_codes=16, code_dim=8, n_downsample=2, levels=2)).eval()
    x = torch.rand(1, 1, 32, 32)
    coarse, fine = model.encode_levels(x)
    other = (coarse + 1) % 16
    assert not torch.allclose(model.decode_indices([coarse, fine]), model.decode_indices([other, fine]))


def test_coarse_only_decodes_that_share_of_training_images_from_their_coarse_codes_alone():
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(hidden=16, res_hidden=8, num_codes=16, code_dim=8, levels=2, coarse_only=1.0,
                              ema=False, dead_code_steps=0)).train()
    x = torch.rand(2, 1, 32, 32)
    model(x)  # seeds the codebooks; without EMA or re-seeding nothing else changes them
    (coarse, fine), *_ = model._quantize_levels(x)
    torch.testing.assert_close(model(x)[0], model.decoder(torch.cat([coarse, torch.zeros_like(fine)], dim=1)))
    model.eval()  # evaluation always decodes both levels
    torch.testing.assert_close(model(x)[0], model.decoder(torch.cat([coarse, fine], dim=1)))


def test_the_detail_prior_is_causal_in_the_fine_codes_and_sees_all_the_coarse_ones():
    model = detail_prior()
    fine, coarse = torch.randint(0, 10, (1, 8, 8)), torch.randint(0, 7, (1, 4, 4))
    logits = model(fine, coarse)
    later = fine.clone()
    later[0, 5, 3] = (later[0, 5, 3] + 1) % 10
    changed = (model(later, coarse) - logits).abs().amax(dim=1)[0] > 1e-6
    assert not changed.flatten()[:5 * 8 + 4].any()  # nothing at or before the changed code
    other_coarse = coarse.clone()
    other_coarse[0, 3, 3] = (other_coarse[0, 3, 3] + 1) % 7  # below and right of the first fine code
    assert (model(fine, other_coarse) - logits)[0, :, 0, 0].abs().max() > 1e-6


def test_sampling_the_detail_prior_row_by_row_uses_the_full_models_logits():
    """Greedy sampling (temperature -> 0) with the coarse codes' biases cropped per position must
    reproduce the full model's argmax."""
    model = detail_prior()
    coarse = torch.randint(0, 7, (2, 4, 4))
    fine = sample_codes(model, 2, 8, 8, coarse, temperature=1e-4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fine, model(fine, coarse).argmax(1))


def test_healing_every_fine_code_is_sampling_and_healing_none_keeps_them():
    model = detail_prior()
    coarse, fine = torch.randint(0, 7, (3, 4, 4)), torch.randint(0, 10, (3, 8, 8))
    assert torch.equal(heal_codes(model, fine, torch.zeros(3, 8, 8, dtype=torch.bool), coarse), fine)
    healed = heal_codes(model, torch.zeros_like(fine), torch.ones(3, 8, 8, dtype=torch.bool), coarse,
                        generator=torch.Generator().manual_seed(3))
    sampled = sample_codes(model, 3, 8, 8, coarse, generator=torch.Generator().manual_seed(3))
    assert torch.equal(healed, sampled)


def test_healing_two_levels_redraws_only_the_fine_codes_under_a_healed_coarse_code():
    coarse_prior = build_prior(PixelCNNConfig(num_codes=7, hidden=8, n_layers=2, kernel=3, n_conditions=0,
                                              grid_size=4)).eval()
    coarse, fine = torch.randint(0, 7, (2, 4, 4)), torch.randint(0, 10, (2, 8, 8))
    encoded = maps.Encoded(coarse, torch.zeros(2, 4, 4), None, fine)
    flagged = torch.zeros(2, 4, 4, dtype=torch.bool)
    flagged[0, 1, 2] = True
    changed = torch.zeros(2, 8, 8, dtype=torch.bool)
    for seed in range(8):
        new_coarse, new_fine = maps.heal_levels(Priors(coarse_prior, detail_prior()), encoded, torch.arange(2),
                                                flagged, None, torch.Generator().manual_seed(seed), None)
        assert torch.equal(new_coarse[~flagged], coarse[~flagged])
        changed |= new_fine != fine
    under = torch.zeros(2, 8, 8, dtype=torch.bool)
    under[0, 2:4, 4:6] = True
    assert changed[under].any() and not changed[~under].any()


def test_sample_levels_hands_the_coarse_grid_to_the_detail_prior():
    coarse_prior = build_prior(PixelCNNConfig(num_codes=7, hidden=8, n_layers=2, kernel=3, n_conditions=0,
                                              grid_size=4)).eval()
    levels = sample_levels(coarse_prior, detail_prior(), 2, (4, 4), generator=torch.Generator().manual_seed(1))
    assert [tuple(c.shape) for c in levels] == [(2, 4, 4), (2, 8, 8)]
    assert len(sample_levels(coarse_prior, None, 2, (4, 4))) == 1


def greedy_fine_codes(detail, coarse, fine):
    """Whether every fine code is the detail prior's most likely one given the codes before it."""
    return torch.equal(detail(fine, coarse).argmax(dim=1), fine)


def test_each_level_samples_with_its_own_temperature_and_top_p():
    coarse_prior = build_prior(PixelCNNConfig(num_codes=7, hidden=8, n_layers=2, kernel=3, n_conditions=0,
                                              grid_size=4)).eval()
    detail = detail_prior()
    greedy = {"temperature": 1.0, "top_p": 1e-6}
    levels = sample_levels(coarse_prior, detail, 16, (4, 4), generator=torch.Generator().manual_seed(1),
                           detail_sampling=greedy)
    assert greedy_fine_codes(detail, *levels)  # the detail prior drew its likeliest codes...
    assert not torch.equal(coarse_prior(levels[0]).argmax(dim=1), levels[0])  # ...the prior drew at random
    levels = sample_levels(coarse_prior, detail, 16, (4, 4), generator=torch.Generator().manual_seed(1), **greedy)
    assert greedy_fine_codes(detail, *levels) and torch.equal(coarse_prior(levels[0]).argmax(dim=1), levels[0])
    levels = sample_levels(coarse_prior, detail, 16, (4, 4), generator=torch.Generator().manual_seed(1),
                           detail_sampling={"temperature": 1.0, "top_p": 1.0}, **greedy)
    assert not greedy_fine_codes(detail, *levels)


def test_fine_codes_are_drawn_under_the_coarse_codes_they_are_given():
    detail = detail_prior()
    coarse = torch.randint(0, 7, (3, 4, 4), generator=torch.Generator().manual_seed(0))
    fine = sample_fine(detail, coarse, generator=torch.Generator().manual_seed(2), top_p=1e-6)
    assert fine.shape == (3, 8, 8) and greedy_fine_codes(detail, coarse, fine)
    other = sample_fine(detail, (coarse + 1) % 7, generator=torch.Generator().manual_seed(2), top_p=1e-6)
    assert not torch.equal(fine, other)


def test_realism_hands_the_held_out_slices_own_coarse_codes_to_the_detail_prior(two_levels, tiny_demo,
                                                                               monkeypatch):
    vqvae, _ = load_vqvae(two_levels / "checkpoints" / "vqvae_best.pt", "cpu")
    detail, _ = load_prior(two_levels / "checkpoints" / "pixelcnn_detail_best.pt", "cpu")
    images_u8 = torch.randint(0, 256, (6, 1, 32, 32), dtype=torch.uint8)
    case_ids = torch.arange(6).numpy() // 2
    handed = []
    sample = predict.sample_fine
    monkeypatch.setattr(predict, "sample_fine", lambda d, coarse, **kw: handed.append(coarse) or sample(d, coarse, **kw))
    reconstructions, ids, detail_only = predict.held_out_levels(vqvae, detail, images_u8, case_ids, 4,
                                                                {"temperature": 1.0, "top_p": 1.0}, 0, "cpu")
    pick = torch.from_numpy(random_subset(6, 4, np.random.default_rng(0)))
    coarse, fine = encode_all_levels(vqvae, images_u8[pick])
    assert torch.equal(handed[0], coarse) and list(ids) == list(case_ids[pick.numpy()])
    torch.testing.assert_close(reconstructions, decode_all(vqvae, [coarse, fine]))
    assert detail_only.shape == reconstructions.shape
    assert predict.held_out_levels(vqvae, None, images_u8, case_ids, 4, {}, 0, "cpu")[2] is None


def test_coarse_only_without_a_coarse_level_is_refused_in_one_line(tiny_demo, tiny_flags, tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data", str(tiny_demo), "--coarse-only", "0.25", *tiny_flags.vqvae])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --coarse-only 0.25 needs --levels 2") and "\n" not in error
    assert not (tmp_path / "checkpoints").exists()


def test_a_detail_prior_must_be_gated():
    with pytest.raises(ValueError, match="gated"):
        build_prior(PixelCNNConfig(kind="plain", context_codes=4))


@pytest.fixture(scope="module")
def two_levels(tmp_path_factory, tiny_demo, tiny_flags):
    """A tiny two-level VQ-VAE and its two priors, trained as a user trains them."""
    work = tmp_path_factory.mktemp("two_levels")
    encoded = []
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        train.main(["--data", str(tiny_demo), "--epochs", "3", "--levels", "2", *tiny_flags.vqvae_batch_2])
        encode_split = pixelcnn.encode_split
        patch.setattr(pixelcnn, "encode_split", lambda *a, **k: encoded.append(a[2]) or encode_split(*a, **k))
        pixelcnn.main(["--data", str(tiny_demo), "--epochs", "2", *DETAIL_FLAGS, *tiny_flags.prior_batch_2])
    (work / "encoded.json").write_text(json.dumps(encoded))
    return work


DETAIL_FLAGS = ("--detail-layers", "2", "--detail-hidden", "8", "--detail-kernel", "3")


def test_the_two_priors_share_one_pass_of_the_encoder(two_levels, tiny_demo, tiny_flags, tmp_path, monkeypatch):
    assert json.loads((two_levels / "encoded.json").read_text()) == ["train", "validate"]
    # the detail prior trained alone from the same VQ-VAE reads the same codes: the same weights
    monkeypatch.chdir(tmp_path)
    pixelcnn.main(["--data", str(tiny_demo), "--vqvae", str(two_levels / "checkpoints" / "vqvae_best.pt"),
                   "--level", "detail", "--epochs", "2", *DETAIL_FLAGS, *tiny_flags.prior_batch_2])
    alone = torch.load(tmp_path / "checkpoints" / "pixelcnn_detail_best.pt", weights_only=True)["model"]
    after_coarse = torch.load(two_levels / "checkpoints" / "pixelcnn_detail_best.pt", weights_only=True)["model"]
    assert alone.keys() == after_coarse.keys()
    assert all(torch.equal(alone[k], after_coarse[k]) for k in alone)


def test_pixelcnn_trains_a_prior_of_each_level(two_levels):
    coarse, coarse_ckpt = load_prior(two_levels / "checkpoints" / "pixelcnn_best.pt", "cpu")
    detail, detail_ckpt = load_prior(two_levels / "checkpoints" / "pixelcnn_detail_best.pt", "cpu")
    assert coarse.cfg.context_codes == 0 and coarse.cfg.grid_size == 4   # 32 px / 4 / 2
    assert detail.cfg.context_codes == 16 and detail.cfg.grid_size == 8 and detail.cfg.n_layers == 2
    assert tuple(coarse_ckpt["grid"]) == (4, 4) and tuple(detail_ckpt["grid"]) == (8, 8)
    assert coarse_ckpt["vqvae_fingerprint"] == detail_ckpt["vqvae_fingerprint"]
    assert len(detail_ckpt["run"]["history"]) == 2


def test_predict_samples_and_scores_a_two_level_model(two_levels, tiny_demo, monkeypatch):
    monkeypatch.chdir(two_levels)
    metrics = predict.predict(predict.parse_configs("", [predict.PredictConfig],
                                                    ["--data", str(tiny_demo), "--n-samples", "3",
                                                     "--sweep-frames", "2", "--out-dir", "out_levels"])[0])
    assert (two_levels / "out_levels" / "samples" / "sample_002.png").is_file()
    assert 0 < metrics["test_ssim_native_mean"] <= 1
    assert json.loads((two_levels / "out_levels" / "metrics.json").read_text())["n_samples"] == 3


def test_anomaly_maps_heal_both_levels(two_levels, tiny_demo, monkeypatch):
    monkeypatch.chdir(two_levels)
    report = anomaly.main(["--data", str(tiny_demo), "--n-heal", "1", "--thresholds", "lesions", "--threshold",
                           "0.5", "--out-dir", "out_anomaly"])
    assert report["healed_share"] > 0  # coarse codes healed, and the fine codes under them redrawn
    assert (two_levels / "out_anomaly" / "anomaly_metrics.json").is_file()


def test_a_detail_prior_of_another_vqvae_is_refused(two_levels, tmp_path):
    shutil.copytree(two_levels / "checkpoints", tmp_path / "checkpoints")
    vqvae_path = tmp_path / "checkpoints" / "vqvae_best.pt"
    ckpt = torch.load(vqvae_path, weights_only=True)
    ckpt["model"]["coarse.quantizer.codebook"] += 1.0  # another coarse codebook: other pictures
    torch.save(ckpt, vqvae_path)
    models = TrainedModels(vqvae=str(vqvae_path), prior=str(tmp_path / "checkpoints" / "pixelcnn_best.pt"))
    with pytest.raises(CheckpointError, match="fit to another VQ-VAE"):
        load_trained_pair(models, "cpu")


def test_a_checkpoint_naming_the_coarse_level_top_loads_and_keeps_its_priors(two_levels, tmp_path):
    """Checkpoints once stored the coarse level under "top."; they load as they are, decode alike,
    and the priors fit to them stay paired."""
    shutil.copytree(two_levels / "checkpoints", tmp_path / "checkpoints")
    vqvae_path = tmp_path / "checkpoints" / "vqvae_best.pt"
    ckpt = torch.load(vqvae_path, weights_only=True)
    assert any(name.startswith("coarse.") for name in ckpt["model"])
    ckpt["model"] = {name.replace("coarse.", "top.", 1) if name.startswith("coarse.") else name: tensor
                     for name, tensor in ckpt["model"].items()}
    torch.save(ckpt, vqvae_path)
    old_named = load_trained_pair(TrainedModels(vqvae=str(vqvae_path),
                                                prior=str(tmp_path / "checkpoints" / "pixelcnn_best.pt")), "cpu")
    present, _ = load_vqvae(two_levels / "checkpoints" / "vqvae_best.pt", "cpu")
    codes = [torch.zeros(1, 4, 4, dtype=torch.long), torch.ones(1, 8, 8, dtype=torch.long)]
    assert torch.equal(old_named.vqvae.decode_indices(codes), present.decode_indices(codes))
    assert old_named.detail is not None


def test_a_missing_detail_prior_is_named(two_levels, tmp_path):
    shutil.copytree(two_levels / "checkpoints", tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "pixelcnn_detail_best.pt").unlink()
    models = TrainedModels(vqvae=str(tmp_path / "checkpoints" / "vqvae_best.pt"),
                           prior=str(tmp_path / "checkpoints" / "pixelcnn_best.pt"))
    with pytest.raises(CheckpointError, match="pixelcnn_detail_best.pt not found"):
        load_trained_pair(models, "cpu")


def test_the_detail_level_of_a_one_level_vqvae_is_refused(tiny_models, prior_configs, tmp_path):
    cfg, model_cfg = prior_configs(tmp_path, tiny_models.data, tiny_models.vqvae, "--level", "detail")
    with pytest.raises(FlagError, match="--level detail"):
        pixelcnn.train_prior(cfg, model_cfg, progress=False)


def test_the_codes_of_a_split_come_level_by_level(two_levels):
    vqvae, _ = load_vqvae(two_levels / "checkpoints" / "vqvae_best.pt", "cpu")
    images = (torch.rand(3, 1, 32, 32) * 255).to(torch.uint8)
    coarse, fine = encode_all_levels(vqvae, images, batch_size=2)
    assert coarse.shape == (3, 4, 4) and fine.shape == (3, 8, 8)
    one_by_one = [vqvae.encode_levels(images[i:i + 1].float() / 255) for i in range(3)]
    assert torch.equal(fine, torch.cat([levels[1] for levels in one_by_one]))


def test_a_detail_priors_biases_are_made_a_row_at_a_time_and_match_the_whole_grids():
    model, coarse = detail_prior(), torch.randint(0, 7, (3, 4, 4))
    whole = model.layer_biases(coarse)
    rows = RowBiases(model, coarse)
    assert rows.whole is None and rows.context.shape == (3, model.cfg.hidden, 8, 8)  # not 4 x hidden per layer
    for row in (0, 5, 7):
        for at_row, full in zip(rows.at(row), whole):
            torch.testing.assert_close(at_row, full[:, :, row:row + 1])


def test_a_detail_priors_bands_at_a_column_per_slice_match_the_whole_grids():
    model, coarse, fine = detail_prior(), torch.randint(0, 7, (4, 4, 4)), torch.randint(0, 10, (4, 8, 8))
    whole = model(fine, coarse)
    features = model.vertical_features(fine, model.layer_biases(coarse))
    row, who, cols = 5, torch.tensor([1, 2, 3]), torch.tensor([7, 1, 4])
    logits = bands_at(model, fine, [f[:, :, row:row + 1] for f in features], RowBiases(model, coarse), row, cols, who)
    torch.testing.assert_close(logits, whole[who, :, row, cols])
