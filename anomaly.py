"""Anomaly maps from the prior, scored on synthetic lesions against the reconstruction error.

    python anomaly.py                                  # demo set
    python anomaly.py --data path/to/keras_png_slices_data --vqvae ... --prior ...

A slice is encoded; the codes the prior finds unlikely (probability below --threshold, from
one pass of the gated PixelCNN, conditioned on the slice's position) are drawn afresh from the
prior, each given the codes before it ("healing", Pinaya et al., Medical Image Analysis
2022); the healed codes are decoded, and the difference between the slice and its healed
versions, where codes were healed, is the anomaly map. Beside it, on the same slices: the
plain reconstruction error (the baseline) and the prior's per-code NLL, upsampled. Every map
is masked to the brain (the head less its rim of scalp and skull) less a band along the brain's
edge (--edge-margin), where healed outlines differ a little from every slice's, healthy or not.

The benchmark (lesions.py): smooth-edged blobs of random shape, size and contrast drawn
inside the brain of half the validate and test slices (seeded; nothing is written into the
data folders). Everything that is chosen, the healing threshold (--threshold auto) and each
map's pixel threshold for Dice, is chosen on the validate slices; the test slices are loaded
only afterwards and reported: pixel AUROC, AUPRC and Dice, and slice AUROC (lesioned against
untouched slices, each scored by its map's maximum), in all and split by lesion size and
by bright and dark lesions.

Writes out/anomaly_metrics.json (every figure on test, the same on the validate slices the
choices were made on, the thresholds chosen and the time the test maps took) and
out/anomaly.png (rows: test slices; columns: the slice, its lesion mask, the reconstruction
error, the code NLL, the healed slice, the anomaly map).
"""
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt, gaussian_filter
from tqdm import tqdm

from brain import brain_region
from checkpoint import TrainedModels, image_size_of, load_trained_pair
from cli import opt, parse_configs, run_script
from dataset import load_split_tensor, resolve_data_root
from errors import FlagError
from files import progress_indices, save_figure, write_json
from hardware import pick_device, set_seed
from lesions import CONTRAST_BINS, FROM_10PX, SIZE_BINS, LesionSet, detection_figures, make_lesion_set
from metrics import average_precision, best_dice
from prior import code_nll, heal_codes, slice_conditions
from slices import NATIVE_SIZE
from vqvae import decode_all, to_unit

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

METHODS = ("reconstruction", "code_nll", "healing")
BINS = SIZE_BINS + (FROM_10PX,) + CONTRAST_BINS  # the columns of the printed table
METHOD_NAMES = {"reconstruction": "reconstruction error", "code_nll": "code NLL", "healing": "healing"}


@dataclass
class AnomalyConfig(TrainedModels):
    data: str = opt("demo", "OASIS root whose validate and test slices get the lesions, or 'demo'")
    out_dir: str = opt("out", "where anomaly.png and anomaly_metrics.json go")
    threshold: str = opt("auto", "heal the codes whose probability under the prior is below this (a number in "
                                 "(0, 1)); auto = the value of --threshold-grid whose healing maps score the "
                                 "best pixel AUPRC on the validate lesions")
    threshold_grid: tuple = opt((0.001, 0.003, 0.01, 0.03), "the probabilities --threshold auto chooses from")
    n_heal: int = opt(4, "healed versions of each slice; the map combines the slice's differences from them",
                      minimum=1)
    combine: str = opt("min", "how the differences from the --n-heal healed versions make one map: their mean, or "
                               "at each pixel the smallest (what no healed version explains)",
                       choices=["mean", "min"])
    smooth: float = opt(6.0, "sigma of the Gaussian that smooths the difference maps, px at 256 x 256 (scaled "
                             "to the image size); 0 = none")
    edge_margin: float = opt(8.0, "the maps leave out a band this wide inside the brain's edge, px at 256 x 256 "
                                   "(scaled to the image size): there the healed outline differs a little from "
                                   "the slice's on every slice, healthy or not; lesions are still scored there")
    lesion_size: tuple = opt((4.0, 32.0), "smallest and largest lesion diameter, px at 256 x 256 (scaled to "
                                          "the image size)")
    lesion_contrast: tuple = opt((0.15, 0.5), "smallest and largest intensity change at a lesion's core, as a "
                                              "share of full scale; half the lesions brighten, half darken")
    val_slices: int = opt(64, "validate slices, evenly spread over the split, that the thresholds are chosen on; "
                              "0 = all", minimum=0)
    max_slices: int = opt(0, "test slices, evenly spread over the split, that are evaluated; 0 = all", minimum=0)
    batch_size: int = opt(1024, "code grids healed at once", minimum=1)
    seed: int = opt(0, "seed of the lesions (validate: this seed, test: the next) and of healing")
    device: str = opt("auto", "cuda, cpu, or auto (cuda when available)")


