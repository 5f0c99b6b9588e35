"""The OASIS layout: split folders, file names, and reading one slice.

The data set is the `keras_png_slices_data` release of OASIS: one folder per split,
`keras_png_slices_<split>/case_<id>_slice_<k>.nii.png`, 8-bit grayscale 256 x 256 axial
slices. Whole splits are loaded and cached by dataset.py; the demo set (demo.py) is written
in this same layout.

Sizes: `read_slice(path, N)` resizes to N x N with Lanczos (the one resizing filter of the
project); only image_size=None insists on 256 x 256 files and reports any other size as an error.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from errors import DataError, one_line

SPLITS = ("train", "validate", "test")

NATIVE_SIZE = 256
SPLIT_DIR_PREFIX = "keras_png_slices_"
# Bump when the cache file's contents change meaning, so old caches are not trusted.
# A pixel counts as foreground (head) above this fraction of full scale; by this measure
# 30-41 % of a real OASIS slice is foreground.
FOREGROUND_THRESHOLD = 0.1

_SLICE_NAME = re.compile(r"case_([A-Za-z0-9]+)_slice_(\d+)\.nii\.png")



@dataclass
class SliceSet:
    """All slices of one split, in `list_split_files` order."""

    images: np.ndarray  # uint8 (N, H, W)
    case_ids: np.ndarray  # str (N,), e.g. "013"
    slice_idx: np.ndarray  # int64 (N,)
    files: list[str]  # basenames, same order

    def __post_init__(self):
        lengths = {len(self.images), len(self.case_ids), len(self.slice_idx), len(self.files)}
        if len(lengths) != 1:
            raise ValueError(f"SliceSet fields disagree on length: {sorted(lengths)}")

    def __len__(self) -> int:
        return len(self.images)


# --------------------------------------------------------------------------- finding files


def parse_slice_name(name: str) -> tuple[str, int]:
    """'case_013_slice_10.nii.png' -> ('013', 10)."""
    match = _SLICE_NAME.fullmatch(name)
    if match is None:
        raise DataError(f"{name}: not an OASIS slice name (expected case_<id>_slice_<k>.nii.png)")
    return match.group(1), int(match.group(2))


def split_dir(root, split: str) -> Path:
    """The folder holding one split, checked to exist."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: data folder does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: data path is a file, expected a folder")
    folder = root / f"{SPLIT_DIR_PREFIX}{split}"
    if not folder.is_dir():
        raise DataError(f"{folder}: split folder missing (expected {SPLIT_DIR_PREFIX}<split> inside {root})")
    return folder


def _slice_sort_key(case_id: str, slice_number: int) -> tuple:
    # Numeric ids first, in numeric order, so "9" comes before "10"; any others after, by text.
    if case_id.isdigit():
        return (0, int(case_id), case_id, slice_number)
    return (1, 0, case_id, slice_number)


def list_split_files(root, split: str) -> list[Path]:
    """Every slice PNG of a split, ordered by case then slice number."""
    folder = split_dir(root, split)
    keyed = []
    for path in folder.iterdir():
        if not path.name.lower().endswith(".png") or not path.is_file():
            continue
        try:
            case_id, slice_number = parse_slice_name(path.name)
        except DataError:
            raise DataError(f"{path}: file name does not match case_<id>_slice_<k>.nii.png") from None
        keyed.append((_slice_sort_key(case_id, slice_number), path))
    if not keyed:
        raise DataError(f"{folder}: no case_<id>_slice_<k>.nii.png files in split folder")
    keyed.sort(key=lambda item: (item[0], item[1].name))
    return [path for _, path in keyed]


def cases_in_several_splits(root) -> dict[str, list[str]]:
    """Case ids found in more than one split folder, with the splits holding each.

    A subject's slices are near copies of each other, so such a case leaks between
    training and evaluation."""
    splits_of: dict[str, list[str]] = {}
    for split in SPLITS:
        for path in list_split_files(root, split):
            case_id = parse_slice_name(path.name)[0]
            if split not in splits_of.setdefault(case_id, []):
                splits_of[case_id].append(split)
    return {case_id: splits for case_id, splits in splits_of.items() if len(splits) > 1}


