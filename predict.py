"""Evaluate the VQ-VAE on the test split and sample new slices from the prior.

    python predict.py                          # demo set
    python predict.py --data /path/to/oasis --save-reconstructions

A two-level VQ-VAE's samples take their coarse codes from the prior and their fine codes from
the detail prior (pixelcnn_detail_best.pt beside --prior, or --detail-prior); --temperature and
--top-p set how the prior draws, --detail-temperature and --detail-top-p the detail prior.

Writes to out/: reconstructions.png, metrics.json, samples.png and samples/*.png,
samples_vs_real.png (8 samples above 8 real slices of the split, at full size), slice_sweep.gif
(generated slices from the lowest to the highest conditioned position), code_maps.png (test
inputs, their code indices, the decodings), codebook_usage.png, progression.gif (from train.py's
per-epoch grids), curves.png, and with
--save-reconstructions every test reconstruction under reconstructions/.

    python predict.py --realism                # also judge whether samples pass for real

--realism (minutes on a CPU) adds a "realism" entry to metrics.json: classifier
two-sample tests, split by subject and reported beside two controls that show the
classifier works (real vs real ~0.5, real vs blurred ~1.0): samples against real held-out
slices (the headline; also seen at 64 px, where fine texture no longer shows), the
decoder's reconstructions against them (the most any prior can reach), and samples against
reconstructed train slices (the prior alone); by level, at the model's size and half of it,
each with both controls: samples against reconstructions of held-out slices (the priors
alone), and with two levels the held-out slices' own coarse codes under fine codes the detail
prior draws, against their reconstructions (what the detail prior adds) and samples against
those (what the coarse prior adds); nearest-neighbour SSIM to the training slices, so copying
shows; and distances between intensity histograms and brain-area distributions.
"""
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from c2st import random_subset
from checkpoint import TrainedModels, image_size_of, load_trained_pair, load_vqvae
from cli import opt, parse_configs, run_script
from codes import decode_all, encode_all_levels, reconstruct_all, to_unit
from dataset import load_split_tensor, resolve_data_root
from demo import demo_noise_free_split
from errors import FlagError
from files import image_grid, progress_indices, save_figure, save_gif, save_gray_png, to_uint8, write_json
from hardware import pick_device, set_seed
from metrics import codebook_usage, psnr_per_image, sharpness, ssim_per_image, to_numpy_images
from prior import sample_fine, sample_levels
from realism import print_realism, realism_report
from slices import FOREGROUND_THRESHOLD, NATIVE_SIZE, resize_unit

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


@dataclass
class PredictConfig(TrainedModels):
    data: str = opt("demo", "OASIS root whose test split is evaluated, or 'demo'")
    out_dir: str = opt("out", "where every output goes")
    progress_dir: str = opt("out/progress", "train.py's per-epoch grids, for the GIF")
    split: str = opt("test", "the split whose reconstructions are scored (metrics.json keys start with it); "
                             "validate is where settings are chosen, test where the chosen ones are reported",
                     choices=["test", "validate"])
    n_samples: int = opt(16, "slices to generate", minimum=1)
    slice: int = opt(-1, "slice position to generate (0..31); -1 draws it from the training data")
    temperature: float = opt(1.0, "softmax temperature of the prior (of the coarsest codes) when sampling")
    top_p: float = opt(1.0, "nucleus sampling of the prior: draw each code from the most likely codes that make up "
                            "this much of the probability; 1.0 = from all")
    detail_temperature: float = opt(0.5, "a two-level VQ-VAE: softmax temperature of the detail prior (the fine "
                                         "codes); below 1 its sulci follow the slice instead of breaking into speckle "
                                         "(RESULTS.md, by level)")
    detail_top_p: float = opt(1.0, "a two-level VQ-VAE: nucleus sampling of the detail prior, as --top-p")
    sweep_frames: int = opt(8, "frames of slice_sweep.gif, one generated slice per conditioned position; 0 = none")
    save_reconstructions: bool = opt(False, "also write every test reconstruction as an 8-bit PNG")
    reconstruction_only: bool = opt(False, "evaluate the VQ-VAE alone (no prior needed): reconstructions, "
                                           "metrics, code maps, codebook use, progression and curves")
    seed: int = opt(0, "random seed for sampling")
    device: str = opt("auto", "cuda, cpu, or auto (cuda when available)")
    realism: bool = opt(False, "also measure whether samples pass for real (two-sample classifier with "
                               "controls, nearest-neighbour SSIM, histogram and brain-area distances) "
                               "into metrics.json; minutes on a CPU")
    realism_samples: int = opt(256, "slices to generate for --realism")
    realism_size: int = opt(0, "side of the images the two-sample classifier sees; 0 = the model's image "
                               "size (a second test at 64 px is always reported beside it)", minimum=0)
    realism_folds: int = opt(5, "folds, grouped by subject, of the two-sample classifier's cross-validation")
    realism_epochs: int = opt(20, "training epochs of the two-sample classifier in each fold")
    realism_lr: float = opt(1e-3, "Adam learning rate of the two-sample classifier")
    realism_batch_size: int = opt(32, "batch size of the two-sample classifier")
    realism_nn_train: int = opt(0, "training slices that nearest-neighbour SSIM compares against: "
                                   "0 = all, else a seeded random subset of this many")


