"""OASIS brain MRI slices: find, decode and cache them; the loader every script imports.

The data set is the `keras_png_slices_data` release of OASIS: one folder per split,
`keras_png_slices_<split>/case_<id>_slice_<k>.nii.png`, 8-bit grayscale 256 x 256 axial
slices. `load_split` decodes a split once into a uint8 array and caches it under
`.cache/`. `--data demo` (resolve_data_root) stands for a synthetic stand-in in the same
layout, which demo.py builds from the MNI152 template that ships inside nilearn, so
everything runs offline.

Sizes: by default slices load at 256 x 256 and files of another size are resized to it;
`--image-size N` (image_size=N) resizes to N x N. Only image_size=None insists on
256 x 256 files and reports any other size as an error.

Command line:
    python dataset.py --make-demo data/demo [--seed 0]
    python dataset.py --data path/to/keras_png_slices_data --stats
    python dataset.py --data demo --stats        # builds data/demo first if needed
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

SPLITS = ("train", "validate", "test")
DEFAULT_DEMO_DIR = "data/demo"
DEFAULT_CACHE_DIR = ".cache"

NATIVE_SIZE = 256
SPLIT_DIR_PREFIX = "keras_png_slices_"
# Bump when the cache file's contents change meaning, so old caches are not trusted.
CACHE_FORMAT_VERSION = 1
# A pixel counts as foreground (head) above this fraction of full scale; by this measure
# 30-41 % of a real OASIS slice is foreground.
FOREGROUND_THRESHOLD = 0.1

_SLICE_NAME = re.compile(r"case_([A-Za-z0-9]+)_slice_(\d+)\.nii\.png")


class DataError(Exception):
    """A problem with the data on disk; the message is one line and names the path."""


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
    # Resample in float so rounding happens once; Lanczos rings, hence the clip.
    resized = Image.fromarray(pixels.astype(np.float32), mode="F").resize((size, size), Image.LANCZOS)
    return np.clip(np.rint(np.asarray(resized)), 0, 255).astype(np.uint8)


def read_slice(path, image_size: int | None = None) -> np.ndarray:
    """One slice as uint8 (H, W).

    image_size=None: the file must be 256 x 256 and is returned as is.
    image_size=N: the image is resized to N x N (antialiased) unless it already is N x N.
    """
    _check_image_size(image_size)
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


def _check_image_size(image_size: int | None) -> None:
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"--image-size must be a positive integer, got {image_size!r}")


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# --------------------------------------------------------------------------- caching


def _cache_prefix(root: Path, split: str, image_size: int | None) -> str:
    root_digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    return f"slices_{root_digest}_{split}_{image_size or 'native'}_"


def _files_fingerprint(root: Path, split: str, image_size: int | None, files: list[Path]) -> str:
    # Names, sizes and mtimes are cheap to stat and change whenever a file is replaced.
    digest = hashlib.sha256()
    digest.update(f"v{CACHE_FORMAT_VERSION}\0{root}\0{split}\0{image_size}\n".encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _read_cache(cache_file: Path, n_files: int) -> SliceSet | None:
    if not cache_file.is_file():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as saved:
            slices = SliceSet(
                images=saved["images"],
                case_ids=saved["case_ids"],
                slice_idx=saved["slice_idx"].astype(np.int64),
                files=[str(name) for name in saved["files"]],
            )
    except Exception:  # a damaged cache is only a missed shortcut; decode again
        return None
    return slices if len(slices) == n_files else None


def _write_cache_atomically(cache_file: Path, slices: SliceSet) -> None:
    write_atomically(cache_file, lambda f: np.savez(f, images=slices.images, case_ids=slices.case_ids,
                                                    slice_idx=slices.slice_idx, files=np.array(slices.files)))


def write_atomically(path, write) -> None:
    """Write a file through write(binary file object) so that it is either the old or the new
    one: a temporary file in the same folder (so os.replace is a rename), synced, then renamed.
    Every file that must survive a kill mid-write goes through here: checkpoints, the slice
    cache, the demo set's completion marker."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, 0o644)  # mkstemp makes 0600 files; checkpoints and caches are meant to be shared
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _remove_stale_caches(cache_dir: Path, prefix: str, keep: Path) -> None:
    # Older versions of this split at this size would otherwise pile up after every edit.
    for old in cache_dir.glob(f"{prefix}*.npz"):
        if old != keep:
            old.unlink(missing_ok=True)


def _decode_files(files: list[Path], split: str, image_size: int | None, progress: bool) -> SliceSet:
    side = image_size or NATIVE_SIZE
    images = np.empty((len(files), side, side), dtype=np.uint8)
    for i, path in enumerate(tqdm(files, desc=f"decoding {split}", unit="slice", disable=not progress)):
        images[i] = read_slice(path, image_size)
    names = [path.name for path in files]
    parsed = [parse_slice_name(name) for name in names]
    return SliceSet(
        images=images,
        case_ids=np.array([case_id for case_id, _ in parsed], dtype=str),
        slice_idx=np.array([number for _, number in parsed], dtype=np.int64),
        files=names,
    )