# ----------------------------------------------------------------------------- flags

def heal_threshold(text):
    """--threshold as a probability, or None for auto."""
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise FlagError(f"--threshold must be 'auto' or a probability in (0, 1); got {text!r}")
    return value


def check_range(name, values, upper=math.inf):
    if len(values) != 2 or not 0 < values[0] <= values[1] <= upper:
        bound = f" and at most {upper:g}" if upper < math.inf else ""
        raise FlagError(f"--{name} takes two numbers, smallest then largest, above 0{bound}; got {list(values)}")


def check_flags(cfg: AnomalyConfig):
    heal_threshold(cfg.threshold)
    if not cfg.threshold_grid or not all(0 < t < 1 for t in cfg.threshold_grid):
        raise FlagError(f"--threshold-grid takes probabilities in (0, 1); got {list(cfg.threshold_grid)}")
    check_range("lesion-size", cfg.lesion_size)
    check_range("lesion-contrast", cfg.lesion_contrast, upper=1.0)
    if cfg.smooth < 0:
        raise FlagError(f"--smooth must be at least 0; got {cfg.smooth}")
    if cfg.edge_margin < 0:
        raise FlagError(f"--edge-margin must be at least 0; got {cfg.edge_margin}")


# ----------------------------------------------------------------------------- the lesioned slices

@dataclass
class Benchmark:
    """Slices of one split with lesions drawn into half of them, as the detector sees them."""
    split: str
    lesions: LesionSet
    regions: np.ndarray        # bool (N, H, W): the brain of each slice, where maps are scored
    inner: np.ndarray          # bool (N, H, W): the brain less the band along its edge, where maps are drawn
    cond: torch.Tensor | None  # the slice positions the prior is conditioned on (None: unconditioned)
    slice_idx: np.ndarray


def lesion_benchmark(root, split, image_size, count, seed, cfg: AnomalyConfig, n_conditions, device):
    """`count` slices of a split (evenly spread; 0 = all) with seeded lesions drawn in."""
    images_u8, slices = load_split_tensor(root, split, image_size)
    ids = progress_indices(len(images_u8), count or len(images_u8))
    lesions = make_lesion_set(to_unit(images_u8[ids, 0]).numpy(), seed, cfg.lesion_size, cfg.lesion_contrast)
    regions = np.stack([brain_region(image) for image in lesions.images])
    inner = inner_regions(regions, cfg.edge_margin * image_size / NATIVE_SIZE)
    slice_idx = slices.slice_idx[ids]
    return Benchmark(split, lesions, regions, inner, slice_conditions(slice_idx, n_conditions, device), slice_idx)


def inner_regions(regions, margin):
    """Each region less the band within `margin` px of its edge."""
    if margin <= 0:
        return regions
    return np.stack([distance_transform_edt(region) > margin for region in regions])


# ----------------------------------------------------------------------------- maps

@dataclass
class Encoded:
    codes: torch.Tensor           # (N, h, w) on the device
    nll: torch.Tensor             # (N, h, w): -log p(code | codes before it), nats
    reconstructions: np.ndarray   # (N, H, W): the decoded codes