def model_size_metrics(images_u8, recon, split):
    x = to_unit(images_u8).cpu()
    ssim, psnr = ssim_per_image(x, recon), psnr_per_image(x, recon)
    return {f"{split}_ssim_mean": float(ssim.mean()), f"{split}_ssim_min": float(ssim.min()),
            f"{split}_ssim_std": float(ssim.std()), f"{split}_psnr_mean": float(psnr.mean())}


def native_metrics(root, split, images_u8, recon, image_size):
    """SSIM, PSNR and sharpness against the test slices at the data's own size (256x256), the
    reconstructions upsampled (Lanczos) where the model works smaller: what a user sees. Sharpness
    (metrics.sharpness) is over the pixels where the real slice is above the foreground level;
    the same at the model's size beside it."""
    shown = to_numpy_images(recon)
    model_real = to_numpy_images(to_unit(images_u8))
    at_model_size = sharpness(shown, model_real, model_real > FOREGROUND_THRESHOLD)
    if image_size != NATIVE_SIZE:
        native_u8, _ = load_split_tensor(root, split, NATIVE_SIZE, progress=False)
        shown = resize_unit(shown, NATIVE_SIZE)
    else:
        native_u8 = images_u8
    real = to_numpy_images(to_unit(native_u8))
    ssim, psnr = ssim_per_image(real, shown), psnr_per_image(real, shown)
    return {"native_size": NATIVE_SIZE, "native_upsampling": "lanczos" if image_size != NATIVE_SIZE else None,
            f"{split}_ssim_native_mean": float(ssim.mean()), f"{split}_ssim_native_min": float(ssim.min()),
            f"{split}_psnr_native_mean": float(psnr.mean()),
            f"{split}_sharpness_native": sharpness(shown, real, real > FOREGROUND_THRESHOLD),
            f"{split}_sharpness": at_model_size}


def noise_free_ssim(root, split, images_u8, image_size):
    """On the demo set, mean SSIM of the test slices' noise-free twins: the score of a
    reconstruction that removes exactly the noise (None elsewhere: real slices have no twins)."""
    twins = demo_noise_free_split(root, split, image_size)
    if twins is None or twins.shape != tuple(images_u8.shape[:1] + images_u8.shape[2:]):
        return None
    return float(ssim_per_image(to_unit(images_u8).cpu(), to_unit(torch.from_numpy(twins))).mean())


def save_reconstruction_grid(images_u8, recon, path, count=8):
    ids = progress_indices(len(images_u8), count)
    rows = torch.cat([to_unit(images_u8[ids]).cpu(), recon[ids]]).squeeze(1).numpy()
    save_gray_png(path, image_grid(rows, ncol=len(ids)))


def sample_conditions(prior_ckpt, n, slice_position, generator):
    """Slice positions to condition on: a fixed one, or drawn as often as they occur in training."""
    n_conditions = prior_ckpt["model_config"]["n_conditions"]
    if not n_conditions:
        return None
    if slice_position >= 0:
        if slice_position >= n_conditions:
            raise FlagError(f"--slice {slice_position} is beyond the prior's {n_conditions} positions")
        return torch.full((n,), slice_position, dtype=torch.long)
    weights = prior_ckpt["slice_counts"].double()
    return torch.multinomial(weights, n, replacement=True, generator=generator)


def level_settings(temperature, top_p, prefix=""):
    if temperature <= 0 or not 0 < top_p <= 1:
        raise FlagError(f"--{prefix}temperature must be above 0 and --{prefix}top-p in (0, 1]; got {temperature}, "
                        f"{top_p}")
    return {"temperature": temperature, "top_p": top_p}


