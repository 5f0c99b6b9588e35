"""The synthetic demo set: an OASIS look-alike built from the MNI152 template that ships
inside nilearn, so everything runs offline, and the image statistics it is tuned against.

    python dataset.py --make-demo data/demo [--seed 0]   # dataset.py's command line calls make_demo
    python dataset.py --data demo --stats                 # and format_split_stats

`make_demo` writes the set in the OASIS layout (see dataset.py); every number the generator
is tuned with is a named field of `DemoTuning` (TUNING). The statistics (`slice_statistics`,
`fine_scale_noise`, `head_rim_profile`, `outline_roughness`, `dark_holes`, ...) measure real
and demo slices alike; the realism figures of predict.py reuse the shape ones.

Geometry measured on the real OASIS PNGs: they are the 176 x 208 mm (left-right x
back-front) Talairach field of view at 1 mm per pixel, pasted at rows 40..215 and
columns 24..231 of a 256 x 256 canvas, front of the head to the right. The 32 slices
of a case run from the level of the third ventricle / ventricular atria up to the
bodies of the lateral ventricles, which is MNI z of about +3 to +30 mm. The heads are
not skull-stripped: a thin dark skull and a bright scalp (the brightest tissue, so it
sets the 255 of the min-max scaling) surround the brain, and a faint noisy halo with
ragged left and right edges (the scanner background left by OASIS's masking) sits
around the head.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from dataset import (FOREGROUND_THRESHOLD, NATIVE_SIZE, SPLIT_DIR_PREFIX, SPLITS, DataError, SliceSet,
                     one_line, resize_gray, write_atomically)

_DEMO_MARKER = "demo_complete.json"
_FOV_ROWS = (40, 216)
_FOV_COLS = (24, 232)
_CANVAS_CENTRE = (NATIVE_SIZE - 1) / 2
_BAND_CENTRE_Z_MM = 16.0
# Centre of the template's brain bounding box in the band, MNI mm (x, y).
_BRAIN_CENTRE_XY_MM = (0.0, -17.0)
# Template z range to keep: the band (z ~ +3..+31) plus room for tilt, deformation and
# the skull closing below, which must not see the crop's edge.
_MODEL_Z_RANGE_MM = (-30.0, 62.0)
_MODEL_PAD_MM = 24
_FAR_OUTSIDE_MM = 1000.0
# Bumped whenever the generator's output changes, so an older build is rebuilt, not reused.
_DEMO_VERSION = 3


@dataclass(frozen=True)
class DemoTuning:
    """Every number the generator is tuned with. (low, high) pairs are the bounds of a
    uniform draw per subject; wave fields are (number of plane waves, wavelength range in
    mm, RMS) of a smooth random field. Changing any of them changes the demo set: bump
    _DEMO_VERSION with it."""

    # -- the head model
    # The skull is convex where the brain has notches (between the hemispheres, front and
    # back), so skull and scalp are laid around the brain closed with a ball this size.
    skull_closing_mm: float = 15.0
    # Template-intensity stand-in for the CSF and meninges between brain and skull, and the
    # depth of the brain mask's rim raised to it.
    meninges_t1: float = 0.5
    meninges_rim_mm: float = 1.5
    # -- where the slices lie and how each subject's head is deformed
    band_start_mm: tuple = (3.0, 6.0)
    band_span_mm: tuple = (21.0, 25.0)
    scale: tuple = ((0.94, 1.07), (0.95, 1.08), (0.95, 1.05))
    rotation_deg: tuple = ((-4, 4), (-2, 2), (-5, 5))
    shift_mm: tuple = ((-3, 3), (-4, 4), (-1.5, 1.5))
    elastic_waves: tuple = (3, (50.0, 140.0), 1.8)
    # The template's head tapers at the front; real OASIS heads fill more of their bounding
    # box. Diagonal points are pulled inwards by up to this much (x, y half-widths in mm).
    fullness: tuple = (0.0, 0.15)
    fullness_half_width_mm: tuple = (80.0, 100.0)
    # Ventricles and sulci widen with age: a radial pull of this strength towards this centre.
    ventricle_pull: tuple = (0.0, 0.3)
    ventricle_centre_mm: tuple = (0.0, -12.0, 16.0)
    ventricle_width_mm: float = 18.0
    # -- brain intensities: template T1 knots mapped to the real slices' levels
    atrophy: tuple = (0.0, 1.0)
    knee: float = 0.45
    knee_per_atrophy: float = 0.10
    csf: tuple = (0.05, 0.075)
    grey: tuple = (0.22, 0.27)
    white: tuple = (0.43, 0.49)
    csf_plateau_t1: float = 0.3
    t1_knots_above_knee: tuple = (0.66, 0.78, 0.88, 1.0)
    csf_step: float = 0.05
    white_top_step: float = 0.03
    sharpen: tuple = (0.4, 0.9)
    sharpen_blur_px: float = 1.2
    # -- the layers around the brain
    csf_mm: tuple = (0.5, 1.5)
    skull_mm: tuple = (2.0, 4.0)
    skull_level: tuple = (0.12, 0.20)
    # Scalp and halo widths matched to the real slices (mean intensity against depth from the
    # head's edge; the outline's perimeter against its area).
    scalp_mm: tuple = (5.5, 9.0)
    scalp_mm_waves: tuple = (2, (120.0, 250.0), 1.0)
    scalp_peak: float = 0.8
    scalp_peak_waves: tuple = (3, (60.0, 160.0), 0.12)
    scalp_peak_range: tuple = (0.5, 1.0)
    # sin(pi s^p) across the scalp: a steep rise from the skull, then a gentler fall.
    scalp_profile_power: float = 0.75
    halo_reach_mm: tuple = (5.0, 11.0)
    halo_push_px: int = 5
    halo_band_rows: int = 4
    # -- the scanner: bias field, contrast, noise
    bias_waves: tuple = (3, (150.0, 400.0), 0.08)
    gamma: tuple = (0.85, 1.15)
    # Noise matched to the real slices (`dataset.py --stats`): halo noise s.d. ~0.006 with
    # neighbour correlation ~0.3; flat white matter's fine-scale s.d. ~0.016 with correlation ~0.6.
    noise_blur_px: float = 0.6
    rician_sigma: tuple = (0.007, 0.013)
    halo_level: tuple = (0.03, 0.045)
    halo_spread: float = 0.17
    halo_floor: float = 0.004
    # Min-max per slice like OASIS, with the top of the head's pixels saturated.
    saturated_percentile: float = 99.95


TUNING = DemoTuning()


@dataclass
class _HeadModel:
    """The MNI152 T1 template cropped around the band, in 1 mm voxels."""

    t1: np.ndarray  # float32 (X, Y, Z), template intensity in 0..1; TUNING.meninges_t1 outside the brain
    outside_mm: np.ndarray  # float32 (X, Y, Z), distance outside the smoothed brain outline
    origin_mm: np.ndarray  # MNI mm of voxel (0, 0, 0)


@functools.lru_cache(maxsize=1)
def _build_head_model() -> _HeadModel:
    # Cached: a pure function of nilearn's template, ~3 s to build and ~50 MB to keep.
    try:
        from nilearn.datasets import load_mni152_brain_mask, load_mni152_template
        from scipy import ndimage
    except ImportError as error:
        raise DataError(f"building the demo set needs nilearn and scipy ({one_line(error)})") from None
    template = load_mni152_template(resolution=1)
    brain_mask = load_mni152_brain_mask(resolution=1)
    affine = template.affine
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise DataError("nilearn MNI152 template: expected a 1 mm RAS grid")
    z_lo, z_hi = (int(round(z - affine[2, 3])) for z in _MODEL_Z_RANGE_MM)
    t1 = template.get_fdata(dtype=np.float32)[:, :, z_lo:z_hi]
    brain = brain_mask.get_fdata(dtype=np.float32)[:, :, z_lo:z_hi] > 0.5
    # Outside the mask gets a dark-grey value, not 0: interpolating from brain down to 0
    # would pass through the ventricles' near-black and draw a black contour round the brain.
    t1 = np.where(brain, t1, TUNING.meninges_t1)
    # Likewise the mask's own outer rim is mostly CSF in the template (a dark ring in the
    # output); in the real slices that layer is dark grey, like the meninges.
    rim = brain & (ndimage.distance_transform_edt(brain) <= TUNING.meninges_rim_mm)
    t1 = np.where(rim, np.maximum(t1, TUNING.meninges_t1), t1).astype(np.float32)
    pad = ((_MODEL_PAD_MM, _MODEL_PAD_MM), (_MODEL_PAD_MM, _MODEL_PAD_MM), (0, 0))
    t1 = np.pad(t1, pad)
    brain = np.pad(brain, pad)
    outside_mm = ndimage.distance_transform_edt(~_close_with_ball(brain, TUNING.skull_closing_mm)).astype(np.float32)
    origin = affine[:3, 3] + np.array([-_MODEL_PAD_MM, -_MODEL_PAD_MM, z_lo])
    return _HeadModel(t1=t1, outside_mm=outside_mm, origin_mm=origin.astype(np.float32))


def _close_with_ball(mask: np.ndarray, radius_mm: float) -> np.ndarray:
    # Morphological closing via two distance transforms: far cheaper than a ball-shaped
    # structuring element this large.
    from scipy import ndimage

    dilated = ndimage.distance_transform_edt(~mask) <= radius_mm
    return ndimage.distance_transform_edt(dilated) > radius_mm


def _along(weights, axes) -> np.ndarray:
    """w . (x, y, z) at every canvas voxel, by broadcasting the separable grid axes."""
    x, y, z = axes
    return (
        np.float32(weights[0]) * x[None, :, None]
        + np.float32(weights[1]) * y[None, None, :]
        + np.float32(weights[2]) * z[:, None, None]
    )


def _random_plane_waves(rng: np.random.Generator, axes, n_waves: int, wavelength_mm, rms: float) -> np.ndarray:
    """A smooth random scalar field on the canvas grid: a sum of random plane waves.

    Evaluated directly at each voxel, so no coarse grid has to be built and interpolated."""
    directions = rng.normal(size=(n_waves, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavenumbers = 2 * np.pi / rng.uniform(*wavelength_mm, size=n_waves)
    phases = rng.uniform(0, 2 * np.pi, size=n_waves)
    field = np.zeros((len(axes[2]), len(axes[0]), len(axes[1])), dtype=np.float32)
    for direction, wavenumber, phase in zip(directions, wavenumbers, phases):
        field += np.sin(_along(direction * wavenumber, axes) + np.float32(phase))
    # Each unit sine has RMS 1/sqrt(2); independent phases add in quadrature.
    return field * np.float32(rms * np.sqrt(2.0 / n_waves))


def _rotation_matrix(angles_deg) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rot_x = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rot_y = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rot_z = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


def _canvas_axes_mm(rng: np.random.Generator, n_slices: int):
    """Subject-space mm of the field of view's rows (x, left-right), columns (y, back to
    front, front on the right) and slices (z, evenly spaced through the ventricle band)."""
    band_start = rng.uniform(*TUNING.band_start_mm)
    band_span = rng.uniform(*TUNING.band_span_mm)
    fractions = np.linspace(0.0, 1.0, n_slices) if n_slices > 1 else np.array([0.5])
    z = (band_start + band_span * fractions).astype(np.float32)
    x = np.arange(*_FOV_ROWS, dtype=np.float32) - np.float32(_CANVAS_CENTRE)
    y = np.arange(*_FOV_COLS, dtype=np.float32) - np.float32(_CANVAS_CENTRE)
    return x, y, z


def _subject_to_template_mm(rng: np.random.Generator, axes) -> np.ndarray:
    """Template mm (3, S, H, W) that each canvas voxel samples: a random smooth deformation
    (anisotropic scale, small rotation, shift, elastic waves, ventricle enlargement)."""
    scale = np.array([rng.uniform(*bounds) for bounds in TUNING.scale])
    rotation = _rotation_matrix([rng.uniform(*bounds) for bounds in TUNING.rotation_deg])
    shift = np.array([rng.uniform(*bounds) for bounds in TUNING.shift_mm])
    linear = (rotation / scale[None, :]).astype(np.float32)
    x, y, z = axes
    x_full, y_full = _fuller_outline(rng, x, y)
    z_centred = (z - np.float32(_BAND_CENTRE_Z_MM))[:, None, None]
    template_centre = np.array([*_BRAIN_CENTRE_XY_MM, _BAND_CENTRE_Z_MM]) + shift
    mapped = np.stack(
        [
            linear[axis, 0] * x_full + linear[axis, 1] * y_full + linear[axis, 2] * z_centred
            + np.float32(template_centre[axis])
            for axis in range(3)
        ]
    )
    for axis in range(3):
        mapped[axis] += _random_plane_waves(rng, axes, *TUNING.elastic_waves)
    return _enlarge_ventricles(rng, mapped)


def _fuller_outline(rng: np.random.Generator, x: np.ndarray, y: np.ndarray):
    # The template's head tapers at the front; real OASIS heads fill more of their bounding
    # box (RESULTS.md). Pulling diagonal points inwards fills the corners out.
    fullness = np.float32(rng.uniform(*TUNING.fullness))
    half_x, half_y = TUNING.fullness_half_width_mm
    xx, yy = x[:, None] / np.float32(half_x), y[None, :] / np.float32(half_y)
    pull = 1 - fullness * np.minimum(xx * xx * yy * yy, 1.0)
    return (x[:, None] * pull)[None], (y[None, :] * pull)[None]


def _enlarge_ventricles(rng: np.random.Generator, mapped: np.ndarray) -> np.ndarray:
    # Ventricles and sulci widen with age (OASIS spans 18-96 years); a radial pull towards
    # the ventricles magnifies them. r -> r(1 - s exp(-r^2/2w^2)) stays monotone for s < 1.
    strength = np.float32(rng.uniform(*TUNING.ventricle_pull))
    centre = np.array(TUNING.ventricle_centre_mm, dtype=np.float32)[:, None, None, None]
    offset = mapped - centre
    width_sq = np.float32(2 * TUNING.ventricle_width_mm**2)
    pull = 1 - strength * np.exp(-(offset**2).sum(axis=0) / width_sq)
    return centre + offset * pull


def _sample(model: _HeadModel, template_mm: np.ndarray):
    from scipy import ndimage

    voxels = template_mm - model.origin_mm.astype(np.float32)[:, None, None, None]
    t1 = ndimage.map_coordinates(model.t1, voxels, order=1, mode="constant", cval=TUNING.meninges_t1)
    outside = ndimage.map_coordinates(
        model.outside_mm, voxels, order=1, mode="constant", cval=_FAR_OUTSIDE_MM
    )
    return t1, outside


def _brain_intensity(rng: np.random.Generator, t1: np.ndarray) -> np.ndarray:
    # Template values: CSF ~0.2-0.4, grey ~0.6-0.7, white ~0.85. Real OASIS slices (as a
    # fraction of the scalp-set maximum): ventricles ~0.07, grey ~0.3, white ~0.48. Atrophy
    # pushes the CSF/grey partial-volume knee up, which opens the sulci as in older subjects.
    atrophy = rng.uniform(*TUNING.atrophy)
    knee = TUNING.knee + TUNING.knee_per_atrophy * atrophy
    csf = rng.uniform(*TUNING.csf)
    grey = rng.uniform(*TUNING.grey)
    white = rng.uniform(*TUNING.white)
    knots_t1 = [0.0, TUNING.csf_plateau_t1, knee, *TUNING.t1_knots_above_knee]
    knots_out = [csf, csf, csf + TUNING.csf_step, grey, 0.5 * (grey + white), white, white + TUNING.white_top_step]
    return np.interp(t1, knots_t1, knots_out).astype(np.float32)


def _head_intensity(rng: np.random.Generator, t1: np.ndarray, outside: np.ndarray, axes):
    """Float image in about 0..1 (scalp ~1), the head mask, and the head's outer edge in mm."""
    csf_mm = rng.uniform(*TUNING.csf_mm)
    skull_mm = rng.uniform(*TUNING.skull_mm)
    # Scalp thickness varies around the head in the real slices.
    scalp_mm = rng.uniform(*TUNING.scalp_mm) + _random_plane_waves(rng, axes, *TUNING.scalp_mm_waves)
    # Fat under the scalp is patchy: its brightness varies around the head.
    scalp_peak = np.clip(TUNING.scalp_peak + _random_plane_waves(rng, axes, *TUNING.scalp_peak_waves),
                         *TUNING.scalp_peak_range)
    brain = _sharpen_in_plane(rng, _brain_intensity(rng, t1))
    skull_start = csf_mm
    scalp_start = csf_mm + skull_mm
    head_edge = scalp_start + scalp_mm
    across_scalp = np.clip((outside - scalp_start) / scalp_mm, 0.0, 1.0)
    # Measured profile: a steep rise from the skull to the fat just under it, then a
    # gentler fall through muscle and skin; sin(pi s^0.75) peaks 40 % of the way out.
    scalp = scalp_peak * np.clip(np.sin(np.pi * across_scalp**TUNING.scalp_profile_power), 0.0, None)
    skull = np.float32(rng.uniform(*TUNING.skull_level))
    image = np.where(outside <= skull_start, brain, np.where(outside <= scalp_start, skull, scalp))
    head = outside < head_edge
    return np.where(head, image, 0).astype(np.float32), head, head_edge


