"""The synthetic demo set: an OASIS look-alike in the OASIS layout, built from the MNI152
template that ships inside nilearn (synth.py draws each subject), so everything runs offline.

    python dataset.py --make-demo data/demo [--seed 0]   # dataset.py's command line calls make_demo

`make_demo` writes the set; `demo_is_complete` tells a finished build of a configuration;
`demo_noise_free_split` gives the slices' noise-free twins, the best any reconstruction can do.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from errors import DataError
from files import write_atomically
from slices import NATIVE_SIZE, SPLIT_DIR_PREFIX, SPLITS, resize_gray
from synth import DEMO_VERSION, build_head_model, synthesize_subject

_DEMO_MARKER = "demo_complete.json"


def _demo_config(seed: int, n_train: int, n_validate: int, n_test: int, n_slices: int) -> dict:
    return {
        "version": DEMO_VERSION,
        "seed": seed,
        "cases": {"train": n_train, "validate": n_validate, "test": n_test},
        "n_slices": n_slices,
    }


def _demo_case_ids(config: dict) -> dict[str, list[str]]:
    # Case ids run 001, 002, ... across the splits, so no case is in two splits.
    ids, start = {}, 1
    for split in SPLITS:
        count = config["cases"][split]
        ids[split] = [f"{number:03d}" for number in range(start, start + count)]
        start += count
    return ids


def demo_is_complete(out_dir, seed: int = 0, n_train=40, n_validate=6, n_test=4, n_slices=32) -> bool:
    """True when out_dir holds a finished demo build with exactly this configuration."""
    out_dir = Path(out_dir)
    marker = out_dir / _DEMO_MARKER
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    config = _demo_config(seed, n_train, n_validate, n_test, n_slices)
    if recorded != config:
        return False
    for split in SPLITS:
        folder = out_dir / f"{SPLIT_DIR_PREFIX}{split}"
        expected = config["cases"][split] * n_slices
        if not folder.is_dir() or sum(1 for _ in folder.glob("case_*_slice_*.nii.png")) != expected:
            return False
    return True


def _prepare_demo_dir(out_dir: Path) -> None:
    # Only ever clear out our own files: out_dir comes from the command line.
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: demo path is a file, expected a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    ours = {_DEMO_MARKER} | {f"{SPLIT_DIR_PREFIX}{split}" for split in SPLITS}
    # (a marker's temporary file, left by a kill mid-write, starts with ".demo_complete.json")
    strangers = sorted(entry.name for entry in out_dir.iterdir()
                       if entry.name not in ours and not entry.name.startswith(f".{_DEMO_MARKER}"))
    if strangers:
        raise DataError(f"{out_dir}: refusing to build the demo set in a folder holding other files ({strangers[0]})")
    (out_dir / _DEMO_MARKER).unlink(missing_ok=True)
    for split in SPLITS:
        folder = out_dir / f"{SPLIT_DIR_PREFIX}{split}"
        folder.mkdir(exist_ok=True)
        for old in folder.glob("case_*_slice_*.nii.png"):
            old.unlink()


def _write_marker_atomically(out_dir: Path, config: dict) -> None:
    write_atomically(out_dir / _DEMO_MARKER, lambda f: f.write((json.dumps(config, indent=1) + "\n").encode()))


def make_demo(
    out_dir,
    seed: int = 0,
    n_train: int = 40,
    n_validate: int = 6,
    n_test: int = 4,
    n_slices: int = 32,
    progress: bool = True,
) -> Path:
    """Write a synthetic OASIS look-alike (MNI152-based subjects) in the OASIS layout.

    Deterministic in `seed`; each subject depends only on (seed, its number). The marker
    file is written last, so an interrupted build is seen as incomplete and rebuilt."""
    for name, count in (("n_train", n_train), ("n_validate", n_validate), ("n_test", n_test), ("n_slices", n_slices)):
        if count < 1:
            raise DataError(f"make_demo: {name} must be at least 1, got {count}")
    if seed < 0:
        raise DataError(f"make_demo: seed must be non-negative, got {seed}")
    out_dir = Path(out_dir)
    config = _demo_config(seed, n_train, n_validate, n_test, n_slices)
    model = build_head_model()  # first: if nilearn is missing, leave any old build alone
    _prepare_demo_dir(out_dir)
    jobs = [(split, case_id) for split, ids in _demo_case_ids(config).items() for case_id in ids]
    for split, case_id in tqdm(jobs, desc="demo subjects", unit="subject", disable=not progress):
        slices = synthesize_subject(model, seed, int(case_id), n_slices)
        folder = out_dir / f"{SPLIT_DIR_PREFIX}{split}"
        for number, pixels in enumerate(slices):
            Image.fromarray(pixels, mode="L").save(folder / f"case_{case_id}_slice_{number}.nii.png", compress_level=1)
    _write_marker_atomically(out_dir, config)
    return out_dir


def _recorded_demo_config(root) -> dict | None:
    """The configuration a finished demo build in root was made with, or None."""
    try:
        config = json.loads((Path(root) / _DEMO_MARKER).read_text())
        complete = demo_is_complete(root, seed=config["seed"], n_train=config["cases"]["train"],
                                    n_validate=config["cases"]["validate"], n_test=config["cases"]["test"],
                                    n_slices=config["n_slices"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return config if complete else None


def demo_noise_free_split(root, split: str, image_size: int = NATIVE_SIZE) -> np.ndarray | None:
    """The noise-free twins of a demo build's slices (uint8 (N, H, W), in load order), or
    None when root holds no finished demo build.

    A VQ-VAE cannot store noise in its codes, so the SSIM of the twins against the slices
    is about the best its reconstructions can score."""
    config = _recorded_demo_config(root)
    if config is None:
        return None
    model = build_head_model()
    twins = []
    for case_id in _demo_case_ids(config)[split]:  # case order = load order; slices 0..k-1 within
        for pixels in synthesize_subject(model, config["seed"], int(case_id), config["n_slices"], noise_free=True):
            twins.append(pixels if image_size == NATIVE_SIZE else resize_gray(pixels, image_size))
    return np.stack(twins)

