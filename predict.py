"""Evaluate the VQ-VAE on the test split and sample new slices from the prior.

    python predict.py                          # demo set
    python predict.py --data /path/to/oasis --save-reconstructions

Writes to out/: reconstructions.png, metrics.json, samples.png and samples/*.png,
progression.gif (from train.py's per-epoch grids), curves.png, and with
--save-reconstructions every test reconstruction under reconstructions/.
"""
import json
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dataset import DataError, load_split_tensor, resolve_data_root
from modules import sample_codes
from pixelcnn import load_prior, load_vqvae
from train import progress_indices, reconstruct_all
from utils import (image_grid, opt, parse_configs, pick_device, psnr_per_image, run_script,
                   save_gray_png, set_seed, ssim_per_image, to_uint8)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


@dataclass
class PredictConfig:
    data: str = opt("demo", "OASIS root whose test split is evaluated, or 'demo'")
    vqvae: str = opt("checkpoints/vqvae_best.pt", "VQ-VAE checkpoint from train.py")
    prior: str = opt("checkpoints/pixelcnn_best.pt", "PixelCNN checkpoint from pixelcnn.py")
    out_dir: str = opt("out", "where every output goes")
    progress_dir: str = opt("out/progress", "train.py's per-epoch grids, for the GIF")
    n_samples: int = opt(16, "slices to generate")
    slice: int = opt(-1, "slice position to generate (0..31); -1 draws it from the training data")
    temperature: float = opt(1.0, "softmax temperature of the prior when sampling")
    save_reconstructions: bool = opt(False, "also write every test reconstruction as an 8-bit PNG")
    seed: int = opt(0, "random seed for sampling")
    device: str = opt("auto", "cuda, cpu, or auto (cuda when available)")


def test_metrics(images_u8, recon):
    x = images_u8.float().div(255).cpu()
    ssim, psnr = ssim_per_image(x, recon), psnr_per_image(x, recon)
    return {"test_ssim_mean": float(ssim.mean()), "test_ssim_min": float(ssim.min()),
            "test_ssim_std": float(ssim.std()), "test_psnr_mean": float(psnr.mean())}


def save_reconstruction_grid(images_u8, recon, path, count=8):
    ids = progress_indices(len(images_u8), count)
    rows = torch.cat([images_u8[ids].float().div(255).cpu(), recon[ids]]).squeeze(1).numpy()
    save_gray_png(path, image_grid(rows, ncol=len(ids)))


def sample_conditions(prior_ckpt, n, slice_position, generator):
    """Slice positions to condition on: a fixed one, or drawn as often as they occur in training."""
    n_conditions = prior_ckpt["model_config"]["n_conditions"]
    if not n_conditions:
        return None
    if slice_position >= 0:
        if slice_position >= n_conditions:
            raise DataError(f"--slice {slice_position} is beyond the prior's {n_conditions} positions")
        return torch.full((n,), slice_position, dtype=torch.long)
    weights = prior_ckpt["slice_counts"].double()
    return torch.multinomial(weights, n, replacement=True, generator=generator)


def generate(vqvae, prior, prior_ckpt, n, slice_position, temperature, seed, device):
    """-> (images (n, 1, H, W) in [0, 1] on the CPU, seconds spent sampling codes)."""
    generator = torch.Generator().manual_seed(seed)
    cond = sample_conditions(prior_ckpt, n, slice_position, generator)
    cond = cond.to(device) if cond is not None else None
    height, width = prior_ckpt["grid"]
    device_generator = torch.Generator(device=device).manual_seed(seed)
    started = time.time()
    with tqdm(total=height, desc="sampling rows", leave=False) as bar:
        codes = sample_codes(prior, n, height, width, cond, temperature, device_generator, bar)
    seconds = time.time() - started
    images = torch.cat([vqvae.decode_indices(codes[i:i + 64]).cpu() for i in range(0, n, 64)])
    return images, seconds


def save_samples(images, out_dir):
    save_gray_png(out_dir / "samples.png", image_grid(images.squeeze(1).numpy(), ncol=min(8, len(images))))
    for i, image in enumerate(images.squeeze(1).numpy()):
        save_gray_png(out_dir / "samples" / f"sample_{i:03d}.png", to_uint8(image))


