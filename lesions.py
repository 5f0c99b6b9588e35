"""The synthetic lesion benchmark: lesions of six kinds (LESION_KINDS) drawn into held-out
slices, with their masks, and the figures that score an anomaly map against them. Three change
the tissue's intensity (smooth-edged blobs, sharp-edged rings, textured blobs); three keep
intensities a brain has (a patch of real tissue from another slice, a dark lesion at the level of
the slice's CSF, a blob astride the grey/white-matter boundary), so that only their structure
gives them away.

Lesions are drawn in memory, deterministically from a seed; nothing is written into the data
folders. Sizes are given in pixels at 256 x 256 (the OASIS slices' own size) and scaled to the
images at hand. Everything here works on numpy arrays: slices (N, H, W) in [0, 1].
"""
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from brain import brain_region
from metrics import auroc, average_precision, dice_at
from slices import NATIVE_SIZE

# A blob's outline: a circle bent by these harmonics of the angle, each of relative amplitude
# up to MAX_BEND, so no two lesions have the same shape.
HARMONICS = (2, 3, 4)
MAX_BEND = 0.12
# The soft edge over which a lesion fades into the tissue: this share of its radius, at least 1 px.
EDGE_SHARE = 0.3
# A lesion that does not fit where it was drawn is shrunk by this factor until it does.
SHRINK = 0.8
# The bins that figures are split by: equivalent diameter (px at 256 x 256) below 10, 10 to 20,
# 20 and more; and the sign of the lesion's contrast.
SIZE_BIN_EDGES_AT_256 = (10.0, 20.0)
SIZE_BINS = ("<10px", "10-20px", ">=20px")
FROM_10PX = ">=10px"  # the two larger size bins together
CONTRAST_BINS = ("bright", "dark")
# How a lesion's contrast is laid out: blob, uniform with a soft edge; ring, a sharp-edged rim at
# full contrast round a core at RING_CORE of it; textured, a soft-edged blob whose contrast is
# mottled by a smooth random field (TEXTURE_SIGMA px at 256) between none and full.
# tissue: the pixels of another slice's brain, faded in over a blob's soft edge; csf: the
# tissue pulled to the CSF level of the slice (CSF_QUANTILE of its brain's intensities);
# straddling: a blob centred on the grey/white boundary (where the smoothed slice crosses the
# Otsu threshold of its brain's tissue brighter than CSF).
LESION_KINDS = ("blob", "ring", "textured", "tissue", "csf", "straddling")
REPLACING_KINDS = ("tissue", "csf")  # they set intensities instead of adding a contrast
CSF_QUANTILE = 0.03
BOUNDARY_SIGMA_AT_256 = 1.5
RING_CORE = 0.3
RING_WIDTH = 0.35  # of the radius
TEXTURE_SIGMA_AT_256 = 2.0


@dataclass
class LesionSet:
    """Slices with lesions drawn into some of them. Untouched slices keep their pixels, an
    all-False mask, diameter nan and contrast 0."""
    images: np.ndarray     # float32 (N, H, W) in [0, 1]: the slices as the detector sees them
    weights: np.ndarray    # float32 (N, H, W) in [0, 1]: the share of its lesion's contrast each pixel got
    masks: np.ndarray      # bool (N, H, W): the ground truth, the lesion's extent (a blob's weight >= 1/2)
    lesioned: np.ndarray   # bool (N,)
    diameters: np.ndarray  # float (N,): equivalent diameter of the mask, px at 256 x 256
    contrasts: np.ndarray  # float (N,): the intensity change a lesion's core got, after clipping (negative: darker)
    nominal: np.ndarray = None  # float (N,): the contrast it was drawn with, before clipping at 0 and 1
    kinds: np.ndarray = None  # str (N,): each lesion's LESION_KINDS entry, "" for untouched slices

    def size_bin(self):
        """The size bin (an index into SIZE_BINS) of each slice; -1 for untouched slices."""
        bins = np.digitize(self.diameters, SIZE_BIN_EDGES_AT_256)
        return np.where(self.lesioned, bins, -1)


def blob_weight(shape, centre, radius, bends, phases):
    """A smooth-edged blob: 1 inside its outline, fading to 0 over a soft edge around it, and
    exactly 0 beyond. The outline (weight 1/2) lies `radius` from the centre, bent by HARMONICS."""
    rows, cols = np.indices(shape, dtype=np.float64)
    dy, dx = rows - centre[0], cols - centre[1]
    angle = np.arctan2(dy, dx)
    outline = radius * (1 + sum(b * np.cos(k * angle + p) for k, b, p in zip(HARMONICS, bends, phases)))
    edge = max(1.0, EDGE_SHARE * radius)
    t = np.clip((outline - np.hypot(dy, dx)) / edge + 0.5, 0.0, 1.0)
    return (t * t * (3 - 2 * t)).astype(np.float32)  # smoothstep: no hard edge inside or out


def blob_reach(radius, bends):
    """How far from its centre a blob's weight can be above zero."""
    return radius * (1 + float(np.sum(bends))) + max(1.0, EDGE_SHARE * radius) / 2


