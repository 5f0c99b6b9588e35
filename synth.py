"""One synthetic subject's slices, from the MNI152 template that ships inside nilearn, and
every number the generator is tuned with (`DemoTuning`, TUNING).

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
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from errors import DataError, one_line
from slices import NATIVE_SIZE

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
DEMO_VERSION = 3


@dataclass(frozen=True)
class DemoTuning:
    """Every number the generator is tuned with. (low, high) pairs are the bounds of a
    uniform draw per subject; wave fields are (number of plane waves, wavelength range in
    mm, RMS) of a smooth random field. Changing any of them changes the demo set: bump
    DEMO_VERSION with it."""

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
def build_head_model() -> _HeadModel:
    # Cached: a pure function of nilearn's template, ~3 s to build and ~50 MB to keep.
    try:
        from nilearn.datasets import load_mni152_brain_mask, load_mni152_template
    except ImportError as error:
        raise DataError(f"building the demo set needs nilearn ({one_line(error)})") from None
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


def synthesize_subject(model: _HeadModel, seed: int, subject: int, n_slices: int,
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

