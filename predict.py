"""Evaluate the VQ-VAE on the test split and sample new slices from the prior.

    python predict.py                          # demo set
    python predict.py --data /path/to/oasis --save-reconstructions

Writes to out/: reconstructions.png, metrics.json, samples.png and samples/*.png,
slice_sweep.gif (generated slices from the lowest to the highest conditioned position),
code_maps.png (test inputs, their code indices, the decodings), codebook_usage.png,
progression.gif (from
train.py's per-epoch grids), curves.png, and with
--save-reconstructions every test reconstruction under reconstructions/.

    python predict.py --realism                # also judge whether samples pass for real

--realism (minutes on a CPU) adds a "realism" entry to metrics.json: a classifier
two-sample test of samples against reconstructed real slices, split by subject and
reported beside two controls that show the classifier works (real vs real ~0.5, real vs
blurred ~1.0); nearest-neighbour SSIM to the training slices, so copying shows; and
distances between intensity histograms and brain-area distributions.
"""
import json
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import jensenshannon
from scipy.stats import wasserstein_distance
from tqdm import tqdm

from dataset import (DARK_HOLE_LEVEL, FOREGROUND_THRESHOLD, DataError, dark_holes, demo_noise_free_split,
                     load_split_tensor, outline_roughness, resolve_data_root)
from modules import C2ST_CHANNELS, TwoSampleClassifier, sample_codes
from pixelcnn import load_prior, load_vqvae
from train import codebook_usage, progress_indices, reconstruct_all
from utils import (die, image_grid, opt, parse_configs, pick_device, psnr_per_image, run_script,
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
    n_samples: int = opt(16, "slices to generate", minimum=1)
    slice: int = opt(-1, "slice position to generate (0..31); -1 draws it from the training data")
    temperature: float = opt(1.0, "softmax temperature of the prior when sampling")
    top_p: float = opt(1.0, "nucleus sampling: draw each code from the most likely codes that make up this "
                            "much of the probability; 1.0 = from all")
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


def test_metrics(images_u8, recon):
    x = images_u8.float().div(255).cpu()
    ssim, psnr = ssim_per_image(x, recon), psnr_per_image(x, recon)
    return {"test_ssim_mean": float(ssim.mean()), "test_ssim_min": float(ssim.min()),
            "test_ssim_std": float(ssim.std()), "test_psnr_mean": float(psnr.mean())}


def noise_free_ssim(root, images_u8, image_size):
    """On the demo set, mean SSIM of the test slices' noise-free twins: the score of a
    reconstruction that removes exactly the noise (None elsewhere: real slices have no twins)."""
    twins = demo_noise_free_split(root, "test", image_size)
    if twins is None or twins.shape != tuple(images_u8.shape[:1] + images_u8.shape[2:]):
        return None
    return float(ssim_per_image(images_u8.float().div(255).cpu(), torch.from_numpy(twins).float().div(255)).mean())


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


def sampling_settings(cfg: PredictConfig):
    """The keyword arguments of modules.sample_codes that --temperature and --top-p set."""
    if cfg.temperature <= 0 or not 0 < cfg.top_p <= 1:
        raise DataError(f"--temperature must be above 0 and --top-p in (0, 1]; got {cfg.temperature}, {cfg.top_p}")
    return {"temperature": cfg.temperature, "top_p": cfg.top_p}


def generate(vqvae, prior, prior_ckpt, n, slice_position, sampling, seed, device):
    """-> (images (n, 1, H, W) in [0, 1] on the CPU, seconds spent sampling codes)."""
    cond = sample_conditions(prior_ckpt, n, slice_position, torch.Generator().manual_seed(seed))
    return decode_samples(vqvae, prior, prior_ckpt, n, cond, sampling, seed, device)


def decode_samples(vqvae, prior, prior_ckpt, n, cond, sampling, seed, device):
    """Sample n code grids for the given conditions (or None) and decode them."""
    cond = cond.to(device) if cond is not None else None
    height, width = prior_ckpt["grid"]
    device_generator = torch.Generator(device=device).manual_seed(seed)
    started = time.time()
    with tqdm(total=height, desc="sampling rows", leave=False) as bar:
        codes = sample_codes(prior, n, height, width, cond, generator=device_generator, progress=bar, **sampling)
    seconds = time.time() - started
    images = torch.cat([vqvae.decode_indices(codes[i:i + 64]).cpu() for i in range(0, n, 64)])
    return images, seconds


def save_slice_sweep(vqvae, prior, prior_ckpt, frames, sampling, seed, device, path):
    """A GIF of generated slices as the conditioned position runs from lowest to highest."""
    n_conditions = prior_ckpt["model_config"]["n_conditions"]
    if not n_conditions or frames < 1:
        return
    positions = torch.linspace(0, n_conditions - 1, min(frames, n_conditions)).round().long()
    images, _ = decode_samples(vqvae, prior, prior_ckpt, len(positions), positions, sampling, seed, device)
    pictures = [Image.fromarray(to_uint8(image)) for image in images.squeeze(1).numpy()]
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=300, loop=0)


