"""anomaly.py --images DIR [--masks DIR]: maps of a researcher's own slices, thresholds set on
healthy slices alone, scored against their masks where given."""
import json

import numpy as np
import pytest
from PIL import Image

import anomaly
import study
from dataset import load_split
from metrics import auroc

PATCH = (slice(112, 160), slice(104, 152))  # 48 x 48 px at 256: 6 x 6 px of the 32 px model, in the brain


@pytest.fixture(scope="module")
def own_slices(tmp_path_factory, tiny_models):
    """The tiny demo's 4 test slices as a user's folder (names that are not OASIS names): a dark
    foreign patch planted in two of them, and a mask folder with the patch or nothing."""
    folder = tmp_path_factory.mktemp("own")
    images, masks = folder / "images", folder / "masks"
    images.mkdir()
    masks.mkdir()
    slices = load_split(tiny_models.data, "test", cache_dir=None, progress=False).images
    for i, pixels in enumerate(slices):
        mask = np.zeros(pixels.shape, np.uint8)
        if i % 2 == 0:
            pixels = pixels.copy()
            pixels[PATCH] = 0
            mask[PATCH] = 255
        Image.fromarray(pixels).save(images / f"scan_{i}.png")
        Image.fromarray(mask).save(masks / f"scan_{i}.png")
    return images, masks


def run_on(tiny_models, monkeypatch, out, *flags):
    monkeypatch.chdir(tiny_models.work)  # its default checkpoints, as a user runs it
    return anomaly.main(["--data", str(tiny_models.data), "--out-dir", str(out), "--n-heal", "2", *flags])


def test_a_planted_foreign_patch_is_found_and_empty_masks_give_no_lesion_pixels(
        tiny_models, own_slices, tmp_path, monkeypatch):
    images, masks = own_slices
    report = run_on(tiny_models, monkeypatch, tmp_path, "--images", str(images), "--masks", str(masks))
    assert report["n_slices"] == 4 and report["thresholds_set_on"] == "healthy validate slices"
    assert report["slice_positions_from"].startswith("inferred")  # scan_<i>.png names no position
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == [f"scan_{i}.npy" for i in range(4)]
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == [f"scan_{i}.png" for i in range(4)]
    assert np.load(tmp_path / "maps" / "scan_0.npy").shape == (32, 32)
    rows = (tmp_path / "anomaly_scores.csv").read_text().splitlines()
    header, rows = rows[0].split(","), [dict(zip(rows[0].split(","), r.split(","))) for r in rows[1:]]
    assert header[:2] == ["file", "slice_position"] and len(rows) == 4
    patched = [float(r["healing_score"]) for r in rows if int(r["file"][5]) % 2 == 0]
    clean = [float(r["healing_score"]) for r in rows if int(r["file"][5]) % 2 == 1]
    assert min(patched) > max(clean)  # the patch stands out of every untouched slice
    combined = {r["file"]: float(r["combined_score"]) for r in rows}
    assert min(combined[f"scan_{i}.png"] for i in (0, 2)) > max(combined[f"scan_{i}.png"] for i in (1, 3))
    # the map written is the combined one, whose highest value in the brain is the slice's score
    assert np.load(tmp_path / "maps" / "scan_0.npy").max() == pytest.approx(combined["scan_0.png"], rel=1e-5)
    assert "combined_pixels_above_threshold" in header
    assert [int(r["mask_pixels"]) for r in rows if int(r["file"][5]) % 2 == 1] == [0, 0]
    figures = json.loads((tmp_path / "anomaly_metrics.json").read_text())["methods"]["healing"]
    assert figures["slice_auroc"] == 1.0 and figures["best_possible_dice"] >= figures["dice"] >= 0
    assert 0.5 < figures["pixel_auroc"] <= 1