# --------------------------------------------------------------------------- decoding


def _to_gray_uint8(image: Image.Image) -> np.ndarray:
    """8-bit gray pixels from any PNG mode, keeping the full intensity range."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit gray: rescale 0..65535 to 0..255; Pillow's own convert("L") would clip.
        wide = np.asarray(image).astype(np.float64)
        return np.clip(np.rint(wide * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    if image.mode == "F":
        return np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8)
    if image.mode != "L":
        # RGB(A)/palette/1-bit: ITU-R 601 luma; alpha is ignored (slices are opaque).
        image = image.convert("L")
    return np.array(image, dtype=np.uint8)


def resize_gray(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W) -> uint8 (size, size), Lanczos; rounded once, after resampling in float."""
    return np.clip(np.rint(lanczos(pixels.astype(np.float32), size)), 0, 255).astype(np.uint8)


def resize_unit(images: np.ndarray, size: int) -> np.ndarray:
    """Images in [0, 1], (N, H, W) -> (N, size, size) float32 in [0, 1], Lanczos like every resize
    of the project (Lanczos rings, hence the clip)."""
    return np.stack([np.clip(lanczos(np.asarray(image, np.float32), size), 0, 1) for image in images])


def lanczos(image: np.ndarray, size: int) -> np.ndarray:
    """float32 (H, W) -> float32 (size, size): the one resizing filter of the project."""
    return np.asarray(Image.fromarray(image, mode="F").resize((size, size), Image.LANCZOS))


def read_slice(path, image_size: int | None = None) -> np.ndarray:
    """One slice as uint8 (H, W).

    image_size=None: the file must be 256 x 256 and is returned as is.
    image_size=N: the image is resized to N x N (antialiased) unless it already is N x N.
    """
    check_image_size(image_size)
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file (zero bytes)")
        with Image.open(path, formats=["PNG"]) as image:
            image.load()
            pixels = _to_gray_uint8(image)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Image.UnidentifiedImageError:
        raise DataError(f"{path}: not a PNG image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # Pillow reports truncated or corrupt PNG streams with any of these.
        raise DataError(f"{path}: unreadable PNG ({one_line(error)})") from None
    height, width = pixels.shape
    if image_size is None:
        if (height, width) != (NATIVE_SIZE, NATIVE_SIZE):
            raise DataError(
                f"{path}: image is {width}x{height}, expected {NATIVE_SIZE}x{NATIVE_SIZE}; "
                f"pass --image-size N to resize"
            )
        return pixels
    if (height, width) != (image_size, image_size):
        pixels = resize_gray(pixels, image_size)
    return pixels


def check_image_size(image_size: int | None) -> None:
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"--image-size must be a positive integer, got {image_size!r}")


# --------------------------------------------------------------------------- a folder of one's own slices


def image_files(folder):
    """The PNG slices of a folder, by name; a one-line error where there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: --images folder not found")
    files = sorted(path for path in folder.iterdir() if path.suffix.lower() == ".png" and path.is_file())
    if not files:
        raise DataError(f"{folder}: no PNG slices in the --images folder")
    return files


def read_mask(folder, image_path, image_size):
    """The lesion mask (nonzero = lesion) of one slice, with its file name, at image_size (nearest)."""
    path = Path(folder) / image_path.name
    if not path.is_file():
        raise DataError(f"{path}: no mask for {image_path.name} in the --masks folder")
    with Image.open(path) as mask, Image.open(image_path) as image:
        if mask.size != image.size:
            raise DataError(f"{path}: mask is {mask.size[0]}x{mask.size[1]}, its slice {image.size[0]}x{image.size[1]}")
        mask = Image.fromarray(np.asarray(mask.convert("L")) > 0)
    return np.asarray(mask.resize((image_size, image_size), Image.NEAREST), dtype=bool)