def save_codebook_usage(vqvae, images_u8, path, batch_size=64):
    """Histogram of how often each code is used on the test split; returns (perplexity, codes used)."""
    counts = torch.zeros(vqvae.cfg.num_codes, dtype=torch.long)
    for i in range(0, len(images_u8), batch_size):
        codes = vqvae.encode_to_indices(images_u8[i:i + batch_size].float().div(255))
        counts += torch.bincount(codes.flatten().cpu(), minlength=vqvae.cfg.num_codes)
    perplexity, used = codebook_usage(counts)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.bar(np.arange(len(counts)), np.sort(counts.numpy())[::-1], width=1.0)
    ax.set(yscale="log", xlabel="code (sorted by use)", ylabel="uses on the test split",
           title=f"codebook use: {used}/{len(counts)} codes, perplexity {perplexity:.1f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return perplexity, used


def save_code_maps(vqvae, images_u8, path, count=4):
    """For a few test slices: the input, its grid of code indices, and the decoding of that grid."""
    ids = progress_indices(len(images_u8), count)
    x = images_u8[ids].float().div(255)
    codes = vqvae.encode_to_indices(x)
    decoded = vqvae.decode_indices(codes).cpu()
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
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_samples(images, out_dir):
    for old_sample in (out_dir / "samples").glob("sample_*.png"):
        old_sample.unlink()  # a smaller --n-samples must not leave an older run's extras
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
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- realism
#
# A classifier two-sample test (C2ST; Lopez-Paz & Oquab 2017): a small CNN learns to tell
# generated slices from real ones, and its accuracy on held-out images is the verdict
# (0.5 = indistinguishable). Two traps make such numbers lie, and both are closed here:
# - a subject's 32 slices are near copies, so a classifier scored on slices of subjects
#   it trained on recognises subjects (a plain 5-fold split scored 0.99 telling real
#   slices from other real slices; split by subject, 0.47). Folds are grouped by subject;
# - a classifier too weak to see anything also scores 0.5. Two controls run with the same
#   classifier and budget every time, and the verdict counts only when both pass.

# The real-vs-real control must land here, and the blurred-vs-real control at or above
# the minimum, for the classifier's verdict on the prior to count.
REAL_VS_REAL_RANGE = (0.35, 0.65)
BLURRED_MIN_ACCURACY = 0.9
# The blur the classifier must see: sigma 2 px on a 256 x 256 slice, scaled with the size.
BLUR_SIGMA_AT_256 = 2.0
# The coarse view reported beside the test at the model's image size.
C2ST_COARSE_SIZE = 64
HISTOGRAM_BINS = 64
# skimage.metrics.structural_similarity's defaults: 7 x 7 uniform window, sample covariance.
SSIM_WINDOW, SSIM_K1, SSIM_K2 = 7, 0.01, 0.03


def c2st_architecture(input_size):
    widths = "-".join(str(c) for c in C2ST_CHANNELS)
    return (f"{input_size}x{input_size} input; {len(C2ST_CHANNELS)} x (conv 3x3 stride 2, BatchNorm, "
            f"ReLU), channels {widths}; global average pool; linear -> 1 logit")


def classifier_input(images, size):
    """(N, 1, H, W) in [0, 1] -> float32, area-downsampled to size x size when larger."""
    images = images.float()
    if images.shape[-1] > size:
        images = F.interpolate(images, size=(size, size), mode="area")
    return images


def group_k_fold(groups, n_folds, seed):
    """Fold (0..n_folds-1) of every item, all items of a group in one fold.

    Groups are shuffled with the seed, then placed largest first, each into the fold that
    holds fewest items so far, so folds come out near equal in size."""
    unique, inverse, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    if len(unique) < n_folds:
        raise DataError(f"{len(unique)} subjects cannot fill {n_folds} folds; use fewer folds")
    order = np.random.default_rng(seed).permutation(len(unique))
    order = order[np.argsort(-counts[order], kind="stable")]
    group_fold, sizes = np.empty(len(unique), dtype=np.int64), np.zeros(n_folds, dtype=np.int64)
    for g in order:
        group_fold[g] = int(np.argmin(sizes))
        sizes[group_fold[g]] += counts[g]
    return group_fold[inverse.reshape(-1)]


def two_sample_folds(groups_a, groups_b, n_folds, seed):
    """Folds of the items of sample a and of sample b, for a cross-validation that never
    scores an item whose group (subject) it trained on.

    groups_*: the group of each item, or an int count for independent draws (generated
    slices), which are spread over the folds at random. Groups found in both samples (a
    slice and its blurred copy) share one fold; otherwise each sample is spread over the
    folds on its own, so every fold holds both classes in about their overall ratio."""
    def independent(groups):
        return isinstance(groups, (int, np.integer))

    if not independent(groups_a) and not independent(groups_b) and np.intersect1d(groups_a, groups_b).size:
        folds = group_k_fold(np.concatenate([groups_a, groups_b]), n_folds, seed)
        return folds[:len(groups_a)], folds[len(groups_a):]
    return tuple(group_k_fold(np.arange(groups) if independent(groups) else groups, n_folds, seed + salt)
                 for salt, groups in enumerate((groups_a, groups_b)))


def fold_splits(folds):
    """[(train indices, test indices)] for each fold number in `folds`."""
    return [(np.flatnonzero(folds != k), np.flatnonzero(folds == k)) for k in np.unique(folds)]


def balanced_accuracy(predicted, labels):
    """Mean of the per-class accuracies: 0.5 for a guess even when a fold is lopsided."""
    return float(np.mean([(predicted[labels == c] == c).mean() for c in (0, 1)]))


def train_and_score(train_x, train_y, test_x, test_y, *, epochs, lr, batch_size, seed):
    """Train a fresh TwoSampleClassifier and return its balanced accuracy on the test items.
    Seeded without touching the global random state."""
    device = train_x.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = TwoSampleClassifier().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order_rng = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=order_rng).to(device)
        for start in range(0, len(order), batch_size):
            ids = order[start:start + batch_size]
            loss = F.binary_cross_entropy_with_logits(model(train_x[ids]), train_y[ids])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(test_x[i:i + 256]) > 0 for i in range(0, len(test_x), 256)])
    return balanced_accuracy(predicted.long().cpu().numpy(), test_y.long().cpu().numpy())


