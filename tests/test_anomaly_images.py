"""anomaly.py --images DIR [--masks DIR]: maps of a researcher's own slices, thresholds set on
healthy slices alone, scored against their masks where given."""
import json

import numpy as np
import pytest
from PIL import Image

import anomaly
from dataset import load_split

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
    assert [int(r["mask_pixels"]) for r in rows if int(r["file"][5]) % 2 == 1] == [0, 0]
    figures = json.loads((tmp_path / "anomaly_metrics.json").read_text())["methods"]["healing"]
    assert figures["slice_auroc"] == 1.0 and figures["best_possible_dice"] >= figures["dice"] >= 0
    assert 0.5 < figures["pixel_auroc"] <= 1


def test_without_masks_no_mask_is_read(tiny_models, own_slices, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a mask was read")

    monkeypatch.setattr(anomaly, "read_mask", refuse)
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