def sampling_settings(cfg: PredictConfig):
    """The keyword arguments of prior.sample_levels that --temperature and --top-p set, and
    --detail-temperature and --detail-top-p for the detail prior."""
    return {**level_settings(cfg.temperature, cfg.top_p),
            "detail_sampling": level_settings(cfg.detail_temperature, cfg.detail_top_p, "detail-")}


def generate(vqvae, prior, prior_ckpt, detail, n, slice_position, sampling, seed, device):
    """-> (images (n, 1, H, W) in [0, 1] on the CPU, seconds spent sampling codes). detail: the
    detail prior of a two-level VQ-VAE, else None."""
    cond = sample_conditions(prior_ckpt, n, slice_position, torch.Generator().manual_seed(seed))
    return decode_samples(vqvae, prior, prior_ckpt, detail, n, cond, sampling, seed, device)


def decode_samples(vqvae, prior, prior_ckpt, detail, n, cond, sampling, seed, device):
    """Sample n code grids (of every level) for the given conditions (or None) and decode them."""
    cond = cond.to(device) if cond is not None else None
    grid = prior_ckpt["grid"]
    device_generator = torch.Generator(device=device).manual_seed(seed)
    started = time.time()
    rows = grid[0] * (3 if detail is not None else 1)  # the fine grid has twice the rows
    with tqdm(total=rows, desc="sampling rows", leave=False) as bar:
        codes = sample_levels(prior, detail, n, grid, cond, generator=device_generator, progress=bar, **sampling)
    seconds = time.time() - started
    return decode_all(vqvae, codes), seconds


def save_slice_sweep(vqvae, prior, prior_ckpt, detail, frames, sampling, seed, device, path):
    """A GIF of generated slices as the conditioned position runs from lowest to highest."""
    n_conditions = prior_ckpt["model_config"]["n_conditions"]
    if not n_conditions or frames < 1:
        return
    positions = torch.linspace(0, n_conditions - 1, min(frames, n_conditions)).round().long()
    images, _ = decode_samples(vqvae, prior, prior_ckpt, detail, len(positions), positions, sampling, seed, device)
    pictures = [Image.fromarray(to_uint8(image)) for image in images.squeeze(1).numpy()]
    save_gif(path, pictures, duration_ms=300)


def save_codebook_usage(vqvae, images_u8, path, batch_size=64):
    """Histogram of how often each code (of the finest level) is used on the test split; returns
    (perplexity, codes used)."""
    codes = encode_all_levels(vqvae, images_u8, batch_size)[-1]
    counts = torch.bincount(codes.flatten().cpu(), minlength=vqvae.cfg.num_codes)
    perplexity, used = codebook_usage(counts)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.bar(np.arange(len(counts)), np.sort(counts.numpy())[::-1], width=1.0)
    ax.set(yscale="log", xlabel="code (sorted by use)", ylabel="uses on the test split",
           title=f"codebook use: {used}/{len(counts)} codes, perplexity {perplexity:.1f}")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return perplexity, used


def save_code_maps(vqvae, images_u8, path, count=4):
    """For a few test slices: the input, its grid of code indices (the finest level's), and the
    decoding of its codes."""
    ids = progress_indices(len(images_u8), count)
    x = to_unit(images_u8[ids])
    levels = vqvae.encode_levels(x)
    codes, decoded = levels[-1], vqvae.decode_indices(levels).cpu()
    fig, axes = plt.subplots(len(ids), 3, figsize=(7.5, 2.5 * len(ids)), squeeze=False)
    for row, (image, code, decoding) in enumerate(zip(x.cpu().numpy(), codes.cpu().numpy(), decoded.numpy())):
        axes[row, 0].imshow(image[0], cmap="gray", vmin=0, vmax=1)
        axes[row, 1].imshow(code, cmap="nipy_spectral", vmin=0, vmax=vqvae.cfg.num_codes - 1,
                            interpolation="nearest")
        axes[row, 2].imshow(decoding[0], cmap="gray", vmin=0, vmax=1)
    for ax, title in zip(axes[0], ["input", f"code indices ({codes.shape[1]}x{codes.shape[2]})", "decoded"]):
        ax.set_title(title)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def save_samples(images, out_dir):
    for old_sample in (out_dir / "samples").glob("sample_*.png"):
        old_sample.unlink()  # a smaller --n-samples must not leave an older run's extras
    save_gray_png(out_dir / "samples.png", image_grid(images.squeeze(1).numpy(), ncol=min(8, len(images))))
    for i, image in enumerate(images.squeeze(1).numpy()):
        save_gray_png(out_dir / "samples" / f"sample_{i:03d}.png", to_uint8(image))


