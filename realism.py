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
from scipy.spatial.distance import jensenshannon
from scipy.stats import wasserstein_distance

from brain import DARK_HOLE_LEVEL, dark_holes, outline_roughness
from c2st import (BLURRED_MIN_ACCURACY, C2ST_COARSE_SIZE, REAL_VS_REAL_RANGE, blur_sigma, blurred_vs_real_control,
                  classifier_two_sample_test, controls_pass, random_subset, real_vs_real_control)
from checkpoint import load_checkpoint
from cli import HelpFormatter, OneLineErrorParser, run_script
from errors import DataError
from files import save_figure, to_uint8
from metrics import ssim_matrix
from slices import FOREGROUND_THRESHOLD

HISTOGRAM_BINS = 64


def nearest_neighbour_ssim(queries, references, device="cpu"):
    """Each query's highest SSIM against any reference: (Q,) numpy. 1.0 = an exact copy."""
    return ssim_matrix(queries, references, device=device).max(axis=1)


def intensity_histogram(images, bins=HISTOGRAM_BINS):
    counts, _ = np.histogram(torch.as_tensor(images).float().clamp(0, 1).cpu().numpy(),
                             bins=bins, range=(0.0, 1.0))
    return counts / counts.sum()


def brain_area_fractions(images):
    """Fraction of each image above slices.FOREGROUND_THRESHOLD: (N,) numpy."""
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


def judged_c2st(samples, reference, reference_ids, *, controls_on, input_size, seed, sample_ids=None,
                controls=None, **c2st_args):
    """The C2ST of samples against reference images (reference_ids: their subjects) at one input
    size, with both controls run by the same classifier and budget on controls_on = (name,
    images, subjects), and whether the controls pass. sample_ids: the samples' subjects, where
    they come from real slices (None: independent draws); controls: the "controls" entry of an
    earlier result of the same control images, size, count and seed, to reuse."""
    c2st = classifier_two_sample_test(samples, reference, sample_ids, reference_ids, seed=seed,
                                      input_size=input_size, **c2st_args)
    if controls is None:
        n = c2st["n_per_class"]
        control_name, control_images, control_ids = controls_on
        real_vs_real = real_vs_real_control(control_images, control_ids, n, seed=seed, input_size=input_size,
                                            **c2st_args)
        blurred = blurred_vs_real_control(control_images, control_ids, n, sigma=blur_sigma(samples.shape[-1]),
                                          seed=seed, input_size=input_size, **c2st_args)
        controls = {"real_vs_real": real_vs_real, "blurred_vs_real": blurred, "images": control_name,
                    "real_vs_real_range": list(REAL_VS_REAL_RANGE), "blurred_min_accuracy": BLURRED_MIN_ACCURACY}
    passed = controls_pass(controls["real_vs_real"]["accuracy"], controls["blurred_vs_real"]["accuracy"])
    return {**c2st, "input_size": int(input_size), "valid": passed, "controls": controls}


