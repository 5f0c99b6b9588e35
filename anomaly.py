"""Anomaly maps from the prior: on a folder of your own slices, or on a lesion benchmark.

    python anomaly.py --images DIR [--masks DIR]       # your slices: maps, overlays, scores
    python anomaly.py                                  # the benchmark on the demo set
    python anomaly.py --data path/to/keras_png_slices_data --vqvae ... --prior ...

A slice is encoded; the codes the prior finds unlikely (from one pass of the gated PixelCNN,
conditioned on the slice's position) are drawn afresh from the prior ("healing", Pinaya et al.,
Medical Image Analysis 2022); the difference between the slice and its healed versions, where
codes were healed, is the healing map (maps.py). The calibrated NLL is the prior's per-code NLL
at each level in healthy spreads above what healthy validate slices have at the same code cell
and slice position. The anomaly map a user gets, "combined", adds the two, each over its 99th
percentile on healthy slices: healing finds what differs from the prior's redrawing, the
calibrated NLL what is unlikely for its place. Beside them: the plain reconstruction error and
the prior's raw per-code NLL. Healing draws and decodes in bf16 where the device has fast bf16
kernels (--dtype auto); the codes and NLL that choose what is healed stay float32.

Thresholds are set on healthy slices alone by default (--thresholds healthy): validate slices of
--data without lesions; heal the codes rarer than --heal-share of their brain codes, and give
each map the pixel threshold that --fpr of their brain pixels exceed. No mask and no lesion is
read to set them. --thresholds lesions tunes them on validate slices with synthetic lesions
instead (the best pixel AUPRC over --threshold-grid, the best Dice).

--images DIR: every PNG of DIR, read and resized as OASIS slices are; slice positions from OASIS
names, --slice-position, or inferred (the position the prior finds most likely). Mapped a batch
of --batch-size / --n-heal slices at a time (study.py), each batch's outputs written as it is
done: maps/<name>.npy (the combined map), overlays/<name>.png (pixels above its threshold in red),
the rows of anomaly_scores.csv (each map's highest value in the brain); then report.png (the 16
highest-scoring slices: slice, map, overlay, mask), and with --masks (same file names, nonzero =
lesion) pixel AUROC, AUPRC, Dice, best-possible Dice (from a fixed-size sample of the brain
pixels) and slice AUROC.

The benchmark (lesions.py): lesions of six kinds (smooth-edged blobs, sharp-edged rings,
textured blobs; and with the intensities of real tissue: patches of another slice's tissue, dark
lesions at the slice's CSF level, blobs astride the grey/white boundary) drawn inside the brain
of half the test slices (seeded; nothing is written into
the data folders); the test split is loaded only after every
threshold is set. Reported: pixel AUROC, AUPRC, Dice at the thresholds set, Dice at pixel
thresholds tuned on validate lesions, the best-possible Dice, and slice AUROC (lesioned against
untouched slices, each scored by its map's maximum), in all, by lesion size and contrast, and by
kind (every size, and 10 px and more).
Writes out/anomaly_metrics.json and out/anomaly.png.
"""
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import matplotlib
import numpy as np
import torch

from checkpoint import TrainedModels, image_size_of, load_trained_pair
from cli import opt, parse_configs, run_script
from codes import to_unit
from dataset import load_split_tensor, resolve_data_root
from errors import DataError, FlagError
from files import progress_indices, save_figure, write_json
from hardware import peak_memory_gb, pick_device, resolve_dtype, set_seed
from lesions import (CONTRAST_BINS, FROM_10PX, LESION_KINDS, SIZE_BINS, LesionSet, detection_figures,
                     make_lesion_set)
from maps import (METHOD_NAMES, METHODS, Benchmark, Maps, Reference, anomaly_maps, code_regions, encode,
                  healthy_calibration, healthy_reference, slices_to_map)
from metrics import average_precision, best_dice, dice_at
from modules import Priors
from slices import image_files
from study import REPORT_SLICES, Study, check_masks, map_study, named_positions

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

BINS = SIZE_BINS + (FROM_10PX,) + CONTRAST_BINS  # the columns of the printed table


class Detector(NamedTuple):
    """What maps a slice: the VQ-VAE, its priors, the image size its codes are for, the slice
    positions the prior is conditioned on (0: none) and the device."""
    vqvae: torch.nn.Module
    priors: Priors
    image_size: int
    n_conditions: int
    device: torch.device


