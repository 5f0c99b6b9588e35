"""dataset.py: finding, decoding and caching OASIS slices (the demo set: test_demo.py).

Every test builds its own small tree in tmp_path in the OASIS layout; none needs the
real data.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dataset
from dataset import load_split, load_split_tensor, resolve_data_root
from errors import DataError
from slices import SPLITS, SliceSet, cases_in_several_splits, list_split_files, parse_slice_name, read_slice, split_dir

SIDE = 256
PROJECT = Path(dataset.__file__).resolve().parent


def slice_name(case_id, number):
    return f"case_{case_id}_slice_{number}.nii.png"


def random_slice(rng, side=SIDE):
    return rng.integers(0, 256, size=(side, side), dtype=np.uint8)


def make_tree(root, write_png, cases=("001", "002"), n_slices=3, seed=0):
    """A small OASIS-layout tree of random 8-bit slices; returns {(split, name): pixels}."""
    rng = np.random.default_rng(seed)
    written = {}
    for split in SPLITS:
        for case_id in cases:
            for number in range(n_slices):
                pixels = random_slice(rng)
                name = slice_name(case_id, number)
                write_png(root / f"keras_png_slices_{split}" / name, pixels)
                written[split, name] = pixels
    return written


@pytest.fixture
def tree(tmp_path, write_png):
    root = tmp_path / "oasis"
    return root, make_tree(root, write_png)


# --------------------------------------------------------------------------- names and order


def test_parse_slice_name_splits_case_id_and_slice_number():
    assert parse_slice_name("case_013_slice_10.nii.png") == ("013", 10)
    assert parse_slice_name("case_400_slice_0.nii.png") == ("400", 0)


@pytest.mark.parametrize(
    "name",
    ["case_013_slice_10.png", "case_013_slice_x.nii.png", "case__slice_1.nii.png", "slice_1.nii.png",
     "case_013_slice_10.nii.png.bak", "xcase_013_slice_10.nii.png"],
)
def test_parse_slice_name_rejects_other_names(name):
    with pytest.raises(DataError, match="case_<id>_slice_<k>"):
        parse_slice_name(name)


def test_slices_are_ordered_by_case_number_then_slice_number(tmp_path, write_png):
    folder = tmp_path / "keras_png_slices_train"
    names = [slice_name("10", 0), slice_name("2", 10), slice_name("2", 9), slice_name("2", 0),
             slice_name("abc", 1), slice_name("010", 2)]
    for name in names:
        write_png(folder / name, np.zeros((4, 4), np.uint8))
    ordered = [path.name for path in list_split_files(tmp_path, "train")]
    # Numeric ids by value ("010" ties with "10" and goes first as text), then the rest.
    assert ordered == [slice_name("2", 0), slice_name("2", 9), slice_name("2", 10),
                       slice_name("010", 2), slice_name("10", 0), slice_name("abc", 1)]


def test_non_png_files_and_segmentation_folders_are_ignored(tree, write_png):
    root, written = tree
    (root / "keras_png_slices_train" / "notes.txt").write_text("not a slice")
    seg = root / "keras_png_slices_seg_train"
    seg.mkdir()
    (seg / "garbage.png").write_bytes(b"")
    write_png(seg / slice_name("001", 0), np.full((SIDE, SIDE), 3, np.uint8))
    slices = load_split(root, "train", cache_dir=None, progress=False)
    assert slices.files == [slice_name(c, k) for c in ("001", "002") for k in range(3)]
    assert np.array_equal(slices.images[0], written["train", slice_name("001", 0)])


# --------------------------------------------------------------------------- loading


def test_load_split_returns_the_file_pixels_ids_and_slice_numbers(tree):
    root, written = tree
    slices = load_split(root, "validate", cache_dir=None, progress=False)
    assert isinstance(slices, SliceSet) and len(slices) == 6
    assert slices.images.dtype == np.uint8 and slices.images.shape == (6, SIDE, SIDE)
    assert slices.case_ids.tolist() == ["001"] * 3 + ["002"] * 3
    assert slices.slice_idx.dtype == np.int64 and slices.slice_idx.tolist() == [0, 1, 2] * 2
    for image, name in zip(slices.images, slices.files):
        assert np.array_equal(image, written["validate", name])


def test_load_split_tensor_is_uint8_with_a_channel_axis(tree):
    root, written = tree
    images, slices = load_split_tensor(root, "test", 256, "cpu", cache_dir=None, progress=False)
    assert tuple(images.shape) == (6, 1, SIDE, SIDE) and str(images.dtype) == "torch.uint8"
    assert np.array_equal(images[2, 0].numpy(), written["test", slices.files[2]])


def test_rgb_png_becomes_luma_gray(tmp_path, write_png):
    rgb = np.zeros((SIDE, SIDE, 3), np.uint8)
    rgb[:128] = (137, 137, 137)
    rgb[128:] = (200, 100, 50)
    pixels = read_slice(write_png(tmp_path / "rgb.png", rgb))
    assert pixels.dtype == np.uint8 and pixels.shape == (SIDE, SIDE)
    assert pixels[0, 0] == 137
    assert abs(int(pixels[-1, -1]) - round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)) <= 1


def test_rgba_and_palette_pngs_become_gray(tmp_path, write_png):
    rgba = np.zeros((SIDE, SIDE, 4), np.uint8)
    rgba[..., :3] = 90
    rgba[..., 3] = 255
    assert (read_slice(write_png(tmp_path / "rgba.png", rgba)) == 90).all()
    palette_image = Image.fromarray(np.full((SIDE, SIDE), 1, np.uint8), mode="P")
    palette_image.putpalette([0, 0, 0, 60, 60, 60] + [0, 0, 0] * 254)
    palette_image.save(tmp_path / "palette.png")
    assert (read_slice(tmp_path / "palette.png") == 60).all()


def test_16_bit_png_is_scaled_by_its_bit_depth_not_clipped(tmp_path, write_png):
    wide = np.zeros((SIDE, SIDE), np.uint16)
    wide[0, :4] = [0, 257 * 100, 65535, 1000]
    path = write_png(tmp_path / "wide.png", wide)
    assert Image.open(path).mode.startswith("I")
    pixels = read_slice(path)
    assert pixels.dtype == np.uint8
    assert pixels[0, :4].tolist() == [0, 100, 255, round(1000 * 255 / 65535)]


def test_image_size_resizes_and_native_size_is_untouched(tmp_path, write_png):
    rng = np.random.default_rng(1)
    native = random_slice(rng)
    path = write_png(tmp_path / "native.png", native)
    assert np.array_equal(read_slice(path, image_size=256), native)
    small = read_slice(path, image_size=64)
    assert small.shape == (64, 64) and small.dtype == np.uint8
    flat = write_png(tmp_path / "flat.png", np.full((100, 80), 77, np.uint8))
    assert (read_slice(flat, image_size=32) == 77).all()


def test_resize_is_antialiased_not_subsampled(tmp_path, write_png):
    stripes = np.zeros((SIDE, SIDE), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: subsampling would keep 0 or 255 only
    resized = read_slice(write_png(tmp_path / "stripes.png", stripes), image_size=64)
    assert abs(float(resized.mean()) - 127.5) < 3 and resized.std() < 10


def test_load_split_resizes_every_slice(tree):
    root, _ = tree
    slices = load_split(root, "train", image_size=32, cache_dir=None, progress=False)
    assert slices.images.shape == (6, 32, 32)


def test_load_split_default_size_resizes_other_sizes_to_256(tmp_path, write_png):
    write_png(tmp_path / "keras_png_slices_test" / slice_name("001", 0), np.full((128, 128), 9, np.uint8))
    slices = load_split(tmp_path, "test", cache_dir=None, progress=False)
    assert slices.images.shape == (1, SIDE, SIDE) and (slices.images == 9).all()


# --------------------------------------------------------------------------- bad input


def test_missing_root_is_named(tmp_path, assert_one_line_naming):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as error_info:
        load_split(missing, "train", cache_dir=None, progress=False)
    assert_one_line_naming(error_info, missing)


def test_root_that_is_a_file_is_named(tmp_path, assert_one_line_naming):
    a_file = tmp_path / "oasis.zip"
    a_file.write_bytes(b"zip")
    with pytest.raises(DataError, match="is a file") as error_info:
        split_dir(a_file, "train")
    assert_one_line_naming(error_info, a_file)


def test_missing_split_folder_is_named(tree, assert_one_line_naming):
    root, _ = tree
    (root / "keras_png_slices_test").rename(root / "elsewhere")
    with pytest.raises(DataError, match="split folder missing") as error_info:
        load_split(root, "test", cache_dir=None, progress=False)
    assert_one_line_naming(error_info, root / "keras_png_slices_test")


def test_empty_split_folder_is_named(tmp_path, assert_one_line_naming):
    folder = tmp_path / "keras_png_slices_train"
    folder.mkdir()
    with pytest.raises(DataError, match="no case_") as error_info:
        list_split_files(tmp_path, "train")
    assert_one_line_naming(error_info, folder)


def test_png_with_a_foreign_name_is_named(tree, write_png, assert_one_line_naming):
    root, _ = tree
    stray = write_png(root / "keras_png_slices_train" / "brain.png", np.zeros((SIDE, SIDE), np.uint8))
    with pytest.raises(DataError) as error_info:
        load_split(root, "train", cache_dir=None, progress=False)
    assert_one_line_naming(error_info, stray)


def test_zero_byte_png_is_named(tree, assert_one_line_naming):
    root, _ = tree
    empty = root / "keras_png_slices_train" / slice_name("001", 1)
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty") as error_info:
        load_split(root, "train", cache_dir=None, progress=False)
    assert_one_line_naming(error_info, empty)


def test_truncated_png_is_named(tree, assert_one_line_naming):
    root, _ = tree
    path = root / "keras_png_slices_validate" / slice_name("002", 2)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="unreadable") as error_info:
        load_split(root, "validate", cache_dir=None, progress=False)
    assert_one_line_naming(error_info, path)


def test_text_file_named_png_is_named(tmp_path, assert_one_line_naming):
    path = tmp_path / slice_name("001", 0)
    path.write_text("hello, I am not an image\n")
    with pytest.raises(DataError, match="not a PNG") as error_info:
        read_slice(path)
    assert_one_line_naming(error_info, path)


def test_wrong_size_without_resizing_names_file_and_flag(tmp_path, write_png, assert_one_line_naming):
    path = write_png(tmp_path / slice_name("001", 0), np.zeros((200, 180), np.uint8))
    with pytest.raises(DataError, match="--image-size") as error_info:
        read_slice(path, image_size=None)
    assert_one_line_naming(error_info, path)
    assert "180x200" in str(error_info.value)


def test_load_split_with_no_resizing_rejects_a_wrong_size(tmp_path, write_png, assert_one_line_naming):
    path = write_png(tmp_path / "keras_png_slices_train" / slice_name("001", 0), np.zeros((64, 64), np.uint8))
    with pytest.raises(DataError) as error_info:
        load_split(tmp_path, "train", image_size=None, cache_dir=None, progress=False)
    assert_one_line_naming(error_info, path)


def test_non_positive_image_size_is_refused(tree):
    root, _ = tree
    with pytest.raises(DataError, match="--image-size"):
        load_split(root, "train", image_size=0, cache_dir=None, progress=False)


# --------------------------------------------------------------------------- cache


def forbid_decoding(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("decoded a PNG although the cache should have been used")

    monkeypatch.setattr(dataset, "read_slice", fail)


def test_second_load_comes_from_the_cache(tree, tmp_path, monkeypatch):
    root, _ = tree
    cache = tmp_path / "cache"
    first = load_split(root, "train", cache_dir=cache, progress=False)
    assert len(list(cache.glob("*.npz"))) == 1
    forbid_decoding(monkeypatch)
    second = load_split(root, "train", cache_dir=cache, progress=False)
    assert np.array_equal(first.images, second.images)
    assert second.files == first.files and second.case_ids.tolist() == first.case_ids.tolist()
    assert second.slice_idx.dtype == np.int64 and second.slice_idx.tolist() == first.slice_idx.tolist()


def test_cache_is_keyed_by_image_size(tree, tmp_path, monkeypatch):
    root, _ = tree
    cache = tmp_path / "cache"
    load_split(root, "train", cache_dir=cache, progress=False)
    assert load_split(root, "train", image_size=32, cache_dir=cache, progress=False).images.shape[1:] == (32, 32)
    forbid_decoding(monkeypatch)
    assert load_split(root, "train", cache_dir=cache, progress=False).images.shape[1:] == (SIDE, SIDE)


def test_changing_a_file_invalidates_the_cache(tree, tmp_path, write_png):
    root, _ = tree
    cache = tmp_path / "cache"
    load_split(root, "train", cache_dir=cache, progress=False)
    path = root / "keras_png_slices_train" / slice_name("002", 1)
    replacement = np.full((SIDE, SIDE), 42, np.uint8)
    stat = path.stat()
    write_png(path, replacement)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    reloaded = load_split(root, "train", cache_dir=cache, progress=False)
    assert np.array_equal(reloaded.images[reloaded.files.index(path.name)], replacement)
    assert len(list(cache.glob("*.npz"))) == 1  # the stale cache was removed


def test_adding_a_slice_invalidates_the_cache(tree, tmp_path, write_png):
    root, _ = tree
    cache = tmp_path / "cache"
    load_split(root, "test", cache_dir=cache, progress=False)
    write_png(root / "keras_png_slices_test" / slice_name("003", 0), np.zeros((SIDE, SIDE), np.uint8))
    assert len(load_split(root, "test", cache_dir=cache, progress=False)) == 7


def test_same_names_sizes_and_mtimes_under_another_root_do_not_share_a_cache(tmp_path):
    cache = tmp_path / "cache"
    for root, value in ((tmp_path / "a", 10), (tmp_path / "b", 200)):
        path = root / "keras_png_slices_train" / slice_name("001", 0)
        path.parent.mkdir(parents=True)
        # Uncompressed, so both files have the same byte size; same mtime too.
        Image.fromarray(np.full((SIDE, SIDE), value, np.uint8)).save(path, compress_level=0)
        os.utime(path, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    sizes = {(tmp_path / r / "keras_png_slices_train" / slice_name("001", 0)).stat().st_size for r in "ab"}
    assert len(sizes) == 1
    assert (load_split(tmp_path / "a", "train", cache_dir=cache, progress=False).images == 10).all()
    assert (load_split(tmp_path / "b", "train", cache_dir=cache, progress=False).images == 200).all()


def test_damaged_cache_file_is_decoded_again(tree, tmp_path):
    root, written = tree
    cache = tmp_path / "cache"
    load_split(root, "train", cache_dir=cache, progress=False)
    (cache_file,) = cache.glob("*.npz")
    cache_file.write_bytes(b"not a zip")
    slices = load_split(root, "train", cache_dir=cache, progress=False)
    assert np.array_equal(slices.images[0], written["train", slices.files[0]])


def test_cache_write_leaves_no_temporary_files(tree, tmp_path):
    root, _ = tree
    cache = tmp_path / "cache"
    load_split(root, "validate", cache_dir=cache, progress=False)
    assert [p.suffix for p in cache.iterdir()] == [".npz"]


def test_cache_dir_none_writes_nothing(tree, tmp_path, monkeypatch):
    root, _ = tree
    monkeypatch.chdir(tmp_path)
    load_split(root, "train", cache_dir=None, progress=False)
    assert not (tmp_path / dataset.DEFAULT_CACHE_DIR).exists()


def test_any_other_data_value_is_taken_as_a_path(tmp_path):
    assert resolve_data_root(str(tmp_path / "oasis")) == tmp_path / "oasis"


# --------------------------------------------------------------------------- command line


def test_cli_stats_prints_every_split(tree, capsys):
    root, _ = tree
    assert dataset.main(["--data", str(root), "--stats", "--no-cache"]) == 0
    out = capsys.readouterr().out
    for split in SPLITS:
        assert f"{split}" in out
    assert "2 cases" in out and "6 slices" in out and "foreground" in out


def test_stats_run_as_a_script_prints_every_split(tree):
    # as a script, only what is defined above the `if __name__ == "__main__"` guard exists
    root, _ = tree
    done = subprocess.run([sys.executable, str(PROJECT / "dataset.py"), "--data", str(root), "--stats", "--no-cache"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(split in done.stdout for split in SPLITS) and "2 cases" in done.stdout


def test_cli_error_is_one_line_with_exit_code_2(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert dataset.main(["--data", str(missing), "--stats", "--no-cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and str(missing) in err


def test_cli_usage_error_is_one_line_with_exit_code_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        dataset.main(["--stats", "--make-demo", "x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:")


def test_cli_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        dataset.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--make-demo", "--stats", "--data", "--seed", "--image-size", "--cache-dir", "--no-cache"):
        assert flag in out


def test_cases_in_several_splits_are_found(tree, tiny_demo):
    root, _ = tree
    assert cases_in_several_splits(root) == {"001": list(SPLITS), "002": list(SPLITS)}
    assert cases_in_several_splits(tiny_demo) == {}
