"""Anomaly maps of a whole study, one batch of slices at a time: each batch's maps, overlays and
score rows are written as they are made, and what the study is scored by (running counts, a
fixed-size reservoir of brain pixels, the highest-scoring slices) stays the same size however
many slices the folder holds. anomaly.py --images runs it."""
import heapq
from pathlib import Path
from typing import NamedTuple

import matplotlib
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from codes import encode_all
from errors import DataError
from files import save_figure, to_uint8, write_atomically
from lesions import masks_as_lesions, slice_scores
from maps import METHOD_NAMES, METHODS, Reference, anomaly_maps, slices_to_map
from metrics import auroc, average_precision, best_dice
from prior import most_likely_positions
from slices import parse_slice_name, read_mask, read_slice

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

RESERVOIR_PIXELS = 2_000_000  # brain pixels kept for the pixel figures: about 30 MB, exact below it
REPORT_SLICES = 16            # the highest-scoring slices the report figure shows
WRITTEN = "combined"          # the map written, overlaid and reported for each slice (maps.METHODS)
OVERLAY_RED = np.array([255.0, 0.0, 0.0])


class PixelReservoir:
    """A uniform sample, without replacement, of at most `capacity` of the pixels added so far:
    each pixel draws a random key and the smallest keys stay (bottom-k sampling). Each pixel
    keeps its label and one score per method, so the methods are judged on the same pixels."""

    def __init__(self, capacity, n_methods, seed):
        self.capacity, self.rng, self.seen = capacity, np.random.default_rng(seed), 0
        self.keys = np.empty(0)
        self.scores = np.empty((0, n_methods), np.float32)
        self.labels = np.empty(0, bool)

    def add(self, scores, labels):
        """scores (n, n_methods), labels (n,) of n more pixels."""
        self.seen += len(labels)
        keys = np.concatenate([self.keys, self.rng.random(len(labels))])
        scores, labels = np.concatenate([self.scores, scores]), np.concatenate([self.labels, labels])
        if len(keys) > self.capacity:
            keep = np.argpartition(keys, self.capacity)[:self.capacity]
            keys, scores, labels = keys[keep], scores[keep], labels[keep]
        self.keys, self.scores, self.labels = keys, scores, labels


class StudyScores:
    """How well each method's maps find the masked lesions of a study, added a batch at a time:
    Dice at the pixel thresholds from exact running counts, slice AUROC from every slice's score,
    pixel AUROC, AUPRC and the best-possible Dice from the reservoir (exact while the study's
    brain pixels fit in it)."""

    def __init__(self, pixel_thresholds, seed, capacity=RESERVOIR_PIXELS):
        self.thresholds = pixel_thresholds
        self.reservoir = PixelReservoir(capacity, len(METHODS), seed)
        self.counts = {m: np.zeros(3, np.int64) for m in METHODS}  # true positives, called, lesion pixels
        self.slice_scores = {m: [] for m in METHODS}
        self.lesioned = []

    def add(self, maps, masks, regions):
        """One batch: maps {method: (n, H, W)}, masks and regions bool (n, H, W)."""
        labels = masks[regions]
        in_brain = {m: maps[m][regions] for m in METHODS}
        self.reservoir.add(np.stack([in_brain[m] for m in METHODS], axis=1), labels)
        for m in METHODS:
            called = in_brain[m] >= self.thresholds[m]
            self.counts[m] += [int((called & labels).sum()), int(called.sum()), int(labels.sum())]
            self.slice_scores[m].extend(slice_scores(maps[m], regions))
        self.lesioned.extend(masks.reshape(len(masks), -1).any(axis=1))

    def figures(self):
        """{method: pixel_auroc, pixel_auprc, dice, best_possible_dice, slice_auroc} and how many
        pixels the pixel figures rest on."""
        sample, labels = self.reservoir.scores, self.reservoir.labels
        result = {}
        for k, m in enumerate(METHODS):
            true_positives, called, lesion = self.counts[m]
            total = called + lesion
            result[m] = {"pixel_auroc": auroc(sample[:, k], labels),
                         "pixel_auprc": average_precision(sample[:, k], labels),
                         "dice": float(2 * true_positives / total) if total else float("nan"),
                         "best_possible_dice": best_dice(sample[:, k], labels)[0],
                         "slice_auroc": auroc(np.array(self.slice_scores[m]), np.array(self.lesioned, bool))}
        return result, {"brain_pixels": int(self.reservoir.seen), "pixels_sampled": len(labels)}