@dataclass
class AnomalyConfig(TrainedModels):
    data: str = opt("demo", "OASIS root whose validate slices set the thresholds and whose test slices get the "
                            "benchmark's lesions, or 'demo'")
    out_dir: str = opt("out", "where anomaly.png and anomaly_metrics.json go")
    images: str = opt("", "map your own slices instead of the benchmark: a folder of gray PNG slices (read and "
                          "resized as OASIS slices are); writes a map (.npy) and an overlay (.png) per slice and "
                          "anomaly_scores.csv")
    masks: str = opt("", "with --images: a folder of lesion masks with the slices' file names (nonzero = lesion) "
                         "to score the maps against")
    slice_position: int = opt(-1, "with --images: the slice position (0..31) the prior is conditioned on; -1 = "
                                   "from OASIS file names (case_<id>_slice_<k>.nii.png), else the position under "
                                   "which the prior finds the slice most likely")
    thresholds: str = opt("healthy", "where the thresholds come from: healthy = validate slices without lesions "
                                     "alone (--heal-share, --fpr); lesions = tuned on validate slices with synthetic "
                                     "lesions (--threshold, --threshold-grid and the best Dice)",
                          choices=["healthy", "lesions"])
    heal_share: float = opt(0.02, "--thresholds healthy: heal the codes rarer than this share of the healthy "
                                  "validate slices' brain codes", minimum=1e-6, maximum=1.0)
    fpr: float = opt(0.01, "--thresholds healthy: each map's pixel threshold is exceeded by this share of the "
                           "healthy validate slices' brain pixels", minimum=1e-6, maximum=1.0)
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
    lesion_kinds: tuple = opt(LESION_KINDS, "the kinds of lesion the benchmark draws, in turn, each reported on its "
                                            "own: " + ", ".join(LESION_KINDS), choices=LESION_KINDS)
    lesion_contrast: tuple = opt((0.15, 0.5), "smallest and largest intensity change at a lesion's core, as a "
                                              "share of full scale; half the lesions brighten, half darken")
    val_slices: int = opt(64, "validate slices, evenly spread over the split, that the thresholds are set on; "
                              "0 = all", minimum=0)
    max_slices: int = opt(0, "test slices, evenly spread over the split, that are evaluated; 0 = all", minimum=0)
    batch_size: int = opt(1024, "code grids healed at once; with --images, --batch-size / --n-heal slices are "
                                "mapped at a time, which sets the memory a folder of any size takes", minimum=1)
    seed: int = opt(0, "seed of the lesions (validate: this seed, test: the next) and of healing")
    device: str = opt("auto", "cuda, cpu, or auto (cuda when available)")
    dtype: str = opt("auto", "precision of healing (drawing codes and decoding the healed slices; the slices' "
                             "codes and NLL stay float32): auto = bfloat16 where the device has fast bf16 kernels "
                             "(CUDA, CPUs with AVX-512 BF16), float32 elsewhere",
                     choices=["auto", "float32", "bfloat16"])


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
    if cfg.thresholds == "healthy" and cfg.threshold != "auto":
        raise FlagError("--threshold sets the healing threshold of --thresholds lesions; with healthy "
                        "thresholds --heal-share sets it")
    if cfg.masks and not cfg.images:
        raise FlagError("--masks scores the maps of --images; give the slices' folder too")
    if not cfg.threshold_grid or not all(0 < t < 1 for t in cfg.threshold_grid):
        raise FlagError(f"--threshold-grid takes probabilities in (0, 1); got {list(cfg.threshold_grid)}")
    if not cfg.lesion_kinds:
        raise FlagError(f"--lesion-kinds takes one or more of {', '.join(LESION_KINDS)}")
    check_range("lesion-size", cfg.lesion_size)
    check_range("lesion-contrast", cfg.lesion_contrast, upper=1.0)
    if cfg.smooth < 0:
        raise FlagError(f"--smooth must be at least 0; got {cfg.smooth}")
    if cfg.edge_margin < 0:
        raise FlagError(f"--edge-margin must be at least 0; got {cfg.edge_margin}")


# ----------------------------------------------------------------------------- the lesioned slices

def lesion_benchmark(root, split, image_size, count, seed, cfg: AnomalyConfig, n_conditions, device,
                     lesioned_share=0.5):
    """`count` slices of a split (evenly spread; 0 = all) with seeded lesions drawn into
    lesioned_share of them (0: healthy slices, for thresholds that never see a lesion)."""
    images_u8, slices = load_split_tensor(root, split, image_size)
    ids = progress_indices(len(images_u8), count or len(images_u8))
    lesions = make_lesion_set(to_unit(images_u8[ids, 0]).numpy(), seed, cfg.lesion_size, cfg.lesion_contrast,
                              lesioned_share, cfg.lesion_kinds)
    if lesioned_share and not lesions.lesioned.any():
        raise DataError(f"{split}: no lesion fits into its {len(ids)} slices; use more (--val-slices, --max-slices)")
    return slices_to_map(split, lesions, slices.slice_idx[ids], cfg.edge_margin, n_conditions, device,
                         slices.case_ids[ids])