def draw_lesion(image, rng, size_range_px, contrast_range, kind="blob", donor=None):
    """One lesion of a kind (LESION_KINDS) wholly inside the brain of `image` -> (lesioned image,
    weights, contrast, the lesion's extent), or None where not even the smallest lesion fits.
    Sizes in px at the image's own size; donor: the slice a tissue lesion takes its pixels from."""
    diameter = rng.uniform(*size_range_px)
    bends = rng.uniform(0, MAX_BEND, len(HARMONICS))
    phases = rng.uniform(0, 2 * np.pi, len(HARMONICS))
    contrast = rng.choice([-1.0, 1.0]) * rng.uniform(*contrast_range)
    pick = rng.random()
    depth = ndimage.distance_transform_edt(brain_region(image))
    while blob_reach(diameter / 2, bends) >= depth.max():
        diameter *= SHRINK
        if diameter < size_range_px[0]:
            return None
    places = np.argwhere(depth > blob_reach(diameter / 2, bends))
    if kind == "straddling":
        on_boundary = grey_white_boundary(image)[tuple(places.T)]
        places = places[on_boundary] if on_boundary.any() else places
    centre = places[min(int(pick * len(places)), len(places) - 1)]
    blob = blob_weight(image.shape, centre, diameter / 2, bends, phases)
    weights = lesion_profile(kind, blob, diameter / 2, rng)
    if kind in REPLACING_KINDS:
        target = (csf_level(image) if kind == "csf"
                  else tissue_from(donor, centre, blob_reach(diameter / 2, bends), rng))
        lesioned = image + weights * (target - image)
        return lesioned.astype(np.float32), weights, achieved_contrast(image, lesioned, weights), blob >= 0.5
    return np.clip(image + contrast * weights, 0.0, 1.0).astype(np.float32), weights, contrast, blob >= 0.5


def csf_level(image):
    """The intensity of the slice's CSF: a low quantile of its brain's pixels."""
    return float(np.quantile(image[brain_region(image)], CSF_QUANTILE))


def grey_white_boundary(image):
    """The pixels of the brain where the smoothed slice crosses the threshold that splits its
    tissue brighter than CSF into two classes (Otsu): the grey/white-matter boundary."""
    brain = brain_region(image)
    smoothed = ndimage.gaussian_filter(image, BOUNDARY_SIGMA_AT_256 * image.shape[-1] / NATIVE_SIZE)
    tissue = smoothed[brain]
    tissue = tissue[tissue > np.quantile(tissue, 0.2)]
    white = smoothed >= threshold_otsu(tissue)
    return (white ^ ndimage.binary_erosion(white)) & brain


def tissue_from(donor, centre, reach, rng):
    """The donor slice shifted so that a random point of its brain, at least `reach` from the
    brain's edge, lands on `centre`: real tissue, from another place, for a lesion there."""
    depth = ndimage.distance_transform_edt(brain_region(donor))
    places = np.argwhere(depth > reach)
    if not len(places):
        places = np.argwhere(depth >= depth.max())
    source = places[rng.integers(len(places))]
    return np.roll(donor, tuple(np.asarray(centre) - source), axis=(0, 1))


def lesion_profile(kind, blob, radius, rng):
    """The share of its contrast each pixel of a lesion gets; the lesion is where the blob's
    weight is at least one half, whatever its kind."""
    inside = blob >= 0.5
    if kind == "ring":
        depth = ndimage.distance_transform_edt(inside)
        return np.where(inside, np.where(depth <= RING_WIDTH * radius, 1.0, RING_CORE), 0.0).astype(np.float32)
    if kind == "textured":
        sigma = TEXTURE_SIGMA_AT_256 * blob.shape[-1] / NATIVE_SIZE
        field = ndimage.gaussian_filter(rng.standard_normal(blob.shape), sigma)
        field = np.clip(0.5 + field / (4 * field[inside].std() + 1e-12), 0.0, 1.0)
        return np.where(inside, np.maximum(blob * field, 0.5 * field), blob * field).astype(np.float32)
    return blob


def masks_as_lesions(images, masks):
    """A user's slices and masks as a LesionSet (no drawn contrast; empty masks: healthy slices)."""
    lesioned = masks.reshape(len(masks), -1).any(axis=1)
    scale = images.shape[-1] / NATIVE_SIZE
    diameters = np.where(lesioned, 2 * np.sqrt(masks.sum(axis=(1, 2)) / np.pi) / scale, np.nan)
    return LesionSet(images=images, weights=masks.astype(np.float32), masks=masks, lesioned=lesioned,
                     diameters=diameters, contrasts=np.zeros(len(images)))


def achieved_contrast(original, lesioned, weights):
    """The intensity change per unit of lesion weight that a slice actually got (0 where none)."""
    energy = float((weights * weights).sum())  # the least-squares fit of lesioned - original = c * weights
    return float(((lesioned - original) * weights).sum() / energy) if energy else 0.0


