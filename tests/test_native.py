"""Figures at the data's own size: what a user sees of a model that works smaller."""
import json

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

import predict
import train
from metrics import sharpness, ssim_per_image
from slices import resize_unit


@pytest.fixture(scope="module")
def slices_256():
    """Four head-like 256 x 256 slices in [0, 1]: a bright rim, textured tissue, a dark ventricle."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[:256, :256] - 127.5
    radius = np.hypot(rows / 1.2, cols)
    images = []
    for _ in range(4):
        tissue = 0.35 + 0.15 * gaussian_filter(rng.standard_normal((256, 256)), 2.0) * 4
        image = np.where(radius < 100, tissue, 0.0)
        image = np.where((radius > 92) & (radius < 100), 0.9, image)
        image = np.where(np.hypot(rows, cols / 2) < 12, 0.05, image)
        images.append(np.clip(image, 0, 1))
    return np.stack(images)


def test_sharpness_of_an_image_against_itself_is_one(slices_256):
    assert sharpness(slices_256, slices_256, slices_256 > 0.1) == pytest.approx(1.0)


def test_sharpness_falls_with_blur_and_rises_with_noise(slices_256):
    inside = slices_256 > 0.1
    blurred = np.stack([gaussian_filter(image, 1.5) for image in slices_256])
    noisy = np.clip(slices_256 + np.random.default_rng(1).normal(0, 0.05, slices_256.shape), 0, 1)
    assert sharpness(blurred, slices_256, inside) < 0.8
    assert sharpness(noisy, slices_256, inside) > 1.2  # why it is read beside SSIM, never alone


def test_a_round_trip_through_128_px_loses_ssim_at_256(slices_256):
    shown = resize_unit(resize_unit(slices_256, 128), 256)
    assert shown.shape == slices_256.shape and shown.dtype == np.float32
    assert 0.0 <= shown.min() and shown.max() <= 1.0
    assert ssim_per_image(slices_256, slices_256).min() == pytest.approx(1.0)
    assert ssim_per_image(slices_256, shown).mean() < 0.99


def test_metrics_json_leads_with_the_figures_at_the_datas_own_size(tiny_models, tmp_path):
    out = tmp_path / "out"
    predict.main(["--data", str(tiny_models.data), "--vqvae", str(tiny_models.vqvae), "--reconstruction-only",
                  "--out-dir", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["image_size"] == 32 and metrics["native_size"] == 256
    assert metrics["native_upsampling"] == "lanczos"
    assert 0 < metrics["test_ssim_native_mean"] < 1 and metrics["test_psnr_native_mean"] > 0
    assert 0 < metrics["test_sharpness_native"] < 1  # a 32 px model's edges, shown at 256 px, are weaker
    assert list(metrics)[:3] == ["native_size", "native_upsampling", "test_ssim_native_mean"]


def test_the_validate_split_is_scored_under_its_own_name(tiny_models, tmp_path):
    out = tmp_path / "out"
    predict.main(["--data", str(tiny_models.data), "--vqvae", str(tiny_models.vqvae), "--reconstruction-only",
                  "--split", "validate", "--out-dir", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "validate" and "validate_ssim_native_mean" in metrics
    assert not any(key.startswith("test_") for key in metrics)


def test_the_edge_loss_is_zero_for_a_perfect_reconstruction_and_grows_with_blur(slices_256):
    x = torch.from_numpy(slices_256[:, None].astype(np.float32))
    blurred = torch.from_numpy(np.stack([gaussian_filter(image, 2.0) for image in slices_256])[:, None]
                               .astype(np.float32))
    assert float(train.edge_loss(x, x)) == 0.0
    assert float(train.edge_loss(blurred, x)) > 0.0
    logits = torch.logit(x.clamp(1e-4, 1 - 1e-4))
    plain = train.reconstruction_loss(logits, x, "bce")
    assert float(train.reconstruction_loss(logits, x, "bce", edge_weight=2.0)) > float(plain)