def test_without_masks_no_mask_is_read(tiny_models, own_slices, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a mask was read")

    monkeypatch.setattr(study, "read_mask", refuse)
    report = run_on(tiny_models, monkeypatch, tmp_path, "--images", str(own_slices[0]), "--slice-position", "2")
    assert "methods" not in report and report["slice_positions_from"] == "--slice-position"
    assert "mask_pixels" not in (tmp_path / "anomaly_scores.csv").read_text().splitlines()[0]


def test_oasis_names_give_the_slice_position(tiny_models, tmp_path, monkeypatch):
    folder = tmp_path / "oasis_named"
    folder.mkdir()
    for path in sorted((tiny_models.data / "keras_png_slices_test").glob("*.png"))[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    report = run_on(tiny_models, monkeypatch, tmp_path / "out", "--images", str(folder))
    assert report["slice_positions_from"] == "the OASIS file names"
    positions = [int(r.split(",")[1]) for r in (tmp_path / "out" / "anomaly_scores.csv").read_text().splitlines()[1:]]
    assert positions == [0, 1]


def one_line_error(capsys, stop):
    assert stop.value.code == 2
    err = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert err.startswith("error: ")
    return err


def test_a_missing_mask_a_mask_of_another_size_and_a_folder_without_pngs_get_one_line(
        tiny_models, own_slices, tmp_path, monkeypatch, capsys):
    images, masks = own_slices
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "scan_0.png").write_bytes((masks / "scan_0.png").read_bytes())
    with pytest.raises(SystemExit) as stop:
        run_on(tiny_models, monkeypatch, tmp_path / "a", "--images", str(images), "--masks", str(partial))
    assert "scan_1.png" in one_line_error(capsys, stop)

    small = tmp_path / "small"
    small.mkdir()
    for path in masks.iterdir():
        Image.fromarray(np.zeros((128, 128), np.uint8)).save(small / path.name)
    with pytest.raises(SystemExit) as stop:
        run_on(tiny_models, monkeypatch, tmp_path / "b", "--images", str(images), "--masks", str(small))
    assert "128x128" in one_line_error(capsys, stop)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no slices here")
    with pytest.raises(SystemExit) as stop:
        run_on(tiny_models, monkeypatch, tmp_path / "c", "--images", str(empty))
    err = one_line_error(capsys, stop)
    assert str(empty) in err and "no PNG" in err


# ----------------------------------------------------------------------------- a study in bounded memory

def test_the_reservoir_keeps_every_pixel_while_they_fit_and_a_uniform_sample_beyond():
    rng = np.random.default_rng(0)
    scores, labels = rng.random((5000, 2)).astype(np.float32), rng.random(5000) < 0.1
    whole = study.PixelReservoir(10_000, 2, seed=1)
    for start in range(0, 5000, 700):
        whole.add(scores[start:start + 700], labels[start:start + 700])
    assert whole.seen == 5000 and sorted(map(tuple, whole.scores)) == sorted(map(tuple, scores))
    small = study.PixelReservoir(1000, 2, seed=1)
    for start in range(0, 5000, 700):
        small.add(scores[start:start + 700], labels[start:start + 700])
    assert small.seen == 5000 and len(small.labels) == 1000
    kept = {tuple(row) for row in small.scores}
    assert kept <= {tuple(row) for row in scores}  # a sample of what was added, without repeats
    late = np.isin(scores[:, 0], scores[4000:, 0])
    assert 0.1 < np.isin(small.scores[:, 0], scores[late, 0]).mean() < 0.3  # the last fifth as often as the rest


def test_study_scores_added_a_batch_at_a_time_equal_the_figures_of_the_whole():
    from maps import METHODS
    from metrics import auroc, average_precision, best_dice, dice_at
    rng = np.random.default_rng(2)
    masks = np.zeros((6, 16, 16), bool)
    masks[::2, 4:9, 5:10] = True
    maps = {m: rng.random((6, 16, 16)).astype(np.float32) + k * masks for k, m in enumerate(METHODS)}
    regions = np.zeros((6, 16, 16), bool)
    regions[:, 2:14, 2:14] = True
    thresholds = {m: 0.8 for m in METHODS}
    scores = study.StudyScores(thresholds, seed=0)
    for start in (0, 2, 5):
        stop = {0: 2, 2: 5, 5: 6}[start]
        scores.add({m: v[start:stop] for m, v in maps.items()}, masks[start:stop], regions[start:stop])
    figures, pixels = scores.figures()
    assert pixels == {"brain_pixels": 6 * 144, "pixels_sampled": 6 * 144}
    for m in METHODS:
        flat, labels = maps[m][regions], masks[regions]
        per_slice = [maps[m][i][regions[i]].max() for i in range(6)]
        assert figures[m]["pixel_auroc"] == pytest.approx(auroc(flat, labels))
        assert figures[m]["pixel_auprc"] == pytest.approx(average_precision(flat, labels))
        assert figures[m]["dice"] == pytest.approx(dice_at(flat, labels, 0.8))
        assert figures[m]["best_possible_dice"] == pytest.approx(best_dice(flat, labels)[0])
        assert figures[m]["slice_auroc"] == pytest.approx(auroc(per_slice, masks.any(axis=(1, 2))))


def test_the_report_keeps_the_highest_scoring_slices_highest_first():
    top = study.TopSlices(count=3)
    for i, score in enumerate([0.2, 0.9, 0.1, 0.5, 0.7, 0.5]):
        top.add(score, f"s{i}", np.zeros((4, 4)), np.full((4, 4), score), None)
    assert [r.name for r in top.highest_first()] == ["s1", "s4", "s3"]  # of the tied 0.5s, the earlier


def test_a_folder_is_mapped_a_batch_at_a_time_and_an_interrupted_run_keeps_the_finished_batches(
        tiny_models, own_slices, tmp_path, monkeypatch):
    images, masks = own_slices
    sizes, real_maps = [], study.anomaly_maps

    def counted(vqvae, priors, bench, *args, **kwargs):
        sizes.append(len(bench.slice_idx))
        return real_maps(vqvae, priors, bench, *args, **kwargs)

    monkeypatch.setattr(study, "anomaly_maps", counted)
    # --batch-size 2 code grids with --n-heal 2: one slice at a time
    report = run_on(tiny_models, monkeypatch, tmp_path / "whole", "--images", str(images), "--masks", str(masks),
                    "--batch-size", "2")
    assert sizes == [1, 1, 1, 1] and report["n_slices"] == 4
    assert report["slices_per_second"] > 0 and 0 < report["peak_memory_gb"] < 64
    assert (tmp_path / "whole" / "report.png").stat().st_size > 0
    assert report["pixels"]["pixels_sampled"] == report["pixels"]["brain_pixels"] > 0
    rows = [r.split(",") for r in (tmp_path / "whole" / "anomaly_scores.csv").read_text().splitlines()]
    column = {name: k for k, name in enumerate(rows[0])}
    scores = [float(r[column["healing_score"]]) for r in rows[1:]]
    lesioned = [int(r[column["mask_pixels"]]) > 0 for r in rows[1:]]
    assert report["methods"]["healing"]["slice_auroc"] == pytest.approx(auroc(scores, lesioned))

    def interrupted(vqvae, priors, bench, *args, **kwargs):
        if len(sizes) == 6:
            raise KeyboardInterrupt
        return counted(vqvae, priors, bench, *args, **kwargs)

    monkeypatch.setattr(study, "anomaly_maps", interrupted)
    with pytest.raises(SystemExit):
        run_on(tiny_models, monkeypatch, tmp_path / "cut", "--images", str(images), "--batch-size", "2")
    rows = (tmp_path / "cut" / "anomaly_scores.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["scan_0.png", "scan_1.png"]
    assert sorted(p.name for p in (tmp_path / "cut" / "maps").iterdir()) == ["scan_0.npy", "scan_1.npy"]