def save_beside_real(samples, real_u8, path, count=8):
    """Up to `count` samples above as many real slices of the evaluated split, spread over it, at
    full size: what a sample must pass for."""
    count = min(count, len(samples), len(real_u8))
    real = to_unit(real_u8[torch.as_tensor(progress_indices(len(real_u8), count))]).cpu()
    save_gray_png(path, image_grid(torch.cat([samples[:count], real]).squeeze(1).numpy(), ncol=count))


def save_progression_gif(progress_dir, path):
    frames = sorted(Path(progress_dir).glob("epoch_*.png"))
    if not frames:
        print(f"no per-epoch grids in {progress_dir}; skipping {path.name}")
        return
    images = [Image.open(f).convert("L") for f in frames]
    save_gif(path, images, duration_ms=400)


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
    if prior_ckpt is None:
        axes[3].set_visible(False)
        return finish_figure(fig, axes, path)
    history, baselines = prior_ckpt["run"]["history"], prior_ckpt["baselines"]
    prior_epochs = [r["epoch"] for r in history]
    axes[3].plot(prior_epochs, [r["train_nll_bits"] for r in history], label="train")
    axes[3].plot(prior_epochs, [r["val_nll_bits"] for r in history], label="validate")
    axes[3].axhline(baselines["frequency_entropy_bits"], ls="--", c="gray", label="code-frequency entropy")
    axes[3].set(title="PixelCNN NLL (bits/code)", xlabel="epoch")
    finish_figure(fig, axes, path)


def finish_figure(fig, axes, path):
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def held_out_levels(vqvae, detail, images_u8, case_ids, n, detail_sampling, seed, device):
    """What realism_report's `levels` needs, from n held-out slices picked at random: their
    reconstructions, their subjects, and (with a detail prior) their own coarse codes decoded with
    fine codes the detail prior draws under them."""
    pick = torch.from_numpy(random_subset(len(images_u8), n, np.random.default_rng(seed)))
    codes = encode_all_levels(vqvae, images_u8[pick.to(images_u8.device)])
    reconstructions = decode_all(vqvae, codes)
    detail_only = None
    if detail is not None:
        generator = torch.Generator(device=device).manual_seed(seed + 1)
        with tqdm(total=2 * codes[0].shape[1], desc="drawing fine codes of held-out slices", leave=False) as bar:
            fine = sample_fine(detail, codes[0], generator=generator, progress=bar, **detail_sampling)
        detail_only = decode_all(vqvae, [codes[0], fine])
    return reconstructions, np.asarray(case_ids)[pick.numpy()], detail_only


def realism(cfg: PredictConfig, vqvae, prior, prior_ckpt, detail, root, image_size, test_u8, test_case_ids,
            test_recon, device):
    train_u8, train_set = load_split_tensor(root, "train", image_size, device)
    train_recon = reconstruct_all(vqvae, train_u8)
    samples, _ = generate(vqvae, prior, prior_ckpt, detail, cfg.realism_samples, cfg.slice, sampling_settings(cfg),
                          cfg.seed, device)
    validate_u8, validate_set = load_split_tensor(root, "validate", image_size, device)
    held_out_u8 = torch.cat([validate_u8, test_u8])
    held_out = (to_unit(held_out_u8).cpu(), np.concatenate([validate_set.case_ids, test_case_ids]))
    levels = held_out_levels(vqvae, detail, held_out_u8, held_out[1], cfg.realism_samples,
                             sampling_settings(cfg)["detail_sampling"], cfg.seed, device)
    report = realism_report(samples, to_unit(train_u8).cpu(), train_recon, train_set.case_ids,
                            to_unit(test_u8).cpu(), test_recon, held_out=held_out,
                            test_case_ids=test_case_ids, levels=levels, n_folds=cfg.realism_folds,
                            epochs=cfg.realism_epochs, lr=cfg.realism_lr, batch_size=cfg.realism_batch_size,
                            nn_train=cfg.realism_nn_train, seed=cfg.seed, device=device,
                            input_size=cfg.realism_size)
    report.update({"slice": cfg.slice, **sampling_settings(cfg)})
    return report


