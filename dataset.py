"""Whole splits of OASIS slices, decoded once and cached; `--data demo`; the data command line.

`load_split` decodes a split (slices.py reads each file) into one uint8 array and caches it
under `.cache/`. `--data demo` (resolve_data_root) stands for the synthetic stand-in that
demo.py builds in the same layout from the MNI152 template that ships inside nilearn, so
everything runs offline.

Command line:
    python dataset.py --make-demo data/demo [--seed 0]
    python dataset.py --data path/to/keras_png_slices_data --stats
    python dataset.py --data demo --stats        # builds data/demo first if needed
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from brain import fine_scale_noise, head_rim_profile, outline_roughness, scalp_and_skull_depth, slice_statistics
from cli import OneLineErrorParser
from demo import demo_is_complete, make_demo
from errors import DataError, OutputError, one_line
from files import write_atomically
from slices import (FOREGROUND_THRESHOLD, NATIVE_SIZE, SPLITS, SliceSet, check_image_size, list_split_files,
                    parse_slice_name, read_slice)

DEFAULT_DEMO_DIR = "data/demo"
DEFAULT_CACHE_DIR = ".cache"
# Bump when the cache file's contents change meaning, so old caches are not trusted.
CACHE_FORMAT_VERSION = 1


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
    check_image_size(image_size)
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
    except (OutputError, OSError) as error:  # a read-only checkout can still train, just slower to start
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
    slices = load_split(root, split, image_size=image_size, cache_dir=cache_dir, progress=progress)
    return torch.from_numpy(slices.images).unsqueeze(1).to(device), slices


def resolve_data_root(data: str, demo_dir=DEFAULT_DEMO_DIR, seed: int = 0) -> Path:
    """`--data` value -> folder. "demo" means demo_dir, built there first if not complete
    (or built with another seed); any other value is taken as the OASIS root as is."""
    if data != "demo":
        return Path(data)
    demo_dir = Path(demo_dir)
    if not demo_is_complete(demo_dir, seed=seed):
        print(f"building the synthetic demo set in {demo_dir} (seed {seed}); later runs reuse it")
        make_demo(demo_dir, seed=seed)
    return demo_dir


# --------------------------------------------------------------------------- command line


def format_split_stats(split: str, slices: SliceSet) -> str:
    stats = {**slice_statistics(slices.images), **fine_scale_noise(slices.images, progress=True),
             "outline_roughness": outline_roughness(slices.images)}
    parts = [f"{split:9s} {len(np.unique(slices.case_ids)):4d} cases {len(slices):6d} slices"]
    for label, key, fmt in (
        ("foreground", "foreground", ".3f"),
        ("mean", "mean", ".3f"),
        ("bbox h", "bbox_height", ".0f"),
        ("bbox w", "bbox_width", ".0f"),
        ("halo noise sd", "halo_noise_sd", ".4f"),
        ("corr", "halo_noise_corr", ".2f"),
        ("white matter sd", "white_matter_sd", ".4f"),
        ("corr", "white_matter_corr", ".2f"),
        ("outline roughness", "outline_roughness", ".2f"),
    ):
        values = stats[key][np.isfinite(stats[key])]
        if values.size:
            parts.append(f"{label} {values.mean():{fmt}} [{values.min():{fmt}}, {values.max():{fmt}}]")
    rim = scalp_and_skull_depth(head_rim_profile(slices.images))
    if rim:
        parts.append(f"scalp peak {rim[0]} px, skull {rim[1]} px in from the head's edge")
    return " | ".join(parts)


def build_parser() -> argparse.ArgumentParser:
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