@torch.no_grad()
def encode(vqvae, prior, bench: Benchmark, device, batch_size=64):
    images = torch.from_numpy(bench.lesions.images)[:, None]
    codes = torch.cat([vqvae.encode_to_indices(images[i:i + batch_size].to(device))
                       for i in range(0, len(images), batch_size)])
    nll = torch.cat([code_nll(prior, codes[i:i + batch_size], None if bench.cond is None else
                              bench.cond[i:i + batch_size]) for i in range(0, len(codes), batch_size)])
    return Encoded(codes, nll, decode_all(vqvae, codes)[:, 0].numpy())


def smooth(maps, sigma_at_256):
    """Gaussian smoothing of each map (N, H, W); sigma in px at 256 x 256, scaled to the maps."""
    sigma = sigma_at_256 * maps.shape[-1] / NATIVE_SIZE
    return gaussian_filter(maps, (0, sigma, sigma)) if sigma > 0 else maps


def upsample(grids, size, mode):
    """Code grids (N, h, w) -> (N, size, size) numpy."""
    return F.interpolate(grids[:, None].float().cpu(), size=(size, size), mode=mode)[:, 0].numpy()


def reconstruction_error_map(bench: Benchmark, encoded: Encoded, sigma):
    """The baseline: |slice - reconstruction|, smoothed, in the brain less its edge band."""
    return smooth(np.abs(bench.lesions.images - encoded.reconstructions), sigma) * bench.inner


def code_nll_map(bench: Benchmark, encoded: Encoded):
    """The prior's per-code NLL, upsampled bilinearly to the image, in the brain less its edge band."""
    return upsample(encoded.nll, bench.regions.shape[-1], "bilinear") * bench.inner


@torch.no_grad()
def heal(vqvae, prior, bench: Benchmark, encoded: Encoded, threshold, n_heal, batch_size, seed, device, combine):
    """Heal every slice n_heal times -> (|slice - healed| (N, H, W) combined over the healed versions by
    `combine`, mean healed slice, flags).

    The n_heal copies of every slice are healed together, batch_size code grids at a time."""
    flagged = encoded.nll > -math.log(threshold)
    owners = torch.arange(len(encoded.codes), device=device).repeat_interleave(n_heal)
    generator = torch.Generator(device=device).manual_seed(seed)
    chunks = [owners[i:i + batch_size] for i in range(0, len(owners), batch_size)]
    healed = []
    with tqdm(total=encoded.codes.shape[1] * len(chunks), desc=f"healing {bench.split}", leave=False) as bar:
        for who in chunks:
            cond = bench.cond[who] if bench.cond is not None else None
            codes = heal_codes(prior, encoded.codes[who], flagged[who], cond, generator=generator, progress=bar)
            healed.append(decode_all(vqvae, codes)[:, 0].numpy())
    images = bench.lesions.images
    healed = np.concatenate(healed).reshape(len(images), n_heal, *images.shape[1:])
    differences = np.abs(images[:, None] - healed)
    combined = differences.min(axis=1) if combine == "min" else differences.mean(axis=1)
    return combined, healed.mean(axis=1), flagged


def healing_map(bench: Benchmark, differences, flagged, sigma):
    """The difference from the healed slices, smoothed, where codes were healed: weighted by the
    map of flagged codes, upsampled and smoothed over about a code cell (Pinaya et al. filter
    their residuals by the resampling mask so), in the brain less its edge band."""
    size = bench.regions.shape[-1]
    cell = size / flagged.shape[-1]
    where_healed = gaussian_filter(upsample(flagged, size, "nearest"), (0, cell / 2, cell / 2))
    return smooth(differences, sigma) * where_healed * bench.inner


@dataclass
class Maps:
    reconstruction: np.ndarray
    code_nll: np.ndarray
    healing: np.ndarray
    healed: np.ndarray            # the mean healed slice, for the figure
    healed_share: float           # share of the codes in the brain that were healed


