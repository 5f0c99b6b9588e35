"""Whether generated slices pass for real: a classifier two-sample test (C2ST) with the
controls that make its verdict count, nearest-neighbour SSIM against the training slices,
and intensity-histogram, brain-area and shape (outline roughness, black holes) figures.

predict.py --realism runs realism_report over its samples and writes the result into
metrics.json; everything here works on image tensors (N, 1, H, W) in [0, 1].
"""
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import jensenshannon
from scipy.stats import wasserstein_distance
from tqdm import tqdm

from brain import DARK_HOLE_LEVEL, dark_holes, outline_roughness
from checkpoint import load_checkpoint
from cli import HelpFormatter, OneLineErrorParser, run_script
from errors import DataError
from files import to_uint8
from metrics import ssim_matrix
from slices import FOREGROUND_THRESHOLD

# ----------------------------------------------------------------------------- the two-sample test
#
# A classifier two-sample test (C2ST; Lopez-Paz & Oquab 2017): a small CNN learns to tell
# generated slices from real ones, and its accuracy on held-out images is the verdict
# (0.5 = indistinguishable). Two traps make such numbers lie, and both are closed here:
# - a subject's 32 slices are near copies, so a classifier scored on slices of subjects
#   it trained on recognises subjects and tells real slices from other real slices
#   (RESULTS.md has the figures). Folds are grouped by subject;
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


# ----------------------------------------------------------------------------- its classifier

C2ST_CHANNELS = (16, 32, 64, 64)


class TwoSampleClassifier(nn.Module):
    """Small and fixed on purpose: accuracies from different runs compare only if the judge
    is the same. BatchNorm because without it, on tests/test_realism.py's synthetic slices
    and budget, the classifier could not tell slices from their blurred copies (RESULTS.md)."""

    def __init__(self, channels=C2ST_CHANNELS):
        super().__init__()
        layers, width = [], 1
        for c in channels:
            layers += [nn.Conv2d(width, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            width = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))[:, 0]


# ----------------------------------------------------------------------------- cross-validation


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
    black holes lie inside it (demo.outline_roughness, demo.dark_holes)."""
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


# ----------------------------------------------------------------------------- realism against training time

def realism_run(out_dir):
    """One predict.py --realism run, as a row: the data, its prior's settings and training
    time (from the prior checkpoint the run names) and its two-sample verdicts."""

    metrics_path = Path(out_dir) / "metrics.json"
    if not metrics_path.is_file():
        raise DataError(f"{metrics_path} not found; run predict.py --realism --out-dir {out_dir} first")
    metrics = json.loads(metrics_path.read_text())
    if not metrics.get("realism"):
        raise DataError(f"{metrics_path} has no realism entry; run predict.py --realism --out-dir {out_dir}")
    prior = load_checkpoint(metrics["prior"], "pixelcnn")
    coarse = metrics["realism"].get("c2st_64")
    return {"run": Path(out_dir).name, "data": metrics["data_root"],
            "prior_minutes": prior["run"]["history"][-1]["seconds"] / 60, "steps": prior["run"]["step"],
            "hidden": prior["model_config"]["hidden"], "batch_size": prior["train_config"]["batch_size"],
            "lr": prior["train_config"]["lr"], "dropout": prior["model_config"]["dropout"],
            "lr_hold": prior["train_config"].get("lr_hold", 0.0),  # checkpoints before --lr-hold decayed at once
            "val_nll_bits": prior["run"]["best"], "c2st": metrics["realism"]["c2st"]["accuracy"],
            "c2st_size": metrics["realism"]["c2st"].get("input_size", C2ST_COARSE_SIZE),
            "c2st_64": coarse["accuracy"] if coarse else None, "valid": metrics["realism"]["c2st_valid"]}


def plot_realism_vs_minutes(rows, path):
    """C2ST against the prior's training minutes, one line per data root and training recipe
    (peak learning rate, dropout, share of the run at the peak): runs of different recipes are
    not points of one curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def recipe(row):
        return row["data"], row["lr"], row["dropout"], row["lr_hold"]

    fig, ax = plt.subplots(figsize=(11, 4.5))
    for data, lr, dropout, hold in sorted({recipe(row) for row in rows}):
        mine = sorted((row for row in rows if recipe(row) == (data, lr, dropout, hold)),
                      key=lambda row: row["prior_minutes"])
        name = f"{Path(data).name}, lr {lr:g}, dropout {dropout:g}, hold {hold:g}"
        line, = ax.plot([r["prior_minutes"] for r in mine], [r["c2st"] for r in mine], "o-",
                        label=f"{name}, at the image size")
        coarse = [r for r in mine if r["c2st_64"] is not None]
        ax.plot([r["prior_minutes"] for r in coarse], [r["c2st_64"] for r in coarse], "s--", color=line.get_color(),
                alpha=0.6, label=f"{name}, at 64 px")
        for r in mine:
            ax.annotate(r["run"], (r["prior_minutes"], r["c2st"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.axhline(0.5, color="gray", lw=0.8, ls=":")
    ax.set(xlabel="prior training minutes", ylabel="C2ST accuracy (0.5 = indistinguishable)", ylim=(0.45, 1.02),
           title="samples against reconstructed real slices")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the plot: it never hides a point
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def realism_table(rows):
    lines = ["| run | data | prior (channels, batch, peak lr, dropout, lr hold) | steps | minutes | "
             "validation NLL (bits/code) | C2ST at the image size | C2ST at 64 px | controls |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in sorted(rows, key=lambda r: (r["data"], r["prior_minutes"])):
        coarse = f"{r['c2st_64']:.3f}" if r["c2st_64"] is not None else "-"
        recipe = f"{r['hidden']}, {r['batch_size']}, {r['lr']:g}, {r['dropout']:g}, {r['lr_hold']:g}"
        lines.append(f"| {r['run']} | {r['data']} | {recipe} | {r['steps']} | "
                     f"{r['prior_minutes']:.1f} | {r['val_nll_bits']:.3f} | {r['c2st']:.3f} ({r['c2st_size']} px) | "
                     f"{coarse} | {'valid' if r['valid'] else 'NOT VALID'} |")
    return "\n".join(lines)


def main(argv=None):
    """python realism.py OUT_DIR [OUT_DIR ...]: C2ST against prior training minutes over
    several predict.py --realism runs, as a table and out/realism_vs_minutes.png."""

    parser = OneLineErrorParser(description=main.__doc__, formatter_class=HelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="OUT_DIR", help="--out-dir of a predict.py --realism run")
    parser.add_argument("--figure", default="out/realism_vs_minutes.png", help="where the plot goes")
    args = parser.parse_args(argv)

    def work():
        rows = [realism_run(run) for run in args.runs]
        plot_realism_vs_minutes(rows, args.figure)
        print(realism_table(rows))
        print(f"-> {args.figure}")
    run_script(work)


if __name__ == "__main__":
    main()