def save_progression_gif(progress_dir, path):
    frames = sorted(Path(progress_dir).glob("epoch_*.png"))
    if not frames:
        print(f"no per-epoch grids in {progress_dir}; skipping {path.name}")
        return
    images = [Image.open(f).convert("L") for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=400, loop=0)


def save_curves(vq_history, prior_ckpt, path):
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    epochs = [r["epoch"] for r in vq_history]
    axes[0].plot(epochs, [r["train_recon"] for r in vq_history], label="reconstruction")
    axes[0].plot(epochs, [r["train_vq"] for r in vq_history], label="vq (commitment)")
    axes[0].set(title="VQ-VAE training loss", xlabel="epoch", yscale="log")
    axes[1].plot(epochs, [r["val_ssim"] for r in vq_history])
    axes[1].set(title="VQ-VAE validation SSIM", xlabel="epoch")
    axes[2].plot(epochs, [r["val_perplexity"] for r in vq_history], label="perplexity")
    axes[2].plot(epochs, [r["val_codes_used"] for r in vq_history], label="codes used")
    axes[2].set(title="codebook use (validation)", xlabel="epoch")
    history, baselines = prior_ckpt["run"]["history"], prior_ckpt["baselines"]
    prior_epochs = [r["epoch"] for r in history]
    axes[3].plot(prior_epochs, [r["train_nll_bits"] for r in history], label="train")
    axes[3].plot(prior_epochs, [r["val_nll_bits"] for r in history], label="validate")
    axes[3].axhline(baselines["frequency_entropy_bits"], ls="--", c="gray", label="code-frequency entropy")
    axes[3].set(title="PixelCNN NLL (bits/code)", xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def predict(cfg: PredictConfig):
    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    out_dir = Path(cfg.out_dir)
    vqvae, vq_ckpt = load_vqvae(cfg.vqvae, device)
    prior, prior_ckpt = load_prior(cfg.prior, device)
    image_size = vq_ckpt["train_config"]["image_size"]
    root = resolve_data_root(cfg.data)
    test_u8, test_set = load_split_tensor(root, "test", image_size, device)

    recon = reconstruct_all(vqvae, test_u8)
    metrics = {**test_metrics(test_u8, recon), "split": "test", "image_size": image_size,
               "n_images": len(test_u8), "data_root": str(root), "vqvae": cfg.vqvae, "prior": cfg.prior}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_reconstruction_grid(test_u8, recon, out_dir / "reconstructions.png")
    if cfg.save_reconstructions:
        for name, image in zip(test_set.files, recon.squeeze(1).numpy()):
            save_gray_png(out_dir / "reconstructions" / name, to_uint8(image))

    samples, seconds = generate(vqvae, prior, prior_ckpt, cfg.n_samples, cfg.slice,
                                cfg.temperature, cfg.seed, device)
    save_samples(samples, out_dir)
    metrics.update({"prior_val_nll_bits": prior_ckpt["run"]["best"], **prior_ckpt["baselines"],
                    "n_samples": cfg.n_samples, "sampling_seconds": seconds})
    save_progression_gif(cfg.progress_dir, out_dir / "progression.gif")
    save_curves(vq_ckpt["run"]["history"], prior_ckpt, out_dir / "curves.png")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    print(f"sampled {cfg.n_samples} slices in {seconds:.1f}s -> {out_dir / 'samples.png'}")
    print(f"test SSIM {metrics['test_ssim_mean']:.4f} (min {metrics['test_ssim_min']:.4f}, "
          f"std {metrics['test_ssim_std']:.4f}) | PSNR {metrics['test_psnr_mean']:.2f} dB | "
          f"{len(test_u8)} test slices at {image_size}x{image_size} from {root}")
    return metrics


def main(argv=None):
    (cfg,) = parse_configs(__doc__, [PredictConfig], argv)
    run_script(lambda: predict(cfg))


if __name__ == "__main__":
    main()