class Reported(NamedTuple):
    score: float
    name: str
    image: np.ndarray
    anomaly_map: np.ndarray
    mask: np.ndarray | None


class TopSlices:
    """The `count` highest-scoring slices seen so far, with what the report figure draws of them."""

    def __init__(self, count=REPORT_SLICES):
        self.count, self.heap, self.added = count, [], 0

    def add(self, score, name, image, anomaly_map, mask):
        item = (score, -self.added, Reported(score, name, image.copy(), anomaly_map.copy(),
                                             None if mask is None else mask.copy()))
        self.added += 1  # ties keep the earlier slice
        if len(self.heap) < self.count:
            heapq.heappush(self.heap, item)
        elif item[:2] > self.heap[0][:2]:
            heapq.heapreplace(self.heap, item)

    def highest_first(self):
        return [item[2] for item in sorted(self.heap, key=lambda item: item[:2], reverse=True)]


def overlay(image, anomaly_map, threshold):
    """The slice in gray, RGB uint8, with the pixels whose map exceeds the threshold tinted red."""
    rgb = np.repeat(to_uint8(image)[..., None], 3, axis=-1).astype(np.float32)
    above = anomaly_map > threshold
    rgb[above] = 0.45 * rgb[above] + 0.55 * OVERLAY_RED
    return rgb.round().astype(np.uint8)


def save_overlay(path, image, anomaly_map, threshold):
    picture = Image.fromarray(overlay(image, anomaly_map, threshold), mode="RGB")
    write_atomically(path, lambda f: picture.save(f, format="PNG"))


def save_report(reported, threshold, path):
    """One row per slice, highest score first: the slice, its map, the overlay at the threshold
    and, where masks were given, the mask."""
    with_masks = any(r.mask is not None for r in reported)
    titles = ["slice", f"anomaly map ({METHOD_NAMES[WRITTEN]})", "overlay"] + (["mask"] if with_masks else [])
    top = max([float(np.percentile(r.anomaly_map, 99.9)) for r in reported] + [threshold, 1e-12])
    fig, axes = plt.subplots(len(reported), len(titles), figsize=(2.2 * len(titles), 2.3 * len(reported)),
                             squeeze=False)
    for c, title in enumerate(titles):
        axes[0, c].set_title(title, fontsize=9)
    for row, r in zip(axes, reported):
        row[0].imshow(r.image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        row[1].imshow(r.anomaly_map, cmap="magma", vmin=0, vmax=top, interpolation="nearest")
        row[2].imshow(overlay(r.image, r.anomaly_map, threshold), interpolation="nearest")
        if with_masks:
            row[3].imshow(r.mask if r.mask is not None else np.zeros_like(r.image), cmap="gray", vmin=0, vmax=1,
                          interpolation="nearest")
        row[0].text(2, 2, f"{r.name}\nscore {r.score:.3g}", color="yellow", fontsize=7, va="top")
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=72)
    plt.close(fig)


def named_positions(files, slice_position, n_conditions):
    """Each slice's position for the prior where it is known before mapping -> (positions or None
    to infer them from each slice's codes, where they come from)."""
    if not n_conditions:
        return np.zeros(len(files), dtype=np.int64), "none (the prior is not conditioned)"
    if slice_position >= 0:
        return np.full(len(files), slice_position), "--slice-position"
    try:
        return np.array([parse_slice_name(f.name)[1] for f in files]), "the OASIS file names"
    except DataError:
        return None, "inferred: the position the prior finds most likely"


def check_masks(files, masks_dir):
    """A one-line error before any work where a slice has no mask."""
    for f in files:
        if not (Path(masks_dir) / f.name).is_file():
            raise DataError(f"{Path(masks_dir) / f.name}: no mask for {f.name} in the --masks folder")