def make_lesion_set(images, seed, size_range=(4.0, 32.0), contrast_range=(0.15, 0.5), lesioned_share=0.5,
                    kinds=("blob",)):
    """Lesions drawn into a seeded `lesioned_share` of `images` (N, H, W) in [0, 1], one each:
    sizes (equivalent diameter, px at 256 x 256) and contrast magnitudes uniform in their
    ranges, brighter or darker with equal chance, of the `kinds` in turn, placed wholly inside
    the brain. The same seed and images give the same lesions."""
    images = np.asarray(images, dtype=np.float32)
    n, side = len(images), images.shape[-1]
    scale = side / NATIVE_SIZE
    chosen = np.zeros(n, dtype=bool)
    chosen[np.random.default_rng(seed).permutation(n)[:int(round(n * lesioned_share))]] = True
    out = LesionSet(images=images.copy(), weights=np.zeros_like(images), masks=np.zeros(images.shape, bool),
                    lesioned=np.zeros(n, dtype=bool), diameters=np.full(n, np.nan), contrasts=np.zeros(n),
                    nominal=np.zeros(n), kinds=np.full(n, "", dtype=object))
    size_range_px = (size_range[0] * scale, size_range[1] * scale)
    for number, i in enumerate(np.flatnonzero(chosen)):
        kind = kinds[number % len(kinds)]
        donor = donor_of(images, i, np.random.default_rng([seed, i, 1])) if kind == "tissue" else None
        drawn = draw_lesion(images[i], np.random.default_rng([seed, i]), size_range_px, contrast_range, kind, donor)
        if drawn is None:
            continue
        out.images[i], out.weights[i], out.nominal[i], out.masks[i] = drawn
        # what the slice got, not what was asked for: clipping at 0 and 1 takes some of it away
        out.contrasts[i] = achieved_contrast(images[i], out.images[i], out.weights[i]) or out.nominal[i]
        out.lesioned[i], out.kinds[i] = True, kind
        out.diameters[i] = 2 * np.sqrt(out.masks[i].sum() / np.pi) / scale
    return out


def donor_of(images, i, rng):
    """Another slice of the set than i, drawn at random (the slice itself rolled by half its
    width where it is alone): where a tissue lesion takes its pixels from."""
    if len(images) == 1:
        return np.roll(images[i], images.shape[-1] // 2, axis=1)
    other = int(rng.integers(len(images) - 1))
    return images[other + (other >= i)]


# ----------------------------------------------------------------------------- detection figures

def slice_scores(maps, regions):
    """One score per slice: the highest value of its map inside its region (0 where empty)."""
    return np.array([m[r].max() if r.any() else 0.0 for m, r in zip(maps, regions)])


def pixel_figures(maps, masks, regions, dice_threshold):
    """Pixel AUROC, AUPRC and Dice (at the given threshold) over the region pixels of these slices."""
    scores, labels = maps[regions], masks[regions]
    return {"pixel_auroc": auroc(scores, labels), "pixel_auprc": average_precision(scores, labels),
            "dice": dice_at(scores, labels, dice_threshold)}


def detection_figures(maps, lesions: LesionSet, regions, dice_threshold):
    """How well `maps` (N, H, W) find the lesions, inside `regions` (N, H, W) bool.

    "all": pixel figures over every slice, lesioned or not, and slice AUROC of lesioned against
    untouched slices (slice score: the map's maximum). "by_size" and "by_contrast": pixel
    figures over the lesioned slices of one bin (by_size also ">=10px", the two larger bins
    together), and slice AUROC of those against every
    untouched slice. "by_kind": the same for each lesion kind drawn; "by_kind_from_10px" for
    each kind's lesions of 10 px and more.
    """
    per_slice = slice_scores(maps, regions)
    untouched = ~lesions.lesioned

    def figures(members):
        chosen = members | untouched
        return {**pixel_figures(maps[members], lesions.masks[members], regions[members], dice_threshold),
                "slice_auroc": auroc(per_slice[chosen], lesions.lesioned[chosen]),
                "n_lesioned": int((members & lesions.lesioned).sum())}

    result = {"all": {**pixel_figures(maps, lesions.masks, regions, dice_threshold),
                      "slice_auroc": auroc(per_slice, lesions.lesioned), "n_lesioned": int(lesions.lesioned.sum()),
                      "n_untouched": int(untouched.sum())}}
    size_bin = lesions.size_bin()
    result["by_size"] = {name: figures(size_bin == b) for b, name in enumerate(SIZE_BINS)}
    result["by_size"][FROM_10PX] = figures(size_bin >= 1)
    signs = {"bright": lesions.contrasts > 0, "dark": lesions.contrasts < 0}
    result["by_contrast"] = {name: figures(signs[name]) for name in CONTRAST_BINS}
    if lesions.kinds is not None:
        drawn = [k for k in LESION_KINDS if (lesions.kinds == k).any()]
        result["by_kind"] = {kind: figures(lesions.kinds == kind) for kind in drawn}
        result["by_kind_from_10px"] = {kind: figures((lesions.kinds == kind) & (size_bin >= 1)) for kind in drawn}
    return result
