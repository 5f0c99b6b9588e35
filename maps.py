"""Anomaly maps of slices from a trained VQ-VAE and its prior: the reconstruction error, the
prior's per-code NLL, and healing (Pinaya et al., Medical Image Analysis 2022): the codes the prior
finds unlikely are drawn afresh from it, each given the codes before it, the healed codes are
decoded, and the slice's difference from its healed versions, where codes were healed, is the
map. With a two-level VQ-VAE the prior judges and heals the coarse codes, and the detail prior
redraws the fine codes under each healed one. Every map is masked to the brain less a band along
its edge. No I/O."""
import math
from dataclasses import dataclass

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

METHODS = ("reconstruction", "code_nll", "healing")
METHOD_NAMES = {"reconstruction": "reconstruction error", "code_nll": "code NLL", "healing": "healing"}


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


def slices_to_map(name, lesions: LesionSet, slice_idx, edge_margin, n_conditions, device):
    """A Benchmark of slices (lesions.images) with their ground truth, brains and conditions;
    edge_margin: the band left out along the brain's edge, px at 256 x 256."""
    regions = np.stack([brain_region(image) for image in lesions.images])
    inner = inner_regions(regions, edge_margin * lesions.images.shape[-1] / NATIVE_SIZE)
    return Benchmark(name, lesions, regions, inner, slice_conditions(slice_idx, n_conditions, device), slice_idx)


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


@torch.no_grad()
def encode(vqvae, priors: Priors, bench: Benchmark, device, batch_size=64):
    levels = encode_all_levels(vqvae, torch.from_numpy(bench.lesions.images)[:, None], batch_size, device)
    coarse, fine = levels[0], (levels[1] if len(levels) == 2 else None)
    nll = torch.cat([code_nll(priors.coarse, coarse[i:i + batch_size], None if bench.cond is None else
                              bench.cond[i:i + batch_size]) for i in range(0, len(coarse), batch_size)])
    return Encoded(coarse, nll, decode_all(vqvae, levels)[:, 0].numpy(), fine)


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
         combine):
    """Heal every slice n_heal times -> (|slice - healed| (N, H, W) combined over the healed versions by
    `combine`, mean healed slice, flags).

    The n_heal copies of every slice are healed together, batch_size code grids at a time; the
    progress bar counts the code rows of every level, the detail prior's included."""
    flagged = encoded.nll > -math.log(threshold)
    owners = torch.arange(len(encoded.coarse), device=device).repeat_interleave(n_heal)
    generator = torch.Generator(device=device).manual_seed(seed)
    chunks = [owners[i:i + batch_size] for i in range(0, len(owners), batch_size)]
    healed = []
    rows = encoded.coarse.shape[1] + (encoded.fine.shape[1] if priors.detail is not None else 0)
    with tqdm(total=rows * len(chunks), desc=f"healing {bench.split}", unit="row", leave=False) as bar:
        for who in chunks:
            cond = bench.cond[who] if bench.cond is not None else None
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


def code_regions(regions, grid_side):
    """The codes whose cells lie mostly in the regions (N, H, W) -> bool (N, grid_side, grid_side)."""
    return upsample(torch.from_numpy(regions), grid_side, "area") > 0.5


def anomaly_maps(vqvae, priors: Priors, bench: Benchmark, threshold, cfg, device, encoded=None):
    """The three maps of a benchmark's slices, healing the codes rarer than `threshold`; cfg: the
    map settings of anomaly.AnomalyConfig (n_heal, batch_size, seed, combine, smooth); `encoded`
    saves encoding the slices again."""
    if encoded is None:
        encoded = encode(vqvae, priors, bench, device)
    differences, healed, flagged = heal(vqvae, priors, bench, encoded, threshold, cfg.n_heal, cfg.batch_size,
                                        cfg.seed, device, cfg.combine)
    grid_regions = code_regions(bench.regions, flagged.shape[-1])
    return Maps(reconstruction_error_map(bench, encoded, cfg.smooth), code_nll_map(bench, encoded),
                healing_map(bench, differences, flagged, cfg.smooth), healed,
                float(flagged.cpu().numpy()[grid_regions].mean()) if grid_regions.any() else 0.0)


