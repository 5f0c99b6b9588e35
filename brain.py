"""The head and the brain of a slice, and the image statistics measured with them.

The statistics (`slice_statistics`, `fine_scale_noise`, `head_rim_profile`,
`outline_roughness`, `dark_holes`) measure real and demo slices alike: the demo set is tuned
against them, predict.py's realism figures reuse the shape ones, and the lesion benchmark
draws inside `brain_region`.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from slices import FOREGROUND_THRESHOLD, NATIVE_SIZE

# The scalp and the dark skull lie up to about 13 px in from the head's edge at 256 x 256;
# what lies further in is brain.
BRAIN_RIM_PX_AT_256 = 16
# Gaps in the scalp's outline up to about twice this wide are closed before the head is filled.
HEAD_CLOSING_PX_AT_256 = 4


def head_mask(image):
    """Everything inside the outline of the head of one slice (uint8, or floats in [0, 1]): its
    foreground, closed over gaps in the scalp, with the holes (ventricles, dark skull) filled;
    its largest region."""
    image = as_unit(image)
    closing = max(1, round(HEAD_CLOSING_PX_AT_256 * image.shape[-1] / NATIVE_SIZE))
    foreground = np.pad(image > FOREGROUND_THRESHOLD, closing)  # room to close at the border
    closed = ndimage.binary_closing(foreground, iterations=closing)[closing:-closing, closing:-closing]
    return _largest_component(ndimage.binary_fill_holes(closed))


def brain_region(image):
    """The brain of one slice (uint8, or floats in [0, 1]): its head, less the rim of scalp and skull."""
    rim = BRAIN_RIM_PX_AT_256 * image.shape[-1] / NATIVE_SIZE
    return ndimage.distance_transform_edt(head_mask(image)) > rim


def as_unit(image):
    """A slice as floats in [0, 1]: uint8 pixels scaled, floats as they are."""
    image = np.asarray(image)
    return image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image

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
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    return labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1


def head_rim_profile(images: np.ndarray, max_depth: int = 24) -> np.ndarray:
    """Mean intensity (0..1) against depth in pixels from the head's outer edge, pooled over
    slices; entry d is depth d (entry 0 is NaN). In these T1 slices it rises to the bright
    scalp a few pixels in, falls to the dark skull, then rises again into the brain."""
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
# At 256 x 256, scaled with the slice: the smallest spot that counts.
_HOLE_MIN_AREA_AT_256 = 40


def dark_holes(images: np.ndarray, level: float = DARK_HOLE_LEVEL) -> np.ndarray:
    """Per 8-bit slice, how many black spots lie inside the head, away from its rim:
    connected regions darker than `level` of full scale, of a few pixels or more."""
    counts = []
    for plane in images:
        scale = plane.shape[-1] / NATIVE_SIZE
        labels, n = ndimage.label((as_unit(plane) < level) & brain_region(plane))
        areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        counts.append(int((areas >= max(1, round(_HOLE_MIN_AREA_AT_256 * scale ** 2))).sum()))
    return np.array(counts, dtype=np.int64)


def _extent(occupied: np.ndarray) -> int:
    where = np.flatnonzero(occupied)
    return int(where[-1] - where[0] + 1) if where.size else 0