def level_sizes(image_size, finest=None):
    """The input sizes the decomposition judges at: the model's full size and half of it, at
    least the coarse view (C2ST_COARSE_SIZE); `finest` caps them."""
    top = min(image_size, finest or image_size)
    return sorted({top, max(C2ST_COARSE_SIZE, top // 2)}, reverse=True)


def by_level(samples, reconstructions, reconstruction_ids, detail_only=None, *, sizes, seed, **c2st_args):
    """What each prior adds, one C2ST with both controls per input size in `sizes`:
    - `priors`: samples against VQ-VAE reconstructions of real held-out slices (subjects
      reconstruction_ids): the same decoder on both sides, so the priors alone are judged;
    - with a detail prior, `detail_prior`: the real coarse codes of those same slices under fine
      codes drawn by the detail prior (detail_only), against their reconstructions: what the
      detail prior adds;
    - `coarse_prior`: samples against detail_only: what drawing the coarse codes adds.
    Each is {str(size): judged C2ST}."""
    reconstructed = ("VQ-VAE reconstructions of held-out slices", reconstructions, reconstruction_ids)
    with_detail = ("held-out slices' coarse codes under drawn fine codes", detail_only, reconstruction_ids)
    result = {"priors": {}, "detail_prior": {} if detail_only is not None else None,
              "coarse_prior": {} if detail_only is not None else None}
    for size in sizes:
        priors = judged_c2st(samples, reconstructions, reconstruction_ids, controls_on=reconstructed, input_size=size,
                             seed=seed, **c2st_args)
        result["priors"][str(size)] = {**priors, "sides": {"a": "generated", "b": reconstructed[0]}}
        if detail_only is None:
            continue
        detail = judged_c2st(detail_only, reconstructions, reconstruction_ids, controls_on=reconstructed,
                             input_size=size, seed=seed, sample_ids=reconstruction_ids,
                             controls=priors["controls"], **c2st_args)
        result["detail_prior"][str(size)] = {**detail, "sides": {"a": with_detail[0], "b": reconstructed[0]}}
        coarse = judged_c2st(samples, detail_only, reconstruction_ids, controls_on=with_detail, input_size=size,
                             seed=seed, **c2st_args)
        result["coarse_prior"][str(size)] = {**coarse, "sides": {"a": "generated", "b": with_detail[0]}}
    return result


def coarse_view(judged, samples, reference, reference_ids, *, controls_on, seed, **c2st_args):
    """The C2ST `judged` again at the coarse 64 px view, where the finest texture no longer shows, so
    anatomy and texture are judged apart; None where `judged` is no finer."""
    if judged["input_size"] <= C2ST_COARSE_SIZE:
        return None
    coarse = judged_c2st(samples, reference, reference_ids, controls_on=controls_on, input_size=C2ST_COARSE_SIZE,
                         seed=seed, **c2st_args)
    return {**coarse, "sides": judged["sides"]}


def as_uint8(images):
    """(N, 1, H, W) in [0, 1] -> (N, H, W) uint8, as the images are saved."""
    return to_uint8(torch.as_tensor(images).float().squeeze(1).cpu().numpy())


def shape_figures(images_by_name):
    """What a person sees at a glance, per image: how ragged the head's outline is and how many
    black holes lie inside it (brain.outline_roughness, brain.dark_holes)."""
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


def decoder_ceiling(reconstructions, reconstruction_ids, held_out, n, judged, *, seed, **c2st_args):
    """The same C2ST against real held-out slices, with reconstructions of held-out slices in
    place of samples (n of them, the samples' count, so the classifier sees as many of each).
    No prior is involved: samples drawn through this decoder cannot pass for real slices more
    than its reconstructions do. judged: the headline's result, whose controls (same classifier,
    budget, input size and n) stand for this test too."""
    keep = random_subset(len(reconstructions), n, np.random.default_rng(seed))
    real, real_ids = held_out
    result = classifier_two_sample_test(reconstructions[keep], real, np.asarray(reconstruction_ids)[keep], real_ids,
                                        seed=seed, input_size=judged["input_size"], **c2st_args)
    return {**result, "input_size": judged["input_size"], "valid": judged["valid"], "controls": judged["controls"],
            "sides": {"a": "VQ-VAE reconstructions of test slices", "b": judged["sides"]["b"]}}


def realism_report(samples, train_images, train_recon, train_case_ids, test_images, test_recon, *,
                   held_out=None, test_case_ids=None, levels=None, n_folds=5, epochs=20, lr=1e-3, batch_size=32,
                   nn_train=0, seed=0, device="cpu", input_size=0):
    """Every realism figure for `samples` (all image tensors (N, 1, H, W) in [0, 1]).

    The headline, `c2st_real`: samples against real held-out slices (held_out = (images,
    subjects), the validate and test splits), controls on the real train slices; it judges
    what a user sees, the decoder's blur included. With test_case_ids (test_recon's subjects),
    `c2st_decoder` is its ceiling: reconstructions in place of samples; `c2st_real_64` is the headline
    at the coarse 64 px view, which the finest texture does not reach. Beside them, `c2st` (and `c2st_64`, the coarse
    64 px view) judge samples against VQ-VAE reconstructions of the train split, so the
    decoder is the same on both sides and only the prior is judged. levels = (reconstructions of
    held-out slices, their subjects, the same slices' coarse codes under drawn fine codes or None)
    adds `by_level` (see by_level), at the full size and half of it. input_size: the side the
    classifier sees (0 = the images' own). Nearest-neighbour SSIM and the distribution distances
    compare against the real train slices."""
    started = time.time()
    train_case_ids = np.asarray(train_case_ids)
    if len(np.unique(train_case_ids)) < 2 * n_folds:
        raise DataError(f"--realism needs at least {2 * n_folds} training subjects for {n_folds} "
                        f"folds on each half of the real-vs-real control; found "
                        f"{len(np.unique(train_case_ids))}")
    c2st_args = {"n_folds": n_folds, "epochs": epochs, "lr": lr, "batch_size": batch_size, "device": device}
    size = min(input_size or samples.shape[-1], samples.shape[-1])
    reconstructed = ("VQ-VAE reconstructions of train slices", train_recon, train_case_ids)
    c2st_real = c2st_decoder = coarse_real = None
    if held_out is not None:
        real_train = ("real train slices", train_images, train_case_ids)
        c2st_real = judged_c2st(samples, *held_out, controls_on=real_train, input_size=size, seed=seed, **c2st_args)
        c2st_real["sides"] = {"a": "generated", "b": "real held-out slices (validate and test)"}
        coarse_real = coarse_view(c2st_real, samples, *held_out, controls_on=real_train, seed=seed, **c2st_args)
        if test_case_ids is not None:
            c2st_decoder = decoder_ceiling(test_recon, test_case_ids, held_out, c2st_real["n_per_class"], c2st_real,
                                           seed=seed, **c2st_args)
    c2st = judged_c2st(samples, train_recon, train_case_ids, controls_on=reconstructed, input_size=size, seed=seed,
                       **c2st_args)
    c2st["sides"] = {"a": "generated", "b": reconstructed[0]}
    coarse = coarse_view(c2st, samples, train_recon, train_case_ids, controls_on=reconstructed, seed=seed,
                         **c2st_args)
    decomposed = None
    if levels is not None:
        held_recon, held_ids, detail_only = levels
        if len(np.unique(held_ids)) >= 2 * n_folds:
            decomposed = by_level(samples, held_recon, held_ids, detail_only,
                                  sizes=level_sizes(samples.shape[-1], size), seed=seed, **c2st_args)
        else:  # its controls split the held-out subjects in two halves of n_folds folds each
            decomposed = {"skipped": f"the decomposition by level needs at least {2 * n_folds} held-out subjects "
                                     f"for {n_folds} folds; found {len(np.unique(held_ids))}"}
            print(f"note: {decomposed['skipped']}")
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
        "c2st_real": c2st_real,
        "c2st_real_64": coarse_real,
        "c2st_decoder": c2st_decoder,
        "c2st": c2st,
        "c2st_valid": c2st["valid"],
        "controls_pass": c2st["valid"],
        "controls": c2st["controls"],
        "c2st_64": coarse,
        "by_level": decomposed,
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


SIDE_NAMES = {"VQ-VAE reconstructions of test slices": "reconstructions (the decoder's ceiling)",
              "held-out slices' coarse codes under drawn fine codes": "real coarse codes, drawn fine codes"}


def _c2st_line(c2st):
    controls = c2st["controls"]
    verdict = "valid" if c2st["valid"] else "NOT VALID (controls failed)"
    return (f"C2ST at {c2st['input_size']} px, {SIDE_NAMES.get(c2st['sides']['a'], c2st['sides']['a'])} vs "
            f"{c2st['sides']['b']}: {c2st['accuracy']:.3f} "
            f"(0.5 = indistinguishable; folds {', '.join(f'{a:.2f}' for a in c2st['fold_accuracies'])}) | "
            f"controls: real vs real {controls['real_vs_real']['accuracy']:.3f}, blurred vs real "
            f"{controls['blurred_vs_real']['accuracy']:.3f} -> {verdict}")


def print_realism(report):
    for c2st in (report.get("c2st_real"), report.get("c2st_real_64"), report.get("c2st_decoder"), report["c2st"],
                 report["c2st_64"]):
        if c2st is not None:
            print(_c2st_line(c2st))
    for name, what in (("priors", "the priors"), ("detail_prior", "the detail prior"),
                       ("coarse_prior", "the coarse prior")):
        for c2st in ((report.get("by_level") or {}).get(name) or {}).values():  # none where it was skipped
            print(f"what {what} add(s): " + _c2st_line(c2st))
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
    realism = metrics["realism"]
    coarse, headline = realism.get("c2st_real_64"), realism.get("c2st_real")
    priors = (realism.get("by_level") or {}).get("priors") or {}  # none where it was skipped
    priors_full = priors[max(priors, key=int)] if priors else None
    return {"run": Path(out_dir).name, "data": metrics["data_root"],
            "prior_minutes": prior["run"]["history"][-1]["seconds"] / 60, "steps": prior["run"]["step"],
            "hidden": prior["model_config"]["hidden"], "batch_size": prior["train_config"]["batch_size"],
            "lr": prior["train_config"]["lr"], "dropout": prior["model_config"]["dropout"],
            "lr_hold": prior["train_config"].get("lr_hold", 0.0),  # checkpoints before --lr-hold decayed at once
            "val_nll_bits": prior["run"]["best"],
            # the headline: samples against real held-out slices (runs before it: none)
            "c2st_real": headline["accuracy"] if headline else None,
            "c2st_real_valid": headline["valid"] if headline else None,
            "c2st_64": coarse["accuracy"] if coarse else None,
            # the priors alone: samples against reconstructions (of held-out slices where measured)
            "c2st": priors_full["accuracy"] if priors_full else realism["c2st"]["accuracy"],
            "c2st_size": (priors_full or realism["c2st"]).get("input_size", C2ST_COARSE_SIZE),
            "valid": priors_full["valid"] if priors_full else realism["c2st_valid"]}


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
        headline = [r for r in mine if r["c2st_real"] is not None]
        line, = ax.plot([r["prior_minutes"] for r in headline], [r["c2st_real"] for r in headline], "D-",
                        label=f"{name}: against real held-out slices, at the image size")
        ax.plot([r["prior_minutes"] for r in mine], [r["c2st"] for r in mine], "o:", color=line.get_color(),
                label=f"{name}: against reconstructions (the priors alone), at the image size")
        coarse = [r for r in mine if r["c2st_64"] is not None]
        ax.plot([r["prior_minutes"] for r in coarse], [r["c2st_64"] for r in coarse], "s--", color=line.get_color(),
                alpha=0.6, label=f"{name}: against real held-out slices, at 64 px")
        for r in mine:
            ax.annotate(r["run"], (r["prior_minutes"], r["c2st"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.axhline(0.5, color="gray", lw=0.8, ls=":")
    ax.set(xlabel="prior training minutes", ylabel="C2ST accuracy (0.5 = indistinguishable)", ylim=(0.45, 1.02),
           title="samples against real held-out slices, and against reconstructions")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the plot: it never hides a point
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def realism_table(rows):
    lines = ["| run | data | prior (channels, batch, peak lr, dropout, lr hold) | steps | minutes | "
             "validation NLL (bits/code) | C2ST vs real held-out | C2ST vs reconstructions | at 64 px | controls |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in sorted(rows, key=lambda r: (r["data"], r["prior_minutes"])):
        coarse = f"{r['c2st_64']:.3f}" if r["c2st_64"] is not None else "-"
        headline = f"{r['c2st_real']:.3f}" if r["c2st_real"] is not None else "-"
        recipe = f"{r['hidden']}, {r['batch_size']}, {r['lr']:g}, {r['dropout']:g}, {r['lr_hold']:g}"
        lines.append(f"| {r['run']} | {r['data']} | {recipe} | {r['steps']} | "
                     f"{r['prior_minutes']:.1f} | {r['val_nll_bits']:.3f} | {headline} | "
                     f"{r['c2st']:.3f} ({r['c2st_size']} px) | {coarse} | {'valid' if r['valid'] else 'NOT VALID'} |")
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