# ----------------------------------------------------------------------------- chosen on validate

def pixel_auprc(maps, bench: Benchmark):
    return average_precision(maps[bench.regions], bench.lesions.masks[bench.regions])


def choose_heal_threshold(vqvae, priors, bench: Benchmark, cfg: AnomalyConfig, device):
    """-> (threshold, its validate maps, {candidate: validate pixel AUPRC} for auto, else {})."""
    fixed = heal_threshold(cfg.threshold)
    encoded = encode(vqvae, priors, bench, device)
    if fixed is not None:
        return fixed, anomaly_maps(vqvae, priors, bench, fixed, cfg, device, encoded), {}
    tried, best, best_maps = {}, None, None
    for candidate in sorted(cfg.threshold_grid):
        maps = anomaly_maps(vqvae, priors, bench, candidate, cfg, device, encoded)
        tried[candidate] = pixel_auprc(maps.healing, bench)
        print(f"  threshold {candidate:g}: {maps.healed_share:.1%} of the brain's codes healed, "
              f"validate pixel AUPRC {tried[candidate]:.3f}")
        if best is None or np.nan_to_num(tried[candidate], nan=-1.0) > np.nan_to_num(tried[best], nan=-1.0):
            best, best_maps = candidate, maps  # only the best candidate's maps are kept
    grid = sorted(cfg.threshold_grid)
    if len(grid) > 1 and best in (grid[0], grid[-1]):
        print(f"warning: the chosen threshold {best:g} is at the edge of --threshold-grid; a value beyond it "
              f"may score better")
    return best, best_maps, tried


def healthy_thresholds(vqvae, priors, healthy: Benchmark, calibration, cfg: AnomalyConfig, device):
    """Thresholds from slices without lesions alone: heal the codes rarer than cfg.heal_share of
    the healthy brain codes, and give each map the pixel threshold that cfg.fpr of the healthy
    brain pixels exceed. -> (heal threshold, {method: pixel threshold}, Reference). Reads no mask."""
    encoded = encode(vqvae, priors, healthy, device)
    brain_codes = code_regions(healthy.regions, encoded.nll.shape[-1])
    nll = encoded.nll.cpu().numpy()[brain_codes]
    threshold = math.exp(-float(np.quantile(nll, 1 - cfg.heal_share)))
    reference, maps = healthy_reference(vqvae, priors, healthy, calibration, threshold, cfg, device, encoded)
    pixel = {m: float(np.quantile(getattr(maps, m)[healthy.regions], 1 - cfg.fpr)) for m in METHODS}
    return threshold, pixel, reference


def choose_dice_thresholds(maps: Maps, bench: Benchmark):
    """Each method's pixel threshold: the one with the best Dice on the validate lesions."""
    return {m: best_dice(getattr(maps, m)[bench.regions], bench.lesions.masks[bench.regions])[1]
            for m in METHODS}


def best_possible_dice(maps: Maps, bench: Benchmark):
    """Each method's best Dice over every threshold on these slices: what no threshold beats."""
    return {m: best_dice(getattr(maps, m)[bench.regions], bench.lesions.masks[bench.regions])[0] for m in METHODS}


# ----------------------------------------------------------------------------- report