def _sharpen_in_plane(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    # The template is an average of 152 brains and looks soft; single scans are crisper.
    from scipy import ndimage

    amount = np.float32(rng.uniform(*TUNING.sharpen))
    blurred = ndimage.gaussian_filter(image, sigma=(0, TUNING.sharpen_blur_px, TUNING.sharpen_blur_px))
    return np.clip(image + amount * (image - blurred), 0.0, None)


def _ragged_halo(rng: np.random.Generator, near_head: np.ndarray) -> np.ndarray:
    # Real halos end in ragged horizontal streaks on the left and right: fill each image
    # row between its outermost near-head pixels, pushed out by a random amount per band
    # of a few rows.
    n_slices, height, width = near_head.shape
    any_in_row = near_head.any(axis=2)
    first = near_head.argmax(axis=2)
    last = width - 1 - near_head[:, :, ::-1].argmax(axis=2)
    band_rows = TUNING.halo_band_rows
    n_bands = -(-height // band_rows)
    push = rng.integers(0, TUNING.halo_push_px, size=(2, n_slices, n_bands)).repeat(band_rows, axis=2)[:, :, :height]
    columns = np.arange(width)[None, None, :]
    inside = (columns >= (first - push[0])[..., None]) & (columns <= (last + push[1])[..., None])
    return inside & any_in_row[..., None]


def _synthesize_subject(model: _HeadModel, seed: int, subject: int, n_slices: int,
                        noise_free: bool = False) -> np.ndarray:
    """uint8 (n_slices, 256, 256) slices of one synthetic subject, a function of (seed, subject).

    noise_free=True gives the same slices before their noise is drawn (no Rician noise in
    the head, the halo at its mean level), scaled like the noisy ones: what a perfect
    denoiser would return."""
    rng = np.random.default_rng([seed, subject])
    axes = _canvas_axes_mm(rng, n_slices)
    t1, outside = _sample(model, _subject_to_template_mm(rng, axes))
    image, head, head_edge = _head_intensity(rng, t1, outside, axes)
    bias = np.exp(_random_plane_waves(rng, axes, *TUNING.bias_waves))
    gamma = np.float32(rng.uniform(*TUNING.gamma))
    signal = (image * bias) ** gamma
    image = _add_rician_noise(rng, signal, head)
    halo = _ragged_halo(rng, outside < head_edge + rng.uniform(*TUNING.halo_reach_mm)) & ~head
    floor, floor_level = _noise_floor(rng, image.shape)
    image = np.where(halo, floor, image)
    scales = _slice_scales(image, head)
    if noise_free:
        image = np.where(halo, floor_level, np.where(head, signal, 0))
    return _to_canvas_uint8(image, scales)


def _correlated_normal(rng: np.random.Generator, shape) -> np.ndarray:
    """Unit-variance Gaussian noise correlated between neighbouring pixels in-plane."""
    # The real slices' noise correlates ~0.3 with the next pixel's, where white noise
    # would give 0: most likely their resampling to the atlas grid averaged neighbours.
    from scipy import ndimage

    white = rng.standard_normal(shape, dtype=np.float32)
    smooth = ndimage.gaussian_filter(white, sigma=(0, TUNING.noise_blur_px, TUNING.noise_blur_px))
    return smooth / smooth.std()


def _add_rician_noise(rng: np.random.Generator, image: np.ndarray, head: np.ndarray) -> np.ndarray:
    # MRI magnitude images carry Rician noise, |signal + complex Gaussian|.
    sigma = np.float32(rng.uniform(*TUNING.rician_sigma))
    real_part = image + sigma * _correlated_normal(rng, image.shape)
    imaginary_part = sigma * _correlated_normal(rng, image.shape)
    return np.where(head, np.hypot(real_part, imaginary_part), 0)


def _noise_floor(rng: np.random.Generator, shape) -> tuple[np.ndarray, np.float32]:
    """The halo's noise and the level it scatters around."""
    # Real halo pixels cluster at 5-20 of 255 and rarely pass 25 (the foreground
    # threshold): narrower than Rayleigh noise, so a Gaussian around a small level.
    level = np.float32(rng.uniform(*TUNING.halo_level))
    noise = level * (1 + TUNING.halo_spread * _correlated_normal(rng, shape))
    return np.clip(noise, np.float32(TUNING.halo_floor), None), level


def _slice_scales(image: np.ndarray, head: np.ndarray) -> list:
    # Min-max per slice like OASIS, but with the top 0.05 % of head pixels saturated so a
    # single noise spike cannot dim the whole slice.
    tops = [np.percentile(plane[head_plane], TUNING.saturated_percentile) if head_plane.any() else 1.0
            for plane, head_plane in zip(image, head)]
    return [255.0 / max(top, 1e-6) for top in tops]


def _to_canvas_uint8(image: np.ndarray, scales: list) -> np.ndarray:
    slices = np.zeros((len(image), NATIVE_SIZE, NATIVE_SIZE), dtype=np.uint8)
    for k, (plane, scale) in enumerate(zip(image, scales)):
        scaled = np.clip(np.rint(plane * scale), 0, 255).astype(np.uint8)
        slices[k, _FOV_ROWS[0] : _FOV_ROWS[1], _FOV_COLS[0] : _FOV_COLS[1]] = scaled
    return slices


def _demo_config(seed: int, n_train: int, n_validate: int, n_test: int, n_slices: int) -> dict:
    return {
        "version": _DEMO_VERSION,
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
    model = _build_head_model()  # first: if nilearn is missing, leave any old build alone
    _prepare_demo_dir(out_dir)
    jobs = [(split, case_id) for split, ids in _demo_case_ids(config).items() for case_id in ids]
    for split, case_id in tqdm(jobs, desc="demo subjects", unit="subject", disable=not progress):
        slices = _synthesize_subject(model, seed, int(case_id), n_slices)
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
    model = _build_head_model()
    twins = []
    for case_id in _demo_case_ids(config)[split]:  # case order = load order; slices 0..k-1 within
        for pixels in _synthesize_subject(model, config["seed"], int(case_id), config["n_slices"], noise_free=True):
            twins.append(pixels if image_size == NATIVE_SIZE else resize_gray(pixels, image_size))
    return np.stack(twins)


# --------------------------------------------------------------------------- image statistics


def slice_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-slice foreground fraction, mean intensity and foreground bounding box (rows, cols)."""
    scaled = images.astype(np.float32) / 255.0
    foreground = scaled > FOREGROUND_THRESHOLD
    heights = np.array([_extent(mask.any(axis=1)) for mask in foreground])
    widths = np.array([_extent(mask.any(axis=0)) for mask in foreground])
    return {
        "foreground": foreground.mean(axis=(1, 2)),
        "mean": scaled.mean(axis=(1, 2)),
        "bbox_height": heights,
        "bbox_width": widths,
    }


def _std_and_neighbour_correlation(residual: np.ndarray, region: np.ndarray) -> tuple[float, float]:
    pairs = region[:, :-1] & region[:, 1:]
    if pairs.sum() < 100:
        return np.nan, np.nan
    left, right = residual[:, :-1][pairs], residual[:, 1:][pairs]
    return float(left.std()), float(np.corrcoef(left, right)[0, 1])


def fine_scale_noise(images: np.ndarray, progress: bool = False) -> dict[str, np.ndarray]:
    """Per-slice s.d. of the fine-scale residual (the slice minus a 2 px Gaussian smoothing)
    and its correlation between horizontal neighbours (0 for white noise; resampling raises
    it), in two flat regions: the faint halo around the head, where it is pure noise, and the
    white matter, where it is noise plus the tissue's own texture.

    Both regions keep only flat pixels (eroded, away from edges, where the smoothing leaves
    structure in the residual): the halo is dim but not black (under the foreground level),
    the white matter 0.38-0.65 of full scale. Slices with too few pixels give NaN."""
    from scipy import ndimage

    stats = {key: [] for key in ("halo_noise_sd", "halo_noise_corr", "white_matter_sd", "white_matter_corr")}
    for plane in tqdm(images, desc="fine-scale noise", unit="slice", disable=not progress, leave=False):
        plane = plane.astype(np.float32) / 255.0
        smooth = ndimage.gaussian_filter(plane, 2.0)
        residual = plane - smooth
        edges = np.hypot(ndimage.sobel(smooth, 0), ndimage.sobel(smooth, 1))
        dim = ndimage.binary_opening((plane > 0) & (plane < FOREGROUND_THRESHOLD))
        halo = ndimage.binary_erosion(dim, iterations=4) & (edges < 0.03)
        white = ndimage.binary_erosion((smooth > 0.38) & (smooth < 0.65), iterations=2) & (edges < 0.06)
        for name, region in (("halo_noise", halo), ("white_matter", white)):
            sd, correlation = _std_and_neighbour_correlation(residual, region)
            stats[f"{name}_sd"].append(sd)
            stats[f"{name}_corr"].append(correlation)
    return {key: np.array(values, dtype=np.float64) for key, values in stats.items()}


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    return labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1


def head_rim_profile(images: np.ndarray, max_depth: int = 24) -> np.ndarray:
    """Mean intensity (0..1) against depth in pixels from the head's outer edge, pooled over
    slices; entry d is depth d (entry 0 is NaN). In these T1 slices it rises to the bright
    scalp a few pixels in, falls to the dark skull, then rises again into the brain."""
    from scipy import ndimage

    sums, counts = np.zeros(max_depth), np.zeros(max_depth)
    for plane in images:
        head = head_mask(plane)
        plane = plane.astype(np.float32) / 255.0
        depth = np.minimum(ndimage.distance_transform_edt(head).astype(int), max_depth - 1)
        inside = head & (depth > 0)
        sums += np.bincount(depth[inside], weights=plane[inside], minlength=max_depth)
        counts += np.bincount(depth[inside], minlength=max_depth)
    with np.errstate(invalid="ignore"):
        return sums / counts


def scalp_and_skull_depth(profile: np.ndarray) -> tuple[int, int] | None:
    """Depths (px) of the rim profile's scalp maximum and of the skull minimum inside it;
    None where no slice had a head."""
    if not np.isfinite(profile[1:12]).any():
        return None
    scalp = int(np.nanargmax(profile[1:12])) + 1
    return scalp, int(np.nanargmin(profile[scalp:scalp + 14])) + scalp


def outline_roughness(images: np.ndarray) -> np.ndarray:
    """Per slice, the perimeter of the non-black region over the square root of its area:
    about 3.2 for a smooth disc, more the more ragged its edge."""
    from scipy import ndimage

    values = []
    for plane in images:
        shown = ndimage.binary_fill_holes(plane > 0)
        area = shown.sum()
        values.append((shown ^ ndimage.binary_erosion(shown)).sum() / np.sqrt(area) if area else np.nan)
    return np.array(values, dtype=np.float64)


# Black, as the background is: half as dark as the darkest real anatomy. Inside the head of real
# OASIS slices, away from the rim, the darkest 0.01 % of pixels (cerebrospinal fluid) lie at 0.04
# at both 128 and 256 px, so a spot under this level is a hole, not a ventricle.
DARK_HOLE_LEVEL = 0.02
# At 256 x 256, scaled with the slice: the rim left out (the skull, dark in T1, lies up to about
# 13 px in from the head's edge) and the smallest spot that counts.
_HOLE_RIM_PX_AT_256 = 16
_HOLE_MIN_AREA_AT_256 = 40


def head_mask(plane: np.ndarray) -> np.ndarray:
    """The head of one 8-bit slice: its largest foreground region, with the holes filled."""
    from scipy import ndimage

    return _largest_component(ndimage.binary_fill_holes(
        ndimage.binary_opening(plane.astype(np.float32) / 255.0 > FOREGROUND_THRESHOLD, iterations=2)))


def dark_holes(images: np.ndarray, level: float = DARK_HOLE_LEVEL) -> np.ndarray:
    """Per 8-bit slice, how many black spots lie inside the head, away from its rim:
    connected regions darker than `level` of full scale, of a few pixels or more."""
    from scipy import ndimage

    counts = []
    for plane in images:
        scale = plane.shape[-1] / NATIVE_SIZE
        head = head_mask(plane)
        inner = ndimage.binary_erosion(head, iterations=max(1, round(_HOLE_RIM_PX_AT_256 * scale)))
        labels, n = ndimage.label((plane.astype(np.float32) / 255.0 < level) & inner)
        areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        counts.append(int((areas >= max(1, round(_HOLE_MIN_AREA_AT_256 * scale ** 2))).sum()))
    return np.array(counts, dtype=np.int64)


def _extent(occupied: np.ndarray) -> int:
    where = np.flatnonzero(occupied)
    return int(where[-1] - where[0] + 1) if where.size else 0


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