def classifier_two_sample_test(images_a, images_b, groups_a, groups_b, *, n_folds=5, epochs=20,
                               lr=1e-3, batch_size=32, seed=0, device="cpu", input_size=C2ST_COARSE_SIZE):
    """Cross-validated balanced accuracy of TwoSampleClassifier telling a (label 0) from b
    (label 1); 0.5 = indistinguishable.

    images_*: (N, 1, H, W) in [0, 1]; groups_*: each image's subject, or None for
    independent draws (see two_sample_folds). The larger sample is cut, at random, to the
    size of the smaller so the classes are balanced; the same seed gives the same number."""
    rng = np.random.default_rng(seed)
    n = min(len(images_a), len(images_b))
    keep_a, keep_b = (random_subset(len(x), n, rng) for x in (images_a, images_b))
    groups = [np.asarray(g)[k] if g is not None else n for g, k in ((groups_a, keep_a), (groups_b, keep_b))]
    folds_a, folds_b = two_sample_folds(*groups, n_folds, seed)
    device = torch.device(device)
    x = classifier_input(torch.cat([images_a[keep_a], images_b[keep_b]]), input_size).to(device)
    y = torch.cat([torch.zeros(n), torch.ones(n)]).to(device)
    splits = fold_splits(np.concatenate([folds_a, folds_b]))
    accuracies = [train_and_score(x[train], y[train], x[test], y[test], epochs=epochs, lr=lr,
                                  batch_size=batch_size, seed=seed * 1000 + k)
                  for k, (train, test) in enumerate(tqdm(splits, desc=f"two-sample test at {x.shape[-1]} px",
                                                         unit="fold", leave=False))]
    subjects = [len(np.unique(g)) if not isinstance(g, int) else None for g in groups]
    return {"accuracy": float(np.mean(accuracies)), "fold_accuracies": accuracies,
            "accuracy_kind": "balanced (mean of per-class accuracies) on held-out folds",
            "architecture": c2st_architecture(x.shape[-1]), "n_per_class": n,
            "n_subjects": {"a": subjects[0], "b": subjects[1]}, "n_folds": n_folds,
            "folds_grouped_by": "subject (case id); independent draws assigned at random",
            "budget": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "optimizer": "Adam"},
            "seed": seed}