def anomaly_maps(vqvae, prior, bench: Benchmark, threshold, cfg: AnomalyConfig, device, encoded=None):
    """The three maps of a benchmark's slices; `encoded` saves encoding them again."""
    if encoded is None:
        encoded = encode(vqvae, prior, bench, device)
    differences, healed, flagged = heal(vqvae, prior, bench, encoded, threshold, cfg.n_heal, cfg.batch_size,
                                        cfg.seed, device, cfg.combine)
    grid_regions = upsample(torch.from_numpy(bench.regions), flagged.shape[-1], "area") > 0.5
    return Maps(reconstruction_error_map(bench, encoded, cfg.smooth), code_nll_map(bench, encoded),
                healing_map(bench, differences, flagged, cfg.smooth), healed,
                float(flagged.cpu().numpy()[grid_regions].mean()) if grid_regions.any() else 0.0)


# ----------------------------------------------------------------------------- chosen on validate

def pixel_auprc(maps, bench: Benchmark):
    return average_precision(maps[bench.regions], bench.lesions.masks[bench.regions])


def choose_heal_threshold(vqvae, prior, bench: Benchmark, cfg: AnomalyConfig, device):
    """-> (threshold, its validate maps, {candidate: validate pixel AUPRC} for auto, else {})."""
    fixed = heal_threshold(cfg.threshold)
    encoded = encode(vqvae, prior, bench, device)
    if fixed is not None:
        return fixed, anomaly_maps(vqvae, prior, bench, fixed, cfg, device, encoded), {}
    tried = {}
    for candidate in sorted(cfg.threshold_grid):
        maps = anomaly_maps(vqvae, prior, bench, candidate, cfg, device, encoded)
        tried[candidate] = (pixel_auprc(maps.healing, bench), maps)
        print(f"  threshold {candidate:g}: {maps.healed_share:.1%} of the brain's codes healed, "
              f"validate pixel AUPRC {tried[candidate][0]:.3f}")
    best = max(tried, key=lambda t: np.nan_to_num(tried[t][0], nan=-1.0))
    return best, tried[best][1], {t: score for t, (score, _) in tried.items()}


def choose_dice_thresholds(maps: Maps, bench: Benchmark):
    """Each method's pixel threshold: the one with the best Dice on the validate slices."""
    return {m: best_dice(getattr(maps, m)[bench.regions], bench.lesions.masks[bench.regions])[1]
            for m in METHODS}


# ----------------------------------------------------------------------------- report