class Study(NamedTuple):
    """What mapping a folder needs besides the models: its slices, their masks' folder (or ''),
    the slices' positions (None: inferred), the thresholds, and where the outputs go."""
    files: list
    masks_dir: str
    positions: np.ndarray | None
    heal_threshold: float
    pixel_thresholds: dict
    out_dir: Path
    reference: Reference  # from healthy slices, for the calibrated and combined maps


def map_study(study: Study, models, cfg, batch_slices):
    """Map every slice of the study, batch_slices at a time; writes maps/<name>.npy,
    overlays/<name>.png and the rows of anomaly_scores.csv as each batch is done (an
    interrupted run keeps them) and report.png at the end. -> (StudyScores or None without
    masks)."""
    out_dir = study.out_dir
    scores = StudyScores(study.pixel_thresholds, cfg.seed) if study.masks_dir else None
    top = TopSlices()
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "anomaly_scores.csv", "w") as csv, \
            tqdm(total=len(study.files), desc="mapping slices", unit="slice") as bar:
        csv.write(score_header(bool(study.masks_dir)) + "\n")
        for start in range(0, len(study.files), batch_slices):
            files = study.files[start:start + batch_slices]
            bench, maps = map_batch(study, files, start, models, cfg)
            rows = write_batch(study, files, bench, maps, top)
            if scores is not None:
                scores.add({m: getattr(maps, m) for m in METHODS}, bench.lesions.masks, bench.regions)
            csv.write("\n".join(rows) + "\n")
            csv.flush()
            bar.update(len(files))
    save_report(top.highest_first(), study.pixel_thresholds[WRITTEN], out_dir / "report.png")
    return scores


def map_batch(study: Study, files, start, models, cfg):
    """Read one batch of the study's slices (and masks) and map them -> (Benchmark, Maps)."""
    vqvae, priors, image_size, n_conditions, device = models
    images = np.stack([read_slice(f, image_size) for f in files]).astype(np.float32) / 255
    masks = (np.stack([read_mask(study.masks_dir, f, image_size) for f in files]) if study.masks_dir
             else np.zeros(images.shape, dtype=bool))
    positions = (study.positions[start:start + len(files)] if study.positions is not None
                 else inferred_positions(vqvae, priors, images, n_conditions, device))
    bench = slices_to_map("images", masks_as_lesions(images, masks), positions, cfg.edge_margin, n_conditions,
                          device)
    return bench, anomaly_maps(vqvae, priors, bench, study.heal_threshold, cfg, device, reference=study.reference)


def score_header(with_masks):
    return ("file,slice_position," + ",".join(f"{m}_score" for m in METHODS) + f",{WRITTEN}_pixels_above_threshold"
            + (",mask_pixels" if with_masks else ""))


def write_batch(study: Study, files, bench, maps, top: TopSlices):
    """Each slice's map and overlay, its entry in `top` -> its rows of anomaly_scores.csv."""
    threshold, with_masks, rows = study.pixel_thresholds[WRITTEN], bool(study.masks_dir), []
    per_slice = {m: slice_scores(getattr(maps, m), bench.regions) for m in METHODS}
    for i, path in enumerate(files):
        image, written, mask = bench.lesions.images[i], getattr(maps, WRITTEN)[i], bench.lesions.masks[i]
        write_atomically(study.out_dir / "maps" / f"{path.stem}.npy",
                         lambda f, a=written: np.save(f, a.astype(np.float32)))
        save_overlay(study.out_dir / "overlays" / path.name, image, written, threshold)
        scores = [float(per_slice[m][i]) for m in METHODS]
        top.add(scores[METHODS.index(WRITTEN)], path.name, image, written, mask if with_masks else None)
        rows.append(f"{path.name},{bench.slice_idx[i]}," + ",".join(f"{s:.6g}" for s in scores)
                    + f",{int((written > threshold).sum())}" + (f",{int(mask.sum())}" if with_masks else ""))
    return rows


@torch.no_grad()
def inferred_positions(vqvae, priors, images, n_conditions, device):
    codes = encode_all(vqvae, torch.from_numpy(np.rint(images * 255).astype(np.uint8))[:, None].to(device))
    return most_likely_positions(priors.coarse, codes, n_conditions)
