"""Anomaly maps of slices from a trained VQ-VAE and its prior: the reconstruction error, the
prior's per-code NLL, and healing (Pinaya et al., Medical Image Analysis 2022): the codes the prior
finds unlikely are drawn afresh from it, each given the codes before it, the healed codes are
decoded, and the slice's difference from its healed versions, where codes were healed, is the
map. With a two-level VQ-VAE the prior judges and heals the coarse codes, and the detail prior
redraws the fine codes under each healed one. Given a Reference from healthy slices, two more: the
calibrated NLL (each level's code NLL in spreads above what healthy slices have at the same code
cell and slice position, the levels added) and the combined map (healing plus calibrated NLL, each
over its healthy 99th percentile). Every map is masked to the brain less a band along its edge.
No I/O."""
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt, gaussian_filter
from tqdm import tqdm

from brain import brain_region
from codes import decode_all, encode_all_levels
from lesions import LesionSet
from modules import Priors
from prior import code_nll, heal_codes, slice_conditions
from slices import NATIVE_SIZE

METHODS = ("reconstruction", "code_nll", "healing", "calibrated_nll", "combined")
METHOD_NAMES = {"reconstruction": "reconstruction error", "code_nll": "code NLL", "healing": "healing",
                "calibrated_nll": "calibrated NLL", "combined": "healing + calibrated"}
# Healthy slices within this many positions either side of a slice's own make its NLL reference:
# neighbouring slices share their anatomy, and one position alone holds too few slices.
POSITION_WINDOW = 2
# Added to each cell's spread of healthy NLL (nats) so that cells that are nearly always the
# same code (background, deep white matter) do not turn tiny differences into large scores.
SPREAD_FLOOR = 0.3
# The share of healthy brain pixels above which the healing and calibrated maps are scaled to
# 1 before they are added into the combined map.
SCALE_QUANTILE = 0.99


@dataclass
class Benchmark:
    """Slices as the detector sees them, with their ground truth (lesions: drawn ones, a user's
    masks, or none)."""
    split: str
    lesions: LesionSet
    regions: np.ndarray        # bool (N, H, W): the brain of each slice, where maps are scored
    inner: np.ndarray          # bool (N, H, W): the brain less the band along its edge, where maps are drawn
    cond: torch.Tensor | None  # the slice positions the prior is conditioned on (None: unconditioned)
    slice_idx: np.ndarray
    case_ids: np.ndarray | None = None  # each slice's subject where known: a healthy reference leaves it out


def slices_to_map(name, lesions: LesionSet, slice_idx, edge_margin, n_conditions, device, case_ids=None):
    """A Benchmark of slices (lesions.images) with their ground truth, brains and conditions;
    edge_margin: the band left out along the brain's edge, px at 256 x 256."""
    regions = np.stack([brain_region(image) for image in lesions.images])
    inner = inner_regions(regions, edge_margin * lesions.images.shape[-1] / NATIVE_SIZE)
    return Benchmark(name, lesions, regions, inner, slice_conditions(slice_idx, n_conditions, device), slice_idx,
                     None if case_ids is None else np.asarray(case_ids))


def inner_regions(regions, margin):
    """Each region less the band within `margin` px of its edge."""
    if margin <= 0:
        return regions
    return np.stack([distance_transform_edt(region) > margin for region in regions])


# ----------------------------------------------------------------------------- maps

@dataclass
class Encoded:
    coarse: torch.Tensor          # (N, h, w) on the device: the coarsest codes, which the prior models
    nll: torch.Tensor             # (N, h, w): -log p(code | codes before it), nats
    reconstructions: np.ndarray   # (N, H, W): the decoded codes
    fine: torch.Tensor | None = None  # (N, 2h, 2w): a two-level VQ-VAE's fine codes
    fine_nll: torch.Tensor | None = None  # (N, 2h, 2w): -log p(fine code | coarse codes, fine codes before it)

    def nll_levels(self):
        """The NLL grids of every level, coarse first, as numpy."""
        return [nll.cpu().numpy() for nll in (self.nll, self.fine_nll) if nll is not None]


