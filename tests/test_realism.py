"""The realism metrics (realism.py) that predict.py --realism reports: a C2ST (c2st.py) that cannot be fooled by
near-copy slices, its controls, nearest-neighbour SSIM and distribution distances, on small synthetic sets."""
import json

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity

import c2st
import pixelcnn
import predict
import realism
from checkpoint import RunState, checkpoint_payload, save_checkpoint
from errors import DataError
from metrics import ssim_matrix
from modules import PixelCNNConfig, build_prior
from training import WarmupCosine

# Enough for the classifier to see a blur or to recognise subjects, in seconds on a CPU.
TINY_BUDGET = {"n_folds": 4, "epochs": 10, "lr": 1e-3, "batch_size": 16}


def blob_subjects(n_subjects, n_slices, size, seed=0):
    """'Subjects' whose slices are near copies: one smooth random pattern, brightness and
    contrast inside a disc per subject; per slice only the radius jitters and noise differs.
    -> images (N, 1, size, size) float32 in [0, 1], case ids (N,)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    images, case_ids = [], []
    for subject in range(n_subjects):
        pattern = gaussian_filter(rng.normal(size=(size, size)), size / 8)
        pattern = (pattern - pattern.mean()) / pattern.std()
        radius, level, contrast = rng.uniform(0.25, 0.45), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.4)
        for _ in range(n_slices):
            head = xx ** 2 + yy ** 2 < (radius + rng.normal(0, 0.01)) ** 2
            image = level + contrast * pattern + rng.normal(0, 0.03, (size, size))
            images.append(np.clip(np.where(head, image, 0), 0, 1))
            case_ids.append(f"{subject:03d}")
    return torch.tensor(np.array(images), dtype=torch.float32)[:, None], np.array(case_ids)


@pytest.fixture(scope="module")
def subjects():
    return blob_subjects(n_subjects=24, n_slices=8, size=64)


class FoldSpy:
    """Stands in for c2st.train_and_score and records what each fold trains and scores on."""

    def __init__(self, accuracy=0.5):
        self.accuracy, self.folds = accuracy, []

    def __call__(self, train_x, train_y, test_x, test_y, **budget):
        self.folds.append((train_x.clone(), train_y.clone(), test_x.clone(), test_y.clone()))
        return self.accuracy


def owner_lookup(*named_images):
    """Image bytes -> owner name, to tell which subject each image a fold saw came from."""
    lookup = {}
    for images, names in named_images:
        for image, name in zip(images.float(), names):
            lookup[image.numpy().tobytes()] = name
    return lambda batch: [lookup[image.numpy().tobytes()] for image in batch.float()]


def assert_no_subject_on_both_sides(spy, owner_of, n_items):
    seen_in_test = []
    for train_x, train_y, test_x, test_y in spy.folds:
        train_owners = {o for o in owner_of(train_x) if not o.startswith("generated")}
        test_owners = {o for o in owner_of(test_x) if not o.startswith("generated")}
        assert train_owners and test_owners
        assert not train_owners & test_owners, f"subjects on both sides: {train_owners & test_owners}"
        assert set(test_y.tolist()) == {0.0, 1.0}  # both classes scored in every fold
        seen_in_test += owner_of(test_x)
    assert len(seen_in_test) == n_items  # every image scored exactly once


# ----------------------------------------------------------------------------- splitting

def test_group_k_fold_keeps_every_subject_in_one_fold_and_folds_near_equal():
    rng = np.random.default_rng(3)
    case_ids = np.repeat([f"{i:03d}" for i in range(23)], rng.integers(4, 12, size=23))
    folds = c2st.group_k_fold(case_ids, 5, seed=7)
    for case in np.unique(case_ids):
        assert len(np.unique(folds[case_ids == case])) == 1
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 11  # at most one subject's worth apart
    assert not np.array_equal(folds, c2st.group_k_fold(case_ids, 5, seed=8))


def test_c2st_splitter_never_puts_a_case_id_on_both_sides_of_a_fold():
    rng = np.random.default_rng(0)
    case_ids = np.repeat([f"{i:03d}" for i in range(17)], rng.integers(3, 33, size=17))
    for seed in range(5):
        folds_real, folds_generated = c2st.two_sample_folds(case_ids, 90, 5, seed)
        folds = np.concatenate([folds_real, folds_generated])
        labels = np.r_[np.zeros(len(case_ids)), np.ones(90)]
        splits = c2st.fold_splits(folds)
        assert len(splits) == 5
        for train, test in splits:
            real_train = set(case_ids[train[train < len(case_ids)]])
            real_test = set(case_ids[test[test < len(case_ids)]])
            assert real_test and not real_train & real_test
            assert set(labels[test]) == {0, 1}
        assert sorted(np.concatenate([test for _, test in splits])) == list(range(len(folds)))
        # generated draws are spread evenly over the folds
        assert np.ptp(np.bincount(folds_generated)) <= 1


def test_c2st_trains_and_scores_each_fold_on_disjoint_subjects(subjects, monkeypatch):
    images, case_ids = subjects
    generated = torch.rand(100, 1, 64, 64)
    spy = FoldSpy()
    monkeypatch.setattr(c2st, "train_and_score", spy)
    result = c2st.classifier_two_sample_test(generated, images, None, case_ids, **TINY_BUDGET)
    owner_of = owner_lookup((generated, [f"generated{i}" for i in range(100)]), (images, case_ids))
    assert len(spy.folds) == TINY_BUDGET["n_folds"]
    assert_no_subject_on_both_sides(spy, owner_of, n_items=200)
    assert result["n_per_class"] == 100 and result["n_subjects"]["a"] is None
    real_scored = {o for f in spy.folds for o in owner_of(f[2])} - set(owner_of(generated))
    assert result["n_subjects"]["b"] == len(real_scored)


def test_real_vs_real_control_splits_subjects_into_halves_and_folds_by_subject(subjects, monkeypatch):
    images, case_ids = subjects
    spy = FoldSpy()
    monkeypatch.setattr(c2st, "train_and_score", spy)
    c2st.real_vs_real_control(images, case_ids, 96, **TINY_BUDGET)
    owner_of = owner_lookup((images, case_ids))
    assert_no_subject_on_both_sides(spy, owner_of, n_items=192)
    halves = {0.0: set(), 1.0: set()}
    for train_x, train_y, test_x, test_y in spy.folds:
        owners, labels = owner_of(torch.cat([train_x, test_x])), torch.cat([train_y, test_y]).tolist()
        for owner, label in zip(owners, labels):
            halves[label].add(owner)
    assert len(halves[0.0]) == len(halves[1.0]) == 12 and not halves[0.0] & halves[1.0]


def test_blurred_control_keeps_a_slice_and_its_blurred_copy_in_one_fold(subjects, monkeypatch):
    images, case_ids = subjects
    spy = FoldSpy()
    monkeypatch.setattr(c2st, "train_and_score", spy)
    sigma = c2st.blur_sigma(64)
    c2st.blurred_vs_real_control(images, case_ids, 10 ** 6, sigma=sigma, **TINY_BUDGET)
    owner_of = owner_lookup((images, case_ids), (c2st.gaussian_blur(images, sigma), case_ids))
    assert_no_subject_on_both_sides(spy, owner_of, n_items=2 * len(images))


# ----------------------------------------------------------------------------- the classifier

def test_real_vs_real_control_scores_near_chance(subjects):
    images, case_ids = subjects
    result = c2st.real_vs_real_control(images, case_ids, 10 ** 6, **TINY_BUDGET)
    low, high = c2st.REAL_VS_REAL_RANGE
    assert low <= result["accuracy"] <= high, result["fold_accuracies"]


def test_the_same_halves_split_by_slice_instead_of_subject_are_told_apart(subjects):
    """Why folds are grouped: scored on subjects it trained on, the classifier recognises them."""
    images, case_ids = subjects
    first_half = np.isin(case_ids, np.unique(case_ids)[::2])
    result = c2st.classifier_two_sample_test(images[first_half], images[~first_half], None, None,
                                                **TINY_BUDGET)
    assert result["accuracy"] > 0.8


def test_blurred_vs_real_control_scores_near_one(subjects):
    images, case_ids = subjects
    result = c2st.blurred_vs_real_control(images, case_ids, 10 ** 6, sigma=c2st.blur_sigma(64),
                                             **TINY_BUDGET)
    assert result["accuracy"] >= c2st.BLURRED_MIN_ACCURACY, result["fold_accuracies"]
    assert result["blur_sigma_px"] == 0.5


def test_c2st_is_deterministic_and_leaves_the_global_random_state_alone():
    images, case_ids = blob_subjects(n_subjects=8, n_slices=4, size=32, seed=1)
    generated = torch.rand(32, 1, 32, 32)
    budget = {**TINY_BUDGET, "epochs": 2}
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = c2st.classifier_two_sample_test(generated, images, None, case_ids, seed=5, **budget)
    assert torch.equal(torch.get_rng_state(), state)
    second = c2st.classifier_two_sample_test(generated, images, None, case_ids, seed=5, **budget)
    assert first["fold_accuracies"] == second["fold_accuracies"]
    assert first["budget"] == {"epochs": 2, "lr": 1e-3, "batch_size": 16, "optimizer": "Adam"}


def test_controls_pass_only_when_both_controls_do():
    low, high = c2st.REAL_VS_REAL_RANGE
    good_blur = c2st.BLURRED_MIN_ACCURACY
    assert c2st.controls_pass(0.5, good_blur)
    assert c2st.controls_pass(low, 1.0) and c2st.controls_pass(high, 1.0)
    assert not c2st.controls_pass(high + 0.01, 1.0)
    assert not c2st.controls_pass(low - 0.01, 1.0)
    assert not c2st.controls_pass(0.5, good_blur - 0.01)


def test_report_calls_the_c2st_invalid_when_a_control_fails(subjects, monkeypatch):
    images, case_ids = subjects
    monkeypatch.setattr(c2st, "train_and_score", FoldSpy(accuracy=0.5))  # a judge that sees nothing
    report = realism.realism_report(images[:40], images, images, case_ids, images[:16], images[:16],
                                    **TINY_BUDGET, nn_train=20)
    assert report["c2st"]["accuracy"] == 0.5  # looks indistinguishable ...
    assert report["controls"]["blurred_vs_real"]["accuracy"] == 0.5
    assert report["controls_pass"] is False and report["c2st_valid"] is False  # ... but counts for nothing
    assert report["nn_ssim"]["n_train_compared"] == 20
    assert report["nn_ssim"]["samples"]["max"] == pytest.approx(1.0)  # samples copied from the train set

    monkeypatch.setattr(realism, "blurred_vs_real_control", lambda *a, **k: {"accuracy": 0.97})
    report = realism.realism_report(images[:40], images, images, case_ids, images[:16], images[:16],
                                    **TINY_BUDGET)
    assert report["controls_pass"] is True and report["c2st_valid"] is True


def test_report_refuses_too_few_subjects_for_its_folds(subjects):
    images, case_ids = subjects
    few = np.isin(case_ids, np.unique(case_ids)[:9])
    with pytest.raises(DataError, match="at least 10 training subjects"):
        realism.realism_report(images[:8], images[few], images[few], case_ids[few], images[:4], images[:4],
                               n_folds=5)


# ----------------------------------------------------------------------------- copying and distances

def test_ssim_matrix_is_skimage_structural_similarity():
    images, _ = blob_subjects(n_subjects=3, n_slices=2, size=24, seed=2)
    noise = torch.rand(2, 1, 24, 24)
    queries, references = torch.cat([images[:3], noise[:1]]), torch.cat([images[2:], noise[1:]])
    matrix = ssim_matrix(queries, references, chunk=3)
    expected = [[structural_similarity(q[0].double().numpy(), r[0].double().numpy(), data_range=1.0)
                 for r in references] for q in queries]
    np.testing.assert_allclose(matrix, expected, rtol=0, atol=1e-10)


def test_nearest_neighbour_ssim_of_an_exact_copy_is_one(subjects):
    images, _ = subjects
    references = images[::3]
    copies = references[[1, 7, 30]]
    assert realism.nearest_neighbour_ssim(copies, references) == pytest.approx(1.0, abs=1e-12)
    others = images[1::3][:5]  # the same subjects' other slices: near, but not copies
    nearest = realism.nearest_neighbour_ssim(others, references)
    assert np.all(nearest < 0.99) and np.all(nearest > 0.3)


def test_histogram_and_brain_area_distances_are_zero_for_one_distribution_and_not_for_another():
    images, _ = blob_subjects(n_subjects=40, n_slices=2, size=32, seed=4)
    same = realism.distribution_distances(images[::2], images[1::2])
    assert same["histogram_jensen_shannon"] < 0.05 and same["histogram_l1"] < 0.1
    assert same["brain_area_wasserstein"] < 0.02
    identical = realism.distribution_distances(images, images)
    assert identical["histogram_l1"] == 0 and identical["brain_area_wasserstein"] == 0

    darker = realism.distribution_distances(images * 0.5, images)
    assert darker["histogram_jensen_shannon"] > max(0.2, 10 * same["histogram_jensen_shannon"])
    assert darker["histogram_l1"] > max(0.3, 10 * same["histogram_l1"])
    smaller = torch.zeros_like(images)
    smaller[..., 8:24, 8:24] = images[..., 8:24, 8:24]  # less head in every slice
    assert realism.distribution_distances(smaller, images)["brain_area_wasserstein"] > 0.1


# ----------------------------------------------------------------------------- the flags

def test_realism_is_off_by_default_and_its_flags_are_documented(capsys):
    assert predict.PredictConfig().realism is False
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--realism", "--no-realism", "--realism-samples", "--realism-folds", "--realism-epochs",
                 "--realism-lr", "--realism-batch-size", "--realism-nn-train"):
        assert flag in help_text


def disc_slices(n, size=128, radius=0.3, level=0.5):
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    disc = np.where(xx ** 2 + yy ** 2 < radius ** 2, level, 0.0)
    return torch.tensor(np.repeat(disc[None, None], n, axis=0), dtype=torch.float32)


def test_shape_figures_give_a_smooth_disc_its_roughness_and_count_a_planted_hole():
    plain, holed = disc_slices(4), disc_slices(4)
    holed[1:3, 0, 60:66, 60:66] = 0.0  # a black spot in the middle of two of the four
    figures = realism.shape_figures({"plain": plain, "holed": holed})
    assert 3.0 < figures["plain"]["outline_roughness_mean"] < 3.4
    assert figures["plain"]["hole_rate"] == 0.0 and figures["holed"]["hole_rate"] == 0.5
    assert figures["holed"]["holes_per_image"] == 0.5


def test_the_report_has_the_c2st_at_the_image_size_and_the_64_px_view_beside_it(subjects, monkeypatch):
    seen_sizes = []

    def spy(*args, input_size, **kwargs):
        seen_sizes.append(input_size)
        return {"accuracy": 0.5, "fold_accuracies": [0.5], "n_per_class": 40}
    monkeypatch.setattr(realism, "classifier_two_sample_test", spy)  # the test itself
    monkeypatch.setattr(c2st, "classifier_two_sample_test", spy)  # what the controls run
    images, case_ids = blob_subjects(n_subjects=12, n_slices=4, size=128)
    report = realism.realism_report(images[:40], images, images, case_ids, images[:8], images[:8],
                                    held_out=(images[:24], case_ids[:24]), test_case_ids=case_ids[:8],
                                    **TINY_BUDGET)
    assert report["c2st_real"]["input_size"] == 128 and report["c2st_real"]["sides"]["b"].startswith("real held-out")
    # the decoder's ceiling: reconstructions against the same real slices, under the headline's controls
    ceiling = report["c2st_decoder"]
    assert ceiling["input_size"] == 128 and ceiling["sides"]["a"].startswith("VQ-VAE reconstructions")
    assert ceiling["controls"] is report["c2st_real"]["controls"]
    assert report["c2st"]["input_size"] == 128 and report["c2st_64"]["input_size"] == 64
    coarse_real = report["c2st_real_64"]
    assert coarse_real["input_size"] == 64 and coarse_real["sides"] == report["c2st_real"]["sides"]
    # against real slices and against reconstructions at both sizes, each with both controls; the ceiling
    assert sorted(set(seen_sizes)) == [64, 128] and len(seen_sizes) == 13
    report = realism.realism_report(images[:40], images, images, case_ids, images[:8], images[:8],
                                    input_size=64, **TINY_BUDGET)
    assert report["c2st"]["input_size"] == 64 and report["c2st_64"] is None and report["c2st_real_64"] is None
    assert set(report["shape"]) >= {"samples", "test_real", "test_reconstructions"}
    # by level: the priors, the detail prior and the coarse prior at the full size and half of it
    levels = (images[:40], case_ids[:40], images[8:48])
    report = realism.realism_report(images[:40], images, images, case_ids, images[:8], images[:8], levels=levels,
                                    **TINY_BUDGET)
    assert {name: sorted(tests) for name, tests in report["by_level"].items()} == {
        "priors": ["128", "64"], "detail_prior": ["128", "64"], "coarse_prior": ["128", "64"]}
    # too few held-out subjects for its controls' folds: skipped, and said so
    few = (images[:12], case_ids[:12], images[12:24])
    report = realism.realism_report(images[:40], images, images, case_ids, images[:8], images[:8], levels=few,
                                    **TINY_BUDGET)
    assert "needs at least 8 held-out subjects" in report["by_level"]["skipped"]


def write_realism_run(out_dir, prior_path, data, accuracy, seconds, hidden, by_level=True):
    """A predict.py --realism output folder and the prior checkpoint it names: its headline against
    real slices at `accuracy`, at 64 px 0.1 below, against reconstructions 0.05 below (by_level=False:
    a run from before the headline and the decomposition, against reconstructed train slices)."""
    model_cfg = PixelCNNConfig(num_codes=8, hidden=hidden, n_layers=2, kernel=3, grid_size=4)
    model = build_prior(model_cfg)
    optimizer = torch.optim.Adam(model.parameters())
    state = RunState(step=40, best=2.5, history=[{"epoch": 1, "seconds": seconds}])
    save_checkpoint(prior_path, checkpoint_payload("pixelcnn", model, model_cfg, pixelcnn.PriorTrainConfig(),
                                                   optimizer, WarmupCosine(optimizer, 2, 40), state))
    verdict = {"accuracy": accuracy, "input_size": 128, "valid": True}
    against_train = {**verdict, "accuracy": accuracy - 0.2}
    report = {"c2st": against_train, "c2st_64": {**against_train, "input_size": 64}, "c2st_valid": True}
    if by_level:
        report.update({"c2st_real": verdict, "c2st_real_64": {**verdict, "accuracy": accuracy - 0.1, "input_size": 64},
                       "by_level": {"priors": {"128": {**verdict, "accuracy": accuracy - 0.05},
                                               "64": {**verdict, "accuracy": 0.5, "input_size": 64}},
                                    "detail_prior": None, "coarse_prior": None}})
    out_dir.mkdir(parents=True)
    (out_dir / "metrics.json").write_text(json.dumps({"data_root": data, "prior": str(prior_path), "realism": report}))


def test_realism_against_minutes_reads_each_runs_prior_and_plots_the_headline_beside_the_priors(tmp_path, capsys):
    write_realism_run(tmp_path / "short", tmp_path / "short.pt", "demo", 0.99, 300.0, 8)
    write_realism_run(tmp_path / "long", tmp_path / "long.pt", "demo", 0.80, 1800.0, 16)
    write_realism_run(tmp_path / "older", tmp_path / "older.pt", "demo", 0.90, 600.0, 8, by_level=False)
    figure = tmp_path / "figure.png"
    realism.main([str(tmp_path / name) for name in ("short", "long", "older")] + ["--figure", str(figure)])
    rows = [realism.realism_run(tmp_path / name) for name in ("short", "long", "older")]
    # the headline against real slices, the priors against reconstructions at the full size, the headline at 64 px
    assert [(r["prior_minutes"], r["hidden"], r["c2st_real"], r["c2st"], r["c2st_64"]) for r in rows] == [
        (5.0, 8, 0.99, pytest.approx(0.94), pytest.approx(0.89)),
        (30.0, 16, 0.80, pytest.approx(0.75), pytest.approx(0.70)),
        (10.0, 8, None, pytest.approx(0.70), None)]  # a run from before: against reconstructed train slices
    assert figure.is_file()
    table = capsys.readouterr().out
    assert table.index("| short |") < table.index("| older |") < table.index("| long |")
    assert "| 0.800 | 0.750 (128 px) | 0.700 |" in table
    assert "| 8, 16, 0.008, 0, 0.8 |" in table  # channels, batch, peak lr, dropout, lr hold


def test_realism_against_minutes_names_a_run_without_a_realism_entry(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "metrics.json").write_text('{"prior": "x.pt"}')
    with pytest.raises(SystemExit) as exit_info:
        realism.main([str(tmp_path / "plain")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "--realism" in err


def test_the_decoders_ceiling_judges_reconstructions_of_test_slices_against_the_real_held_out_ones(monkeypatch):
    calls = []

    def spy(a, b, groups_a, groups_b, *, input_size, **kwargs):
        calls.append((a, b, groups_a, groups_b, input_size))
        return {"accuracy": 1.0, "fold_accuracies": [1.0], "n_per_class": len(a)}
    monkeypatch.setattr(realism, "classifier_two_sample_test", spy)
    recon, real = torch.rand(10, 1, 16, 16), torch.rand(12, 1, 16, 16)
    recon_ids, real_ids = np.arange(10) // 2, np.arange(12) // 3
    judged = {"input_size": 16, "valid": True, "controls": {"real_vs_real": {}}, "sides": {"b": "real held-out"}}
    ceiling = realism.decoder_ceiling(recon, recon_ids, (real, real_ids), 4, judged, seed=0)
    (a, b, groups_a, groups_b, size), = calls
    assert len(a) == 4 and b is real and groups_b is real_ids and size == 16
    rows = [int(np.flatnonzero([torch.equal(r, x) for x in recon])[0]) for r in a]  # each a reconstruction
    assert list(groups_a) == list(recon_ids[rows])  # with its own subject
    assert ceiling["valid"] and ceiling["controls"] is judged["controls"] and ceiling["accuracy"] == 1.0


def test_the_decomposition_by_level_judges_each_prior_against_the_level_below_with_its_controls(monkeypatch):
    calls, controls = [], []

    def spy(a, b, groups_a, groups_b, *, input_size, **kwargs):
        calls.append((a, b, groups_a, groups_b, input_size))
        return {"accuracy": 0.7, "fold_accuracies": [0.7], "n_per_class": min(len(a), len(b))}

    def control(kind):
        def run(images, case_ids, n, *, input_size, **kwargs):
            controls.append((kind, images, input_size))
            return {"accuracy": 0.5 if kind == "real" else 1.0}
        return run
    monkeypatch.setattr(realism, "classifier_two_sample_test", spy)
    monkeypatch.setattr(realism, "real_vs_real_control", control("real"))
    monkeypatch.setattr(realism, "blurred_vs_real_control", control("blurred"))
    samples, recon, detail_only = (torch.rand(8, 1, 256, 256) for _ in range(3))
    ids = np.arange(8) // 2
    result = realism.by_level(samples, recon, ids, detail_only, sizes=realism.level_sizes(256), seed=0)
    assert realism.level_sizes(256) == [256, 128] and realism.level_sizes(256, 64) == [64]
    assert realism.level_sizes(128) == [128, 64] and realism.level_sizes(64) == [64]
    compared = [(a is samples, a is detail_only, b is recon, b is detail_only, groups_a is ids, size)
                for a, b, groups_a, groups_b, size in calls]
    for size in (256, 128):
        assert (True, False, True, False, False, size) in compared  # the priors: samples vs reconstructions
        assert (False, True, True, False, True, size) in compared   # the detail prior: real coarse codes, same subjects
        assert (True, False, False, True, False, size) in compared  # the coarse prior: samples vs the detail prior's
    # both controls on the reconstructions (shared by the first two tests) and on detail_only, at each size
    assert sorted((kind, images is recon, size) for kind, images, size in controls) == sorted(
        (kind, on_recon, size) for kind in ("blurred", "real") for on_recon in (True, False) for size in (256, 128))
    assert set(result) == {"priors", "detail_prior", "coarse_prior"} and set(result["priors"]) == {"256", "128"}
    assert all(test["valid"] for level in result.values() for test in level.values())
    assert result["detail_prior"]["256"]["sides"]["b"] == "VQ-VAE reconstructions of held-out slices"
    one_level = realism.by_level(samples, recon, ids, None, sizes=[128], seed=0)
    assert one_level["detail_prior"] is None and one_level["coarse_prior"] is None and set(one_level["priors"]) == {"128"}