def without_nan(value):
    """nan (a figure without the items it needs, e.g. no lesion in a size bin) as JSON null."""
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_nan(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def print_table(results):
    print(f"{'test':22s} {'pixel AUROC':>11s} {'AUPRC':>6s} {'Dice':>6s} {'slice AUROC':>11s} | "
          + " ".join(f"{b:>8s}" for b in BINS) + "  (slice AUROC / pixel AUPRC)")
    for method in METHODS:
        r = results[method]
        by_bin = {**r["by_size"], **r["by_contrast"]}
        cells = " ".join(f"{by_bin[b]['slice_auroc']:4.2f}/{by_bin[b]['pixel_auprc']:4.2f}".rjust(8)
                         for b in BINS)
        a = r["all"]
        print(f"{METHOD_NAMES[method]:22s} {a['pixel_auroc']:11.3f} {a['pixel_auprc']:6.3f} {a['dice']:6.3f} "
              f"{a['slice_auroc']:11.3f} | {cells}")


def example_rows(lesions: LesionSet, count=5):
    """Lesioned slices from the smallest lesion to the largest, and one untouched slice."""
    lesioned = np.flatnonzero(lesions.lesioned)
    lesioned = lesioned[np.argsort(lesions.diameters[lesioned], kind="stable")]
    rows = [int(lesioned[i]) for i in progress_indices(len(lesioned), count - 1)] if len(lesioned) else []
    untouched = np.flatnonzero(~lesions.lesioned)
    return rows + [int(untouched[len(untouched) // 2])] if len(untouched) else rows


def save_examples(bench: Benchmark, maps: Maps, path):
    lesions, rows = bench.lesions, example_rows(bench.lesions)
    columns = [("slice", lesions.images, "gray", 1.0), ("lesion mask", lesions.masks, "gray", 1.0),
               ("reconstruction error", maps.reconstruction, "magma", None),
               ("code NLL", maps.code_nll, "magma", None), ("healed", maps.healed, "gray", 1.0),
               ("anomaly map (healing)", maps.healing, "magma", None)]
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.2 * len(columns), 2.3 * len(rows)), squeeze=False)
    for c, (title, images, cmap, top) in enumerate(columns):
        top = top or float(np.percentile(images[bench.regions], 99.9)) or 1.0  # one scale per column
        axes[0, c].set_title(title, fontsize=9)
        for r, i in enumerate(rows):
            axes[r, c].imshow(images[i], cmap=cmap, vmin=0, vmax=top, interpolation="nearest")
            axes[r, c].axis("off")
    for r, i in enumerate(rows):
        label = (f"{lesions.diameters[i]:.0f} px, {'bright' if lesions.contrasts[i] > 0 else 'dark'}"
                 if lesions.lesioned[i] else "untouched")
        axes[r, 0].text(2, 2, label, color="yellow", fontsize=7, va="top")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# ----------------------------------------------------------------------------- the run

def run_anomaly(cfg: AnomalyConfig):
    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    vqvae, vq_ckpt, prior, prior_ckpt = load_trained_pair(cfg, device)
    image_size, n_conditions = image_size_of(vq_ckpt), prior_ckpt["model_config"]["n_conditions"]
    root = resolve_data_root(cfg.data)

    started = time.perf_counter()
    val = lesion_benchmark(root, "validate", image_size, cfg.val_slices, cfg.seed, cfg, n_conditions, device)
    print(f"validate: {len(val.slice_idx)} slices, {val.lesions.lesioned.sum()} with a lesion")
    threshold, val_maps, tried = choose_heal_threshold(vqvae, prior, val, cfg, device)
    dice_thresholds = choose_dice_thresholds(val_maps, val)
    val_results = {m: detection_figures(getattr(val_maps, m), val.lesions, val.regions, dice_thresholds[m])
                   for m in METHODS}
    validate_seconds = time.perf_counter() - started
    print(f"chosen on validate: heal codes below probability {threshold:g}; Dice thresholds "
          + ", ".join(f"{METHOD_NAMES[m]} {t:.4g}" for m, t in dice_thresholds.items()))

    # the test split is loaded only now, after every threshold is fixed
    test = lesion_benchmark(root, "test", image_size, cfg.max_slices, cfg.seed + 1, cfg, n_conditions, device)
    started = time.perf_counter()
    maps = anomaly_maps(vqvae, prior, test, threshold, cfg, device)
    test_seconds = time.perf_counter() - started
    results = {m: detection_figures(getattr(maps, m), test.lesions, test.regions, dice_thresholds[m])
               for m in METHODS}

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_examples(test, maps, out_dir / "anomaly.png")
    report = {"split": "test", "data_root": str(root), "image_size": image_size, "vqvae": cfg.vqvae,
              "prior": cfg.prior, "n_slices": len(test.slice_idx), "n_lesioned": int(test.lesions.lesioned.sum()),
              "heal_threshold": threshold, "threshold_search": {str(t): s for t, s in tried.items()},
              "dice_thresholds": dice_thresholds, "healed_share": maps.healed_share,
              "test_maps_seconds": test_seconds, "validate_seconds": validate_seconds,
              "n_validate_slices": len(val.slice_idx), "config": asdict(cfg), "methods": results,
              "validate_methods": val_results}
    write_json(out_dir / "anomaly_metrics.json", without_nan(report))
    print_table(results)
    print(f"{len(test.slice_idx)} test slices ({report['n_lesioned']} with a lesion) at {image_size}x{image_size}; "
          f"{maps.healed_share:.1%} of the brain's codes healed; maps in {test_seconds:.0f}s -> "
          f"{out_dir / 'anomaly_metrics.json'}, {out_dir / 'anomaly.png'}")
    return report


def main(argv=None):
    (cfg,) = parse_configs(__doc__, [AnomalyConfig], argv)

    def work():
        check_flags(cfg)
        return run_anomaly(cfg)
    return run_script(work)


if __name__ == "__main__":
    main()