def random_subset(n_items, n, rng):
    """Sorted indices of n of n_items items drawn without replacement (all when n >= n_items)."""
    return np.sort(rng.permutation(n_items)[:n])


def real_vs_real_control(images, case_ids, n_per_class, *, seed=0, **c2st):
    """C2ST between two disjoint halves of the subjects; it should score about 0.5."""
    rng = np.random.default_rng(seed)
    subjects = rng.permutation(np.unique(case_ids))
    in_a = np.isin(case_ids, subjects[:len(subjects) // 2])
    sides = []
    for side in (np.flatnonzero(in_a), np.flatnonzero(~in_a)):
        sides.append(side[random_subset(len(side), n_per_class, rng)])
    a, b = sides
    return classifier_two_sample_test(images[a], images[b], case_ids[a], case_ids[b], seed=seed, **c2st)


def blur_sigma(image_size):
    return BLUR_SIGMA_AT_256 * image_size / 256


def gaussian_blur(images, sigma):
    """(N, 1, H, W) tensor -> the same, each image blurred in-plane with a Gaussian of sigma px."""
    blurred = gaussian_filter(images.float().cpu().numpy(), sigma=(0, 0, sigma, sigma))
    return torch.from_numpy(blurred)


def blurred_vs_real_control(images, case_ids, n_per_class, *, sigma, seed=0, **c2st):
    """C2ST between slices and their blurred copies; it should score near 1.0. A slice and its
    copy share the subject's fold."""
    picked = random_subset(len(images), n_per_class, np.random.default_rng(seed))
    real = images[picked]
    result = classifier_two_sample_test(real, gaussian_blur(real, sigma), case_ids[picked],
                                        case_ids[picked], seed=seed, **c2st)
    return {**result, "blur_sigma_px": sigma}


def controls_pass(real_vs_real_accuracy, blurred_accuracy):
    low, high = REAL_VS_REAL_RANGE
    return bool(low <= real_vs_real_accuracy <= high and blurred_accuracy >= BLURRED_MIN_ACCURACY)


def _window_means(x, out=None, scratch=None):
    """(N, H, W) -> the mean over every SSIM window that fits inside the image, (N, H-6, W-6),
    into `out` when given (`scratch`: (N, H, W-6)). Shifted in-place sums: on a CPU they run
    about 3x faster than avg_pool2d, and this loop is where --realism spends its SSIM time."""
    n, height, width = x.shape
    k, h, w = SSIM_WINDOW, height - SSIM_WINDOW + 1, width - SSIM_WINDOW + 1
    rows = x.new_empty(n, height, w) if scratch is None else scratch
    torch.add(x[:, :, :w], x[:, :, 1:w + 1], out=rows)
    for shift in range(2, k):
        rows += x[:, :, shift:shift + w]
    out = x.new_empty(n, h, w) if out is None else out
    torch.add(rows[:, :h], rows[:, 1:h + 1], out=out)
    for shift in range(2, k):
        out += rows[:, shift:shift + h]
    return out.div_(k * k)


@torch.no_grad()
def ssim_matrix(queries, references, chunk=32, device="cpu"):
    """SSIM of every query against every reference: (Q, R) float64 numpy.

    The number skimage.metrics.structural_similarity(q, r, data_range=1.0) gives (to 1e-10),
    batched: one skimage call costs 1.7 ms at 128 x 128 here, 15 minutes for 256 samples
    against 2,000 slices. skimage filters with a 7 x 7 window and then drops a 3-pixel
    border, which leaves exactly the windows that fit inside the image, as here. Small
    reference chunks stay in cache. Inputs: (N, 1, H, W) or (N, H, W) in [0, 1]."""
    def prepare(x):
        x = torch.as_tensor(x).to(device=device, dtype=torch.float64).clamp(0, 1)
        return x[:, 0] if x.dim() == 4 else x

    queries = prepare(queries)
    cov_norm = SSIM_WINDOW ** 2 / (SSIM_WINDOW ** 2 - 1)
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2  # data_range 1.0
    mean_q = _window_means(queries)
    var_q = cov_norm * (_window_means(queries * queries) - mean_q ** 2)
    square_mean_q = mean_q ** 2
    result = torch.empty(len(queries), len(references), dtype=torch.float64)
    for start in range(0, len(references), chunk):
        refs = prepare(references[start:start + chunk])
        mean_r = _window_means(refs)
        var_r_c2 = cov_norm * (_window_means(refs * refs) - mean_r ** 2) + c2
        square_mean_r_c1 = mean_r ** 2 + c1
        product, scratch = torch.empty_like(refs), refs.new_empty(refs.shape[:2] + mean_r.shape[2:])
        ssim, denominator = torch.empty_like(mean_r), torch.empty_like(mean_r)
        for i, query in enumerate(queries):
            # S = (2 mu_q mu_r + C1)(2 cov + C2) / ((mu_q^2 + mu_r^2 + C1)(var_q + var_r + C2)),
            # in place in preallocated buffers
            torch.mul(refs, query, out=product)
            _window_means(product, out=ssim, scratch=scratch)
            ssim.addcmul_(mean_r, mean_q[i], value=-1).mul_(2 * cov_norm).add_(c2)
            ssim.mul_(torch.mul(mean_r, mean_q[i], out=denominator).mul_(2).add_(c1))
            ssim.div_(torch.add(square_mean_r_c1, square_mean_q[i], out=denominator))
            ssim.div_(torch.add(var_r_c2, var_q[i], out=denominator))
            result[i, start:start + len(refs)] = ssim.mean(dim=(1, 2)).cpu()
    return result.numpy()


def nearest_neighbour_ssim(queries, references, device="cpu"):
    """Each query's highest SSIM against any reference: (Q,) numpy. 1.0 = an exact copy."""
    return ssim_matrix(queries, references, device=device).max(axis=1)


def intensity_histogram(images, bins=HISTOGRAM_BINS):
    counts, _ = np.histogram(torch.as_tensor(images).float().clamp(0, 1).cpu().numpy(),
                             bins=bins, range=(0.0, 1.0))
    return counts / counts.sum()


def brain_area_fractions(images):
    """Fraction of each image above dataset.FOREGROUND_THRESHOLD: (N,) numpy."""
    images = torch.as_tensor(images).float()
    return (images > FOREGROUND_THRESHOLD).flatten(1).float().mean(dim=1).cpu().numpy()


def distribution_distances(images, reference, bins=HISTOGRAM_BINS):
    """How far the pooled pixel-intensity histogram and the per-image brain-area
    distribution of `images` lie from those of `reference` (0 = the same)."""
    p, q = intensity_histogram(images, bins), intensity_histogram(reference, bins)
    area, reference_area = brain_area_fractions(images), brain_area_fractions(reference)
    return {"histogram_l1": float(np.abs(p - q).sum()),
            "histogram_jensen_shannon": float(jensenshannon(p, q, base=2)),
            "brain_area_wasserstein": float(wasserstein_distance(area, reference_area)),
            "brain_area_mean": float(area.mean()), "reference_brain_area_mean": float(reference_area.mean())}


def _nn_summary(values):
    return {"mean": float(values.mean()), "max": float(values.max()), "n": int(len(values))}


def judged_c2st(samples, train_recon, train_case_ids, *, input_size, seed, **c2st_args):
    """The C2ST of samples against reconstructed train slices at one input size, with both
    controls run by the same classifier and budget, and whether the controls pass."""
    c2st = classifier_two_sample_test(samples, train_recon, None, train_case_ids, seed=seed,
                                      input_size=input_size, **c2st_args)
    c2st["sides"] = {"a": "generated", "b": "VQ-VAE reconstructions of train slices"}
    n = c2st["n_per_class"]
    real_vs_real = real_vs_real_control(train_recon, train_case_ids, n, seed=seed, input_size=input_size,
                                        **c2st_args)
    blurred = blurred_vs_real_control(train_recon, train_case_ids, n, sigma=blur_sigma(samples.shape[-1]),
                                      seed=seed, input_size=input_size, **c2st_args)
    passed = controls_pass(real_vs_real["accuracy"], blurred["accuracy"])
    return {**c2st, "input_size": int(input_size), "valid": passed,
            "controls": {"real_vs_real": real_vs_real, "blurred_vs_real": blurred,
                         "images": "VQ-VAE reconstructions of train slices",
                         "real_vs_real_range": list(REAL_VS_REAL_RANGE),
                         "blurred_min_accuracy": BLURRED_MIN_ACCURACY}}


def as_uint8(images):
    """(N, 1, H, W) in [0, 1] -> (N, H, W) uint8, as the images are saved."""
    return to_uint8(torch.as_tensor(images).float().squeeze(1).cpu().numpy())


def shape_figures(images_by_name):
    """What a person sees at a glance, per image: how ragged the head's outline is and how many
    black holes lie inside it (dataset.outline_roughness, dataset.dark_holes)."""
    figures = {}
    for name, images in images_by_name.items():
        images = as_uint8(images)
        roughness, holes = outline_roughness(images), dark_holes(images)
        roughness = roughness[np.isfinite(roughness)]
        figures[name] = {"outline_roughness_mean": float(roughness.mean()) if roughness.size else None,
                         "outline_roughness_std": float(roughness.std()) if roughness.size else None,
                         "hole_rate": float((holes > 0).mean()), "holes_per_image": float(holes.mean()),
                         "n": int(len(images))}
    return {**figures, "hole_definition": f"a region darker than {DARK_HOLE_LEVEL} of full scale inside the "
                                          "head, away from its rim, of 40 px or more at 256x256 (scaled)",
            "roughness_definition": "perimeter / sqrt(area) of the non-black region; about 3.2 for a disc"}


def realism_report(samples, train_images, train_recon, train_case_ids, test_images, test_recon, *,
                   n_folds=5, epochs=20, lr=1e-3, batch_size=32, nn_train=0, seed=0, device="cpu",
                   input_size=0):
    """Every realism figure for `samples` (all image tensors (N, 1, H, W) in [0, 1]).

    The C2ST and both controls judge VQ-VAE reconstructions of the train split, so the
    decoder is the same on both sides and only the prior is judged: at input_size (0 = the
    images' own size) and at the coarse 64 px view. Nearest-neighbour SSIM and the
    distribution distances compare against the real train slices."""
    started = time.time()
    train_case_ids = np.asarray(train_case_ids)
    if len(np.unique(train_case_ids)) < 2 * n_folds:
        raise DataError(f"--realism needs at least {2 * n_folds} training subjects for {n_folds} "
                        f"folds on each half of the real-vs-real control; found "
                        f"{len(np.unique(train_case_ids))}")
    c2st_args = {"n_folds": n_folds, "epochs": epochs, "lr": lr, "batch_size": batch_size, "device": device}
    size = min(input_size or samples.shape[-1], samples.shape[-1])
    c2st = judged_c2st(samples, train_recon, train_case_ids, input_size=size, seed=seed, **c2st_args)
    coarse = None
    if size > C2ST_COARSE_SIZE:
        coarse = judged_c2st(samples, train_recon, train_case_ids, input_size=C2ST_COARSE_SIZE, seed=seed,
                             **c2st_args)
    c2st_seconds = time.time() - started

    references = train_images
    if nn_train and nn_train < len(train_images):
        references = train_images[random_subset(len(train_images), nn_train, np.random.default_rng(seed))]
    nn_ssim = {"samples": _nn_summary(nearest_neighbour_ssim(samples, references, device)),
               "test_real": _nn_summary(nearest_neighbour_ssim(test_images, references, device)),
               "test_reconstructions": _nn_summary(nearest_neighbour_ssim(test_recon, references, device)),
               "n_train_compared": len(references), "image_size": int(samples.shape[-1]),
               "statistic": "per image, the max SSIM against every compared train slice (skimage "
                            "structural_similarity, data_range=1.0); mean and max over images"}
    return {
        "c2st": c2st,
        "c2st_valid": c2st["valid"],
        "controls_pass": c2st["valid"],
        "controls": c2st["controls"],
        "c2st_64": coarse,
        "nn_ssim": nn_ssim,
        "shape": shape_figures({"samples": samples, "test_real": test_images, "test_reconstructions": test_recon}),
        "distances": {"reference": "real train slices",
                      "samples": distribution_distances(samples, train_images),
                      "test_real": distribution_distances(test_images, train_images),
                      "test_reconstructions": distribution_distances(test_recon, train_images),
                      "bins": HISTOGRAM_BINS, "foreground_threshold": FOREGROUND_THRESHOLD},
        "n_samples": len(samples), "seed": seed,
        "seconds": {"c2st_and_controls": c2st_seconds, "total": time.time() - started},
    }


def _c2st_line(c2st):
    controls = c2st["controls"]
    verdict = "valid" if c2st["valid"] else "NOT VALID (controls failed)"
    return (f"C2ST at {c2st['input_size']} px, generated vs reconstructed real: {c2st['accuracy']:.3f} "
            f"(0.5 = indistinguishable; folds {', '.join(f'{a:.2f}' for a in c2st['fold_accuracies'])}) | "
            f"controls: real vs real {controls['real_vs_real']['accuracy']:.3f}, blurred vs real "
            f"{controls['blurred_vs_real']['accuracy']:.3f} -> {verdict}")


def print_realism(report):
    for c2st in (report["c2st"], report["c2st_64"]):
        if c2st is not None:
            print(_c2st_line(c2st))
    nn_ssim = report["nn_ssim"]
    print("nearest-neighbour SSIM to train (mean / max): " + " | ".join(
        f"{name} {nn_ssim[name]['mean']:.3f} / {nn_ssim[name]['max']:.3f}"
        for name in ("samples", "test_real", "test_reconstructions")))
    d = report["distances"]
    print("vs real train slices, histogram JS / brain-area W1: " + " | ".join(
        f"{name} {d[name]['histogram_jensen_shannon']:.4f} / {d[name]['brain_area_wasserstein']:.4f}"
        for name in ("samples", "test_real", "test_reconstructions")))
    shape = report["shape"]
    print("outline roughness / images with a black hole: " + " | ".join(
        f"{name} {shape[name]['outline_roughness_mean']:.2f} / {shape[name]['hole_rate']:.1%}"
        for name in ("samples", "test_real", "test_reconstructions")))


def realism(cfg: PredictConfig, vqvae, prior, prior_ckpt, root, image_size, test_u8, test_recon, device):
    train_u8, train_set = load_split_tensor(root, "train", image_size, device)
    train_recon = reconstruct_all(vqvae, train_u8)
    samples, _ = generate(vqvae, prior, prior_ckpt, cfg.realism_samples, cfg.slice, sampling_settings(cfg),
                          cfg.seed, device)
    report = realism_report(samples, train_u8.float().div(255).cpu(), train_recon, train_set.case_ids,
                            test_u8.float().div(255).cpu(), test_recon, n_folds=cfg.realism_folds,
                            epochs=cfg.realism_epochs, lr=cfg.realism_lr, batch_size=cfg.realism_batch_size,
                            nn_train=cfg.realism_nn_train, seed=cfg.seed, device=device,
                            input_size=cfg.realism_size)
    report.update({"slice": cfg.slice, **sampling_settings(cfg)})
    return report


def predict(cfg: PredictConfig):
    if cfg.realism and cfg.reconstruction_only:
        die("--realism judges the prior's samples; it cannot go with --reconstruction-only")
    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    out_dir = Path(cfg.out_dir)
    vqvae, vq_ckpt = load_vqvae(cfg.vqvae, device)
    prior, prior_ckpt = (None, None) if cfg.reconstruction_only else load_prior(cfg.prior, device)
    image_size = vq_ckpt["train_config"]["image_size"]
    root = resolve_data_root(cfg.data)
    test_u8, test_set = load_split_tensor(root, "test", image_size, device)

    recon = reconstruct_all(vqvae, test_u8)
    metrics = {**test_metrics(test_u8, recon), "test_ssim_noise_free": noise_free_ssim(root, test_u8, image_size),
               "split": "test", "image_size": image_size, "n_images": len(test_u8), "data_root": str(root),
               "vqvae": cfg.vqvae, "prior": None if cfg.reconstruction_only else cfg.prior}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_reconstruction_grid(test_u8, recon, out_dir / "reconstructions.png")
    if cfg.save_reconstructions:
        for name, image in zip(test_set.files, recon.squeeze(1).numpy()):
            save_gray_png(out_dir / "reconstructions" / name, to_uint8(image))

    if prior is not None:
        samples, seconds = generate(vqvae, prior, prior_ckpt, cfg.n_samples, cfg.slice,
                                    sampling_settings(cfg), cfg.seed, device)
        save_samples(samples, out_dir)
        metrics.update({"prior_val_nll_bits": prior_ckpt["run"]["best"], **prior_ckpt["baselines"],
                        "n_samples": cfg.n_samples, "sampling_seconds": seconds})
        save_slice_sweep(vqvae, prior, prior_ckpt, cfg.sweep_frames, sampling_settings(cfg), cfg.seed, device,
                         out_dir / "slice_sweep.gif")
        print(f"sampled {cfg.n_samples} slices in {seconds:.1f}s -> {out_dir / 'samples.png'}")
    save_code_maps(vqvae, test_u8, out_dir / "code_maps.png")
    perplexity, used = save_codebook_usage(vqvae, test_u8, out_dir / "codebook_usage.png")
    metrics.update({"test_perplexity": perplexity, "test_codes_used": used})
    save_progression_gif(cfg.progress_dir, out_dir / "progression.gif")
    save_curves(vq_ckpt["run"]["history"], prior_ckpt, out_dir / "curves.png")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    print(f"test SSIM {metrics['test_ssim_mean']:.4f} (min {metrics['test_ssim_min']:.4f}, "
          f"std {metrics['test_ssim_std']:.4f}) | PSNR {metrics['test_psnr_mean']:.2f} dB | "
          f"{len(test_u8)} test slices at {image_size}x{image_size} from {root}")
    if metrics["test_ssim_noise_free"] is not None:
        print(f"(the demo slices' noise-free twins score SSIM {metrics['test_ssim_noise_free']:.4f}: "
              f"no reconstruction that cannot predict the noise gets much above it)")
    if cfg.realism:  # after the rest is written, so an interrupted --realism loses nothing else
        metrics["realism"] = realism(cfg, vqvae, prior, prior_ckpt, root, image_size, test_u8, recon, device)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print_realism(metrics["realism"])
    return metrics


def main(argv=None):
    (cfg,) = parse_configs(__doc__, [PredictConfig], argv)
    run_script(lambda: predict(cfg))


if __name__ == "__main__":
    main()