@torch.no_grad()
def encode(vqvae, priors: Priors, bench: Benchmark, device, batch_size=64):
    levels = encode_all_levels(vqvae, torch.from_numpy(bench.lesions.images)[:, None], batch_size, device)
    coarse, fine = levels[0], (levels[1] if len(levels) == 2 else None)
    nll = torch.cat([code_nll(priors.coarse, coarse[i:i + batch_size], None if bench.cond is None else
                              bench.cond[i:i + batch_size]) for i in range(0, len(coarse), batch_size)])
    fine_nll = None
    if fine is not None and priors.detail is not None:
        # a quarter of the batch: one pass of the detail prior holds its conditioning biases, 4 x hidden
        # numbers per fine code in every layer, over the whole grid (800 MB for 64 grids at 64x64)
        step = max(1, batch_size // 4)
        fine_nll = torch.cat([code_nll(priors.detail, fine[i:i + step], coarse[i:i + step])
                              for i in range(0, len(fine), step)])
    return Encoded(coarse, nll, decode_all(vqvae, levels)[:, 0].numpy(), fine, fine_nll)


# ----------------------------------------------------------------------------- healthy reference

class NllCalibration:
    """What the prior's NLL is on healthy slices, code cell by code cell: for each level, the NLL
    grids of healthy slices with their positions and subjects. A slice's calibrated NLL at a cell
    is (NLL - healthy mean) / (healthy spread + SPREAD_FLOOR) over the healthy slices within
    `window` positions of its own, less those of its own subject (so the healthy slices' own
    maps are scored as a new subject's would be); the fine level's is averaged over the 2x2 fine
    codes of each coarse cell and added to the coarse level's. The cortex's codes are uncertain
    on every slice and white matter's nearly never are: the raw NLL ranks the cortex of a healthy
    slice above a lesion in white matter, the calibrated NLL does not."""

    def __init__(self, levels, slice_idx, case_ids, window=POSITION_WINDOW):
        self.levels = [np.asarray(level, np.float32) for level in levels]
        self.slice_idx, self.case_ids = np.asarray(slice_idx), np.asarray(case_ids)
        self.window = window
        self.stats = lru_cache(maxsize=None)(self._stats)

    def _stats(self, position, case_id):
        """Per level, the mean and spread of healthy NLL near `position`, leaving out `case_id`."""
        others = self.case_ids != case_id
        near = (np.abs(self.slice_idx - position) <= self.window) & others
        if near.sum() < 2:  # a tiny reference: every other subject's slices, or all of them
            near = others if others.sum() >= 2 else np.ones_like(others)
        return [(level[near].mean(axis=0), level[near].std(axis=0)) for level in self.levels]

    def __call__(self, levels, slice_idx, case_ids=None):
        """The calibrated NLL (N, h, w) on the coarse grid of slices with these NLL grids per level."""
        out = np.zeros(levels[0].shape, np.float32)
        for i, position in enumerate(np.asarray(slice_idx)):
            case_id = None if case_ids is None else case_ids[i]
            for level, (mean, spread) in zip(levels, self.stats(int(position), case_id)):
                out[i] += block_means(in_healthy_spreads(level[i], mean, spread), out.shape[-1])
        return out


def in_healthy_spreads(nll, mean, spread):
    """How far a code's NLL lies above the healthy mean at its cell, in healthy spreads (floored)."""
    return (nll - mean) / (spread + SPREAD_FLOOR)


def block_means(grid, side):
    """A square grid averaged over blocks down to side x side (a fine grid onto the coarse one)."""
    k = grid.shape[-1] // side
    return grid.reshape(side, k, side, k).mean(axis=(1, 3))


@dataclass
class Reference:
    """What healthy slices tell the maps: their NLL per code cell (the calibration), and the
    SCALE_QUANTILE of their healing and calibrated maps over the brain, which put the two on one
    scale before the combined map adds them."""
    calibration: NllCalibration
    healing_scale: float = 1.0
    calibrated_scale: float = 1.0


def calibrated_nll_map(bench: Benchmark, encoded: Encoded, calibration: NllCalibration):
    """The calibrated NLL of both levels, upsampled bilinearly to the image, in the brain less its edge band."""
    z = calibration(encoded.nll_levels(), bench.slice_idx, bench.case_ids)
    return upsample(torch.from_numpy(z), bench.regions.shape[-1], "bilinear") * bench.inner


def combined_map(healing, calibrated, reference: Reference):
    """Healing finds where a slice differs from what the prior would put there; the calibrated NLL
    how unlikely its codes are for that place. Each over its healthy scale, added."""
    return healing / reference.healing_scale + calibrated / reference.calibrated_scale


def scaled_reference(calibration: NllCalibration, maps, regions):
    """The Reference whose scales are the SCALE_QUANTILE of healthy slices' healing and calibrated maps."""
    def scale(values):
        return float(np.quantile(values[regions], SCALE_QUANTILE)) or 1.0
    return Reference(calibration, scale(maps.healing), scale(maps.calibrated_nll))


def smooth(maps, sigma_at_256):
    """Gaussian smoothing of each map (N, H, W); sigma in px at 256 x 256, scaled to the maps."""
    sigma = sigma_at_256 * maps.shape[-1] / NATIVE_SIZE
    return gaussian_filter(maps, (0, sigma, sigma)) if sigma > 0 else maps


def upsample(grids, size, mode):
    """Code grids (N, h, w) -> (N, size, size) numpy."""
    return F.interpolate(grids[:, None].float().cpu(), size=(size, size), mode=mode)[:, 0].numpy()


def reconstruction_error_map(bench: Benchmark, encoded: Encoded, sigma):
    """The baseline: |slice - reconstruction|, smoothed, in the brain less its edge band."""
    return smooth(np.abs(bench.lesions.images - encoded.reconstructions), sigma) * bench.inner


def code_nll_map(bench: Benchmark, encoded: Encoded):
    """The prior's per-code NLL, upsampled bilinearly to the image, in the brain less its edge band."""
    return upsample(encoded.nll, bench.regions.shape[-1], "bilinear") * bench.inner


@torch.no_grad()
def heal_levels(priors: Priors, encoded: Encoded, who, flagged, cond, generator, progress):
    """The flagged coarse codes of the slices `who` healed; with a detail prior, the fine codes
    under every flagged coarse code drawn afresh too, given the healed coarse codes (else the
    fine codes would redraw what was healed away). -> the code grids of every level."""
    codes = heal_codes(priors.coarse, encoded.coarse[who], flagged[who], cond, generator=generator, progress=progress)
    if priors.detail is None:
        return [codes]
    under = flagged[who].repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    return [codes, heal_codes(priors.detail, encoded.fine[who], under, codes, generator=generator, progress=progress)]


@torch.no_grad()
def heal(vqvae, priors: Priors, bench: Benchmark, encoded: Encoded, threshold, n_heal, batch_size, seed, device,
         combine, dtype="float32"):
    """Heal every slice n_heal times -> (|slice - healed| (N, H, W) combined over the healed versions by
    `combine`, mean healed slice, flags).

    The n_heal copies of every slice are healed together, batch_size code grids at a time; the
    progress bar counts the code rows of every level, the detail prior's included. dtype
    "bfloat16" draws and decodes the healed codes under bf16 autocast (the codes and their NLL,
    which choose what is healed, stay float32)."""
    flagged = encoded.nll > -math.log(threshold)
    owners = torch.arange(len(encoded.coarse), device=device).repeat_interleave(n_heal)
    generator = torch.Generator(device=device).manual_seed(seed)
    chunks = [owners[i:i + batch_size] for i in range(0, len(owners), batch_size)]
    healed = []
    rows = encoded.coarse.shape[1] + (encoded.fine.shape[1] if priors.detail is not None else 0)
    with tqdm(total=rows * len(chunks), desc=f"healing {bench.split}", unit="row", leave=False) as bar:
        for who in chunks:
            cond = bench.cond[who] if bench.cond is not None else None
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                codes = heal_levels(priors, encoded, who, flagged, cond, generator, bar)
                healed.append(decode_all(vqvae, codes)[:, 0].numpy())
    images = bench.lesions.images
    healed = np.concatenate(healed).reshape(len(images), n_heal, *images.shape[1:])
    differences = np.abs(images[:, None] - healed)
    combined = differences.min(axis=1) if combine == "min" else differences.mean(axis=1)
    return combined, healed.mean(axis=1), flagged


def healing_map(bench: Benchmark, differences, flagged, sigma):
    """The difference from the healed slices, smoothed, where codes were healed: weighted by the
    map of flagged codes, upsampled and smoothed over about a code cell (Pinaya et al. filter
    their residuals by the resampling mask so), in the brain less its edge band."""
    size = bench.regions.shape[-1]
    cell = size / flagged.shape[-1]
    where_healed = gaussian_filter(upsample(flagged, size, "nearest"), (0, cell / 2, cell / 2))
    return smooth(differences, sigma) * where_healed * bench.inner


@dataclass
class Maps:
    reconstruction: np.ndarray
    code_nll: np.ndarray
    healing: np.ndarray
    healed: np.ndarray            # the mean healed slice, for the figure
    healed_share: float           # share of the codes in the brain that were healed
    calibrated_nll: np.ndarray | None = None  # these two need a Reference from healthy slices
    combined: np.ndarray | None = None


def code_regions(regions, grid_side):
    """The codes whose cells lie mostly in the regions (N, H, W) -> bool (N, grid_side, grid_side)."""
    return upsample(torch.from_numpy(regions), grid_side, "area") > 0.5


def anomaly_maps(vqvae, priors: Priors, bench: Benchmark, threshold, cfg, device, encoded=None,
                 reference: Reference | None = None):
    """The maps of a benchmark's slices, healing the codes rarer than `threshold`; cfg: the map
    settings of anomaly.AnomalyConfig (n_heal, batch_size, seed, combine, smooth, dtype); `encoded` saves
    encoding the slices again. The calibrated and combined maps only with a `reference`."""
    if encoded is None:
        encoded = encode(vqvae, priors, bench, device)
    differences, healed, flagged = heal(vqvae, priors, bench, encoded, threshold, cfg.n_heal, cfg.batch_size,
                                        cfg.seed, device, cfg.combine, cfg.dtype)
    grid_regions = code_regions(bench.regions, flagged.shape[-1])
    maps = Maps(reconstruction_error_map(bench, encoded, cfg.smooth), code_nll_map(bench, encoded),
                healing_map(bench, differences, flagged, cfg.smooth), healed,
                float(flagged.cpu().numpy()[grid_regions].mean()) if grid_regions.any() else 0.0)
    if reference is not None:
        maps.calibrated_nll = calibrated_nll_map(bench, encoded, reference.calibration)
        maps.combined = combined_map(maps.healing, maps.calibrated_nll, reference)
    return maps


def healthy_calibration(vqvae, priors, every: Benchmark, n_conditions, device):
    """The prior's NLL per code cell on every slice of `every` (healthy validate slices), by slice
    position; an unconditioned prior's slices are pooled over every position."""
    window = POSITION_WINDOW if n_conditions else math.inf
    return NllCalibration(encode(vqvae, priors, every, device).nll_levels(), every.slice_idx, every.case_ids, window)


def healthy_reference(vqvae, priors, healthy: Benchmark, calibration, threshold, cfg, device,
                      encoded=None):
    """The Reference scaled on healthy slices' maps, and those maps (every method's); cfg: as
    anomaly_maps takes it."""
    maps = anomaly_maps(vqvae, priors, healthy, threshold, cfg, device, encoded, Reference(calibration))
    reference = scaled_reference(calibration, maps, healthy.regions)
    maps.combined = combined_map(maps.healing, maps.calibrated_nll, reference)
    return reference, maps