def predict(cfg: PredictConfig):
    if cfg.realism and cfg.reconstruction_only:
        raise FlagError("--realism judges the prior's samples; it cannot go with --reconstruction-only")
    if cfg.realism and cfg.split != "test":
        raise FlagError("--realism judges samples against the held-out validate and test slices; use --split test")
    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    out_dir = Path(cfg.out_dir)
    if cfg.reconstruction_only:
        (vqvae, vq_ckpt), prior, prior_ckpt, detail = load_vqvae(cfg.vqvae, device), None, None, None
    else:
        vqvae, vq_ckpt, prior, prior_ckpt, detail = load_trained_pair(cfg, device)
    image_size = image_size_of(vq_ckpt)
    root = resolve_data_root(cfg.data)
    split = cfg.split
    test_u8, test_set = load_split_tensor(root, split, image_size, device)

    recon = reconstruct_all(vqvae, test_u8)
    metrics = {**native_metrics(root, split, test_u8, recon, image_size), **model_size_metrics(test_u8, recon, split),
               f"{split}_ssim_noise_free": noise_free_ssim(root, split, test_u8, image_size),
               "split": split, "image_size": image_size, "n_images": len(test_u8), "data_root": str(root),
               "vqvae": cfg.vqvae, "prior": None if cfg.reconstruction_only else cfg.prior}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_reconstruction_grid(test_u8, recon, out_dir / "reconstructions.png")
    if cfg.save_reconstructions:
        for name, image in zip(test_set.files, recon.squeeze(1).numpy()):
            save_gray_png(out_dir / "reconstructions" / name, to_uint8(image))

    if prior is not None:
        samples, seconds = generate(vqvae, prior, prior_ckpt, detail, cfg.n_samples, cfg.slice,
                                    sampling_settings(cfg), cfg.seed, device)
        save_samples(samples, out_dir)
        save_beside_real(samples, test_u8, out_dir / "samples_vs_real.png")
        metrics.update({"prior_val_nll_bits": prior_ckpt["run"]["best"], **prior_ckpt["baselines"],
                        "n_samples": cfg.n_samples, "sampling_seconds": seconds})
        save_slice_sweep(vqvae, prior, prior_ckpt, detail, cfg.sweep_frames, sampling_settings(cfg), cfg.seed, device,
                         out_dir / "slice_sweep.gif")
        print(f"sampled {cfg.n_samples} slices in {seconds:.1f}s -> {out_dir / 'samples.png'}")
    save_code_maps(vqvae, test_u8, out_dir / "code_maps.png")
    perplexity, used = save_codebook_usage(vqvae, test_u8, out_dir / "codebook_usage.png")
    metrics.update({f"{split}_perplexity": perplexity, f"{split}_codes_used": used})
    save_progression_gif(cfg.progress_dir, out_dir / "progression.gif")
    save_curves(vq_ckpt["run"]["history"], prior_ckpt, out_dir / "curves.png")
    write_json(out_dir / "metrics.json", metrics)

    print_figures(metrics, split, image_size, len(test_u8), root)
    if cfg.realism:  # after the rest is written, so an interrupted --realism loses nothing else
        metrics["realism"] = realism(cfg, vqvae, prior, prior_ckpt, detail, root, image_size, test_u8,
                                     test_set.case_ids, recon, device)
        write_json(out_dir / "metrics.json", metrics)
        print_realism(metrics["realism"])
    return metrics


def print_figures(metrics, split, image_size, n_images, root):
    """The figures at the data's own size first, then at the model's."""
    def figure(name):
        return metrics[f"{split}_{name}"]
    upsampled = " (reconstructions upsampled, Lanczos)" if image_size != NATIVE_SIZE else ""
    print(f"{split} at the data's own {NATIVE_SIZE}x{NATIVE_SIZE}{upsampled}: SSIM {figure('ssim_native_mean'):.4f} "
          f"(min {figure('ssim_native_min'):.4f}) | PSNR {figure('psnr_native_mean'):.2f} dB | sharpness "
          f"{figure('sharpness_native'):.3f} (reconstruction over real mean gradient magnitude inside the head)")
    print(f"{split} SSIM {figure('ssim_mean'):.4f} (min {figure('ssim_min'):.4f}, std {figure('ssim_std'):.4f}) | "
          f"PSNR {figure('psnr_mean'):.2f} dB | {n_images} {split} slices at {image_size}x{image_size} from {root}")
    if figure("ssim_noise_free") is not None:
        print(f"(the demo slices' noise-free twins score SSIM {figure('ssim_noise_free'):.4f}: "
              f"no reconstruction that cannot predict the noise gets much above it)")


def main(argv=None):
    (cfg,) = parse_configs(__doc__, [PredictConfig], argv)
    run_script(lambda: predict(cfg))


if __name__ == "__main__":
    main()