def without_nan(value):
    """nan or infinity (a figure without the items it needs, e.g. no lesion in a size bin) as
    JSON null, which strict JSON readers accept."""
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_nan(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def print_table(results):
    print(f"{'test':22s} {'pixel AUROC':>11s} {'AUPRC':>6s} {'Dice':>6s} {'tuned':>6s} {'best':>6s} "
          f"{'slice AUROC':>11s} | " + " ".join(f"{b:>8s}" for b in BINS) + "  (slice AUROC / pixel AUPRC)")
    for method in METHODS:
        r = results[method]
        by_bin = {**r["by_size"], **r["by_contrast"]}
        cells = " ".join(f"{by_bin[b]['slice_auroc']:4.2f}/{by_bin[b]['pixel_auprc']:4.2f}".rjust(8)
                         for b in BINS)
        a = r["all"]
        print(f"{METHOD_NAMES[method]:22s} {a['pixel_auroc']:11.3f} {a['pixel_auprc']:6.3f} {a['dice']:6.3f} "
              f"{a['dice_tuned_on_lesions']:6.3f} {a['best_possible_dice']:6.3f} {a['slice_auroc']:11.3f} | {cells}")
    print("Dice: at the pixel thresholds set; tuned: at those tuned on validate lesions; best: the best any "
          "threshold reaches on these slices")
    for method in METHODS:
        by_kind = results[method].get("by_kind_from_10px", {})
        if len(by_kind) > 1:
            print(f"  {METHOD_NAMES[method]} by lesion kind, 10 px and more (slice AUROC / pixel AUPRC): " + ", ".join(
                f"{kind} {r['slice_auroc']:.2f}/{r['pixel_auprc']:.2f}" for kind, r in by_kind.items()))


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
               ("healing", maps.healing, "magma", None), ("calibrated NLL", maps.calibrated_nll, "magma", None),
               ("anomaly map (combined)", maps.combined, "magma", None)]
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
    cfg = replace(cfg, dtype=resolve_dtype(cfg.dtype, device))
    pair = load_trained_pair(cfg, device)
    models = Detector(pair.vqvae, pair.priors, image_size_of(pair.vqvae_ckpt),
                      pair.prior_ckpt["model_config"]["n_conditions"], device)
    root = resolve_data_root(cfg.data)
    if cfg.images:
        return run_on_images(cfg, root, models)
    return run_benchmark(cfg, root, models)


class Thresholds(NamedTuple):
    heal: float            # heal the codes less likely than this
    pixel: dict            # {method: pixel threshold}
    set_on: str            # what they were set on
    validate: dict | None  # the validate lesions' figures, where they were tuned on them
    seconds: float
    reference: Reference   # the healthy reference of the calibrated and combined maps


def set_thresholds(cfg: AnomalyConfig, root, models: Detector):
    """-> Thresholds: from healthy validate slices (the default), or tuned on validate lesions. The
    calibrated and combined maps' Reference comes from healthy validate slices either way: the NLL
    of every one of them, the scales from --val-slices of them."""
    vqvae, priors, image_size, n_conditions, device = models
    started = time.perf_counter()
    every = lesion_benchmark(root, "validate", image_size, 0, cfg.seed, cfg, n_conditions, device, lesioned_share=0.0)
    calibration = healthy_calibration(vqvae, priors, every, n_conditions, device)
    healthy = lesion_benchmark(root, "validate", image_size, cfg.val_slices, cfg.seed, cfg, n_conditions, device,
                               lesioned_share=0.0)
    if cfg.thresholds == "healthy":
        threshold, pixel, reference = healthy_thresholds(vqvae, priors, healthy, calibration, cfg, device)
        print(f"set on {len(healthy.slice_idx)} healthy validate slices: heal codes below probability "
              f"{threshold:.3g} (the rarest {cfg.heal_share:g} of healthy brain codes); pixel thresholds at "
              f"--fpr {cfg.fpr:g}; NLL calibrated on all {len(every.slice_idx)}")
        return Thresholds(threshold, pixel, "healthy validate slices", None, time.perf_counter() - started,
                          reference)
    val = lesion_benchmark(root, "validate", image_size, cfg.val_slices, cfg.seed, cfg, n_conditions, device)
    print(f"validate: {len(val.slice_idx)} slices, {val.lesions.lesioned.sum()} with a lesion")
    threshold, _, tried = choose_heal_threshold(vqvae, priors, val, cfg, device)
    reference, _ = healthy_reference(vqvae, priors, healthy, calibration, threshold, cfg, device)
    val_maps = anomaly_maps(vqvae, priors, val, threshold, cfg, device, reference=reference)
    pixel = choose_dice_thresholds(val_maps, val)
    figures = {m: detection_figures(getattr(val_maps, m), val.lesions, val.regions, pixel[m]) for m in METHODS}
    return Thresholds(threshold, pixel, "validate lesions", {"methods": figures, "threshold_search": tried},
                      time.perf_counter() - started, reference)