def load_split(
    root,
    split: str,
    image_size: int | None = NATIVE_SIZE,
    cache_dir=DEFAULT_CACHE_DIR,
    progress: bool = True,
) -> SliceSet:
    """Every slice of a split as one uint8 array, decoded once and cached as .npz.

    image_size=256 (the default) keeps 256 x 256 files untouched and resizes any other
    size to 256; image_size=None instead insists every file is 256 x 256. The cache key
    covers the resolved root, split, size and each file's name, size and mtime, so editing,
    adding or removing a slice invalidates it. cache_dir=None turns caching off.
    """
    _check_image_size(image_size)
    files = list_split_files(root, split)  # errors name the root as the caller gave it
    if cache_dir is None:
        return _decode_files(files, split, image_size, progress)
    cache_dir = Path(cache_dir)
    resolved = Path(root).resolve()
    prefix = _cache_prefix(resolved, split, image_size)
    cache_file = cache_dir / f"{prefix}{_files_fingerprint(resolved, split, image_size, files)}.npz"
    cached = _read_cache(cache_file, len(files))
    if cached is not None:
        return cached
    slices = _decode_files(files, split, image_size, progress)
    try:
        _write_cache_atomically(cache_file, slices)
        _remove_stale_caches(cache_dir, prefix, keep=cache_file)
    except OSError as error:  # a read-only checkout can still train, just slower to start
        print(f"warning: could not write cache {cache_file}: {one_line(error)}", file=sys.stderr)
    return slices


def load_split_tensor(
    root,
    split: str,
    image_size: int | None = NATIVE_SIZE,
    device="cpu",
    cache_dir=DEFAULT_CACHE_DIR,
    progress: bool = True,
):
    """`load_split` as a uint8 tensor (N, 1, H, W) on `device`, plus the SliceSet.

    Kept uint8 so a whole split sits on the GPU at a quarter of the float size; scale to
    [0, 1] per batch."""
    import torch  # only this helper needs torch; the demo and --stats run without it

    slices = load_split(root, split, image_size=image_size, cache_dir=cache_dir, progress=progress)
    return torch.from_numpy(slices.images).unsqueeze(1).to(device), slices


def resolve_data_root(data: str, demo_dir=DEFAULT_DEMO_DIR, seed: int = 0) -> Path:
    """`--data` value -> folder. "demo" means demo_dir, built there first if not complete
    (or built with another seed); any other value is taken as the OASIS root as is."""
    if data != "demo":
        return Path(data)
    from demo import demo_is_complete, make_demo  # here, not at the top: demo.py builds on this module

    demo_dir = Path(demo_dir)
    if not demo_is_complete(demo_dir, seed=seed):
        print(f"building the synthetic demo set in {demo_dir} (seed {seed}); later runs reuse it")
        make_demo(demo_dir, seed=seed)
    return demo_dir


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    from utils import OneLineErrorParser  # here: loading slices needs none of utils' imports

    parser = OneLineErrorParser(description="OASIS slice loading, statistics and the synthetic demo set.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--make-demo", metavar="DIR", help="build the synthetic demo set in DIR")
    action.add_argument("--stats", action="store_true", help="print per-split counts and image statistics of --data")
    parser.add_argument("--data", default="demo", help='OASIS root folder, or "demo" for the synthetic set (default: demo)')
    parser.add_argument("--demo-dir", default=DEFAULT_DEMO_DIR, help=f"where --data demo lives (default: {DEFAULT_DEMO_DIR})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic demo set (default: 0)")
    parser.add_argument("--image-size", type=int, default=NATIVE_SIZE, help="side length to load slices at (default: 256)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help=f"decoded-slice cache folder (default: {DEFAULT_CACHE_DIR})")
    parser.add_argument("--no-cache", action="store_true", help="decode every PNG, read and write no cache")
    return parser


def _run(args: argparse.Namespace) -> None:
    from demo import format_split_stats, make_demo  # here, not at the top: demo.py builds on this module

    if args.make_demo:
        started = time.perf_counter()
        out_dir = make_demo(args.make_demo, seed=args.seed)
        print(f"demo set written to {out_dir} in {time.perf_counter() - started:.1f} s")
        return
    root = resolve_data_root(args.data, demo_dir=args.demo_dir, seed=args.seed)
    cache_dir = None if args.no_cache else args.cache_dir
    print(f"data: {root}  (foreground = pixels > {FOREGROUND_THRESHOLD} of full scale; bbox in px)")
    for split in SPLITS:
        slices = load_split(root, split, image_size=args.image_size, cache_dir=cache_dir)
        print(format_split_stats(split, slices))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _run(args)
    except (DataError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