def run_benchmark(cfg: AnomalyConfig, root, models: Detector):
    vqvae, priors, image_size, n_conditions, device = models
    threshold, pixel, set_on, validate, validate_seconds, reference = set_thresholds(cfg, root, models)
    tuned = pixel
    if cfg.thresholds == "healthy":  # beside them, as a reference: pixel thresholds tuned on validate lesions
        val = lesion_benchmark(root, "validate", image_size, cfg.val_slices, cfg.seed, cfg, n_conditions, device)
        tuned = choose_dice_thresholds(anomaly_maps(vqvae, priors, val, threshold, cfg, device, reference=reference),
                                       val)

    # the test split is loaded only now, after every threshold is fixed
    test = lesion_benchmark(root, "test", image_size, cfg.max_slices, cfg.seed + 1, cfg, n_conditions, device)
    started = time.perf_counter()
    maps = anomaly_maps(vqvae, priors, test, threshold, cfg, device, reference=reference)
    test_seconds = time.perf_counter() - started
    best = best_possible_dice(maps, test)
    results = {}
    for m in METHODS:
        results[m] = detection_figures(getattr(maps, m), test.lesions, test.regions, pixel[m])
        results[m]["all"]["best_possible_dice"] = best[m]
        results[m]["all"]["dice_tuned_on_lesions"] = dice_at(getattr(maps, m)[test.regions],
                                                             test.lesions.masks[test.regions], tuned[m])

    out_dir = Path(cfg.out_dir)
    save_examples(test, maps, out_dir / "anomaly.png")
    report = {"split": "test", "data_root": str(root), "image_size": image_size, "vqvae": cfg.vqvae,
              "prior": cfg.prior, "n_slices": len(test.slice_idx), "n_lesioned": int(test.lesions.lesioned.sum()),
              "thresholds_set_on": set_on, "heal_threshold": threshold, "pixel_thresholds": pixel,
              "pixel_thresholds_tuned_on_lesions": tuned, "healed_share": maps.healed_share,
              "test_maps_seconds": test_seconds, "validate_seconds": validate_seconds, "config": asdict(cfg),
              "methods": results, "validate": validate}
    write_json(out_dir / "anomaly_metrics.json", without_nan(report))
    print_table(results)
    print(f"{len(test.slice_idx)} test slices ({report['n_lesioned']} with a lesion) at {image_size}x{image_size}; "
          f"thresholds set on {set_on}; {maps.healed_share:.1%} of the brain's codes healed; maps in "
          f"{test_seconds:.0f}s -> {out_dir / 'anomaly_metrics.json'}, {out_dir / 'anomaly.png'}")
    return report


def run_on_images(cfg: AnomalyConfig, root, models: Detector):
    """Maps of a folder of the user's slices, thresholds set on --data's validate slices; scored
    against --masks where given (the maps never see them). The folder is mapped a batch at a
    time (study.py), so memory does not grow with it."""
    files = image_files(cfg.images)
    if cfg.masks:
        check_masks(files, cfg.masks)
    positions, source = named_positions(files, cfg.slice_position, models.n_conditions)
    threshold, pixel, set_on, _, _, reference = set_thresholds(cfg, root, models)
    print(f"{len(files)} slices from {cfg.images} at {models.image_size}x{models.image_size}; slice positions: "
          f"{source}")
    out_dir = Path(cfg.out_dir)
    started = time.perf_counter()
    study = Study(files, cfg.masks, positions, threshold, pixel, out_dir, reference)
    scores = map_study(study, models, cfg, batch_slices=max(1, cfg.batch_size // cfg.n_heal))
    seconds = time.perf_counter() - started
    report = {"images": cfg.images, "masks": cfg.masks or None, "n_slices": len(files),
              "image_size": models.image_size, "slice_positions_from": source, "thresholds_set_on": set_on,
              "heal_threshold": threshold, "pixel_thresholds": pixel, "maps_seconds": seconds,
              "slices_per_second": len(files) / seconds, "peak_memory_gb": peak_memory_gb(), "vqvae": cfg.vqvae,
              "prior": cfg.prior}
    if scores is not None:
        report["methods"], report["pixels"] = scores.figures()
        for m, r in report["methods"].items():
            print(f"{METHOD_NAMES[m]:22s} pixel AUROC {r['pixel_auroc']:.3f} | AUPRC {r['pixel_auprc']:.3f} | "
                  f"Dice {r['dice']:.3f} (best possible {r['best_possible_dice']:.3f}) | slice AUROC "
                  f"{r['slice_auroc']:.3f}")
    write_json(out_dir / "anomaly_metrics.json", without_nan(report))
    print(f"maps, overlays and scores of {len(files)} slices in {seconds:.0f}s ({len(files) / seconds:.2f} "
          f"slices/s, peak memory {report['peak_memory_gb']:.1f} GB) -> {out_dir / 'maps'}, "
          f"{out_dir / 'overlays'}, {out_dir / 'anomaly_scores.csv'}; the {min(len(files), REPORT_SLICES)} "
          f"highest-scoring slices -> {out_dir / 'report.png'}")
    return report


def main(argv=None):
    (cfg,) = parse_configs(__doc__, [AnomalyConfig], argv)

    def work():
        check_flags(cfg)
        return run_anomaly(cfg)
    return run_script(work)


if __name__ == "__main__":
    main()
