"""The VQ-VAE (van den Oord et al. 2017, arXiv 1711.00937) and its hand-off to the prior:
images to code indices and back, one batch or a whole split in batches. No I/O."""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import opt
from metrics import perplexity

# ----------------------------------------------------------------------------- VQ-VAE

@dataclass
class VQVAEConfig:
    in_channels: int = opt(1, "image channels", minimum=1)
    hidden: int = opt(64, "channels after the strided convolutions (paper: 256)", minimum=1)
    res_hidden: int = opt(32, "bottleneck channels inside a residual block", minimum=1)
    n_res_blocks: int = opt(2, "residual blocks in encoder and decoder")
    n_downsample: int = opt(2, "strided 4x4 convolutions; codes form an (image_size / 2**n) grid", minimum=1)
    num_codes: int = opt(256, "codebook size (paper: 512)", minimum=1)
    code_dim: int = opt(64, "dimension of each codebook vector", minimum=1)
    beta: float = opt(0.25, "commitment cost (paper: 0.25)")
    ema: bool = opt(True, "learn the codebook by exponential moving averages instead of by gradient")
    ema_decay: float = opt(0.99, "decay of the codebook's moving averages")
    dead_code_steps: int = opt(20, "re-seed codes unused for this many steps from encoder outputs; 0 = never")
    levels: int = opt(1, "code grids: 1, or 2 = a coarse grid at half the side above the fine one (VQ-VAE-2): "
                         "the prior models the coarse codes, a detail prior the fine ones given them",
                      minimum=1, maximum=2)
    coarse_only: float = opt(0.0, "two levels: share of the training images decoded from their coarse codes alone "
                                  "(fine vectors zeroed), so that the coarse codes carry all of the picture they "
                                  "can and the fine ones what is left", minimum=0.0, maximum=1.0)


class ResidualStack(nn.Module):
    """Residual blocks of ReLU, 3x3 conv, ReLU, 1x1 conv, as in the paper."""

    def __init__(self, channels, res_hidden, n_blocks):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(),
                nn.Conv2d(channels, res_hidden, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(res_hidden, channels, 1),
            )
            for _ in range(n_blocks)
        )

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return F.relu(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        layers, channels = [], cfg.in_channels
        for i in range(cfg.n_downsample):
            out = cfg.hidden if i == cfg.n_downsample - 1 else cfg.hidden // 2
            layers += [nn.Conv2d(channels, out, 4, stride=2, padding=1), nn.ReLU()]
            channels = out
        layers.append(nn.Conv2d(channels, cfg.hidden, 3, padding=1))
        self.net = nn.Sequential(*layers)
        self.res = ResidualStack(cfg.hidden, cfg.res_hidden, cfg.n_res_blocks)
        # with two levels the fine codes are chosen knowing the coarse ones (their upsampled vectors)
        self.to_code = nn.Conv2d(cfg.hidden + (cfg.levels - 1) * cfg.code_dim, cfg.code_dim, 1)

    def features(self, x):
        return self.res(self.net(x))

    def forward(self, x):
        return self.to_code(self.features(x))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.from_code = nn.Conv2d(cfg.levels * cfg.code_dim, cfg.hidden, 3, padding=1)
        self.res = ResidualStack(cfg.hidden, cfg.res_hidden, cfg.n_res_blocks)
        layers, channels = [], cfg.hidden
        for i in range(cfg.n_downsample):
            last = i == cfg.n_downsample - 1
            out = cfg.in_channels if last else cfg.hidden // 2
            layers.append(nn.ConvTranspose2d(channels, out, 4, stride=2, padding=1))
            if not last:
                layers.append(nn.ReLU())
            channels = out
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(self.res(self.from_code(z)))  # logits; sigmoid gives [0, 1] intensities


class CoarseLevel(nn.Module):
    """VQ-VAE-2's top level (Razavi et al. 2019, arXiv 1906.00446): the encoder's features at the
    fine grid halved once more and quantized; the coarse code vectors come back upsampled to the
    fine grid, for the fine quantizer and the decoder. The coarse grid holds the layout a prior
    can model cheaply; the fine grid the detail."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.encode = nn.Sequential(nn.Conv2d(cfg.hidden, cfg.hidden, 4, stride=2, padding=1), nn.ReLU(),
                                    ResidualStack(cfg.hidden, cfg.res_hidden, cfg.n_res_blocks),
                                    nn.Conv2d(cfg.hidden, cfg.code_dim, 1))
        self.quantizer = VectorQuantizer(cfg.num_codes, cfg.code_dim, cfg.beta, cfg.ema, cfg.ema_decay,
                                         cfg.dead_code_steps)
        self.upsample = nn.ConvTranspose2d(cfg.code_dim, cfg.code_dim, 4, stride=2, padding=1)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with a straight-through gradient.

    Codebook learning is either by gradient (codebook loss ||sg[z] - e||^2) or by
    exponential moving averages of the assigned encoder outputs (paper, appendix A.1).
    The codebook is seeded from the first batch of encoder outputs, and codes unused
    for `dead_code_steps` training steps are re-seeded from the current batch: a
    codebook that starts far from the encoder's outputs collapses to a few codes here.
    Distances, lookup and updates always run in float32, also under autocast.
    """

    def __init__(self, num_codes, code_dim, beta=0.25, ema=True, ema_decay=0.99,
                 dead_code_steps=20, eps=1e-5):
        super().__init__()
        self.num_codes, self.code_dim = num_codes, code_dim
        self.beta, self.ema, self.decay, self.eps = beta, ema, ema_decay, eps
        self.dead_code_steps = dead_code_steps
        self.codebook = nn.Parameter(torch.randn(num_codes, code_dim) / math.sqrt(code_dim),
                                     requires_grad=not ema)
        self.register_buffer("initialized", torch.tensor(False))
        self._seeded = False  # host-side copy of `initialized`, so a step needs no device sync
        self.register_buffer("steps_unused", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("ema_count", torch.ones(num_codes))
        self.register_buffer("ema_sum", self.codebook.detach().clone())

    def nearest_codes(self, flat):
        # ||z||^2 - 2 z.e + ||e||^2; the ||z||^2 term does not change the argmin.
        distances = (self.codebook.pow(2).sum(1)[None, :] - 2 * flat @ self.codebook.t())
        return distances.argmin(1)

    def forward(self, z):
        """z: (B, D, H, W) -> (quantized z, vq loss, indices (B, H, W), stats dict)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            b, d, h, w = z.shape
            flat = z.permute(0, 2, 3, 1).reshape(-1, d)
            if self.training and not self._is_seeded():
                self._seed_codebook(flat)
            indices = self.nearest_codes(flat.detach())
            one_hot = F.one_hot(indices, self.num_codes).type_as(flat)
            if self.training:
                self._update_codebook(flat.detach(), indices, one_hot)
            quantized = self.codebook[indices]

            commitment = F.mse_loss(flat, quantized.detach())
            loss = self.beta * commitment
            if not self.ema:
                loss = loss + F.mse_loss(quantized, flat.detach())
            quantized = flat + (quantized - flat).detach()  # straight-through estimator

            counts = one_hot.sum(0)
            probs = counts / counts.sum()
            stats = {
                "perplexity": perplexity(probs).detach(),
                "codes_used": (counts > 0).sum().detach(),
                "counts": counts.detach(),
            }
            # Hand the decoder the memory layout the encoder produced (channels_last or not).
            layout = (torch.channels_last if z.is_contiguous(memory_format=torch.channels_last)
                      and not z.is_contiguous() else torch.contiguous_format)
            quantized = quantized.view(b, h, w, d).permute(0, 3, 1, 2).contiguous(memory_format=layout)
            return quantized, loss, indices.view(b, h, w), stats

    def _is_seeded(self):
        if not self._seeded:  # reads the device once per process, not once per step
            self._seeded = bool(self.initialized)
        return self._seeded

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._seeded = False  # the loaded state decides

    @torch.no_grad()
    def _seed_codebook(self, flat):
        self.codebook.data.copy_(same_on_every_rank(self._random_rows(flat, self.num_codes)))
        self.ema_sum.copy_(self.codebook.data)
        self.ema_count.fill_(1.0)
        self.initialized.fill_(True)
        self._seeded = True

    @torch.no_grad()
    def _update_codebook(self, flat, indices, one_hot):
        counts, sums = one_hot.sum(0), one_hot.t() @ flat
        if distributed():  # every rank applies the update of the whole global batch
            both = torch.cat([counts[:, None], sums], dim=1)
            torch.distributed.all_reduce(both)
            counts, sums = both[:, 0], both[:, 1:]
        if self.ema:
            self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            # Laplace smoothing keeps codes with a tiny count from dividing by ~0.
            n = self.ema_count.sum()
            smoothed = (self.ema_count + self.eps) / (n + self.num_codes * self.eps) * n
            self.codebook.data.copy_(self.ema_sum / smoothed[:, None])
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        if self.dead_code_steps > 0:
            self.restart_codes(self.steps_unused >= self.dead_code_steps, flat)

    @torch.no_grad()
    def restart_codes(self, dead, flat):
        """Move the codes marked in `dead` onto randomly chosen encoder outputs.

        Candidates are drawn for every code and kept only where `dead` says so: asking
        the device whether any code is dead would stall every training step."""
        fresh = same_on_every_rank(self._random_rows(flat, self.num_codes))
        self.codebook.data.copy_(torch.where(dead[:, None], fresh, self.codebook.data))
        self.ema_sum.copy_(torch.where(dead[:, None], fresh, self.ema_sum))
        self.ema_count.masked_fill_(dead, 1.0)
        self.steps_unused.masked_fill_(dead, 0)

    @staticmethod
    def _random_rows(flat, n):
        pick = torch.randint(0, flat.shape[0], (n,), device=flat.device)
        return flat[pick]


def distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def same_on_every_rank(tensor):
    """Rank 0's copy everywhere (a no-op in a single process)."""
    if distributed():
        torch.distributed.broadcast(tensor, src=0)
    return tensor


class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(cfg.num_codes, cfg.code_dim, cfg.beta, cfg.ema,
                                         cfg.ema_decay, cfg.dead_code_steps)
        self.decoder = Decoder(cfg)
        self.top = CoarseLevel(cfg) if cfg.levels == 2 else None

    def forward(self, x):
        """x in [0, 1], (B, C, H, W) -> (reconstruction logits, vq loss, fine indices, stats); with
        two levels the stats' counts are the coarse codebook's followed by the fine one's."""
        if self.top is None:
            z_q, vq_loss, indices, stats = self.quantizer(self.encoder(x))
            return self.decoder(z_q), vq_loss, indices, stats
        (coarse, fine), vq_loss, indices, stats = self._quantize_levels(x)
        if self.training and self.cfg.coarse_only > 0:
            keep_fine = torch.rand(len(x), device=x.device) >= self.cfg.coarse_only
            fine = fine * keep_fine[:, None, None, None].to(fine.dtype)
        return self.decoder(torch.cat([coarse, fine], dim=1)), vq_loss, indices[1], stats

    def _quantize_levels(self, x):
        """-> ([coarse vectors upsampled, fine vectors], vq loss, [coarse, fine] indices, stats)."""
        h = self.encoder.features(x)
        top_q, top_loss, top_indices, top_stats = self.top.quantizer(self.top.encode(h))
        coarse = self.top.upsample(top_q)
        fine, loss, indices, stats = self.quantizer(self.encoder.to_code(torch.cat([h, coarse], dim=1)))
        stats = {**stats, "counts": torch.cat([top_stats["counts"], stats["counts"]]),
                 "codes_used": stats["codes_used"] + top_stats["codes_used"]}
        return [coarse, fine], loss + top_loss, [top_indices, indices], stats

    # The hand-off to the prior: images to code indices, and code indices back to images.
    # (encode_all and decode_all below run them over a whole split in batches.)

    @torch.no_grad()
    def reconstruct(self, x):
        return torch.sigmoid(self.forward(x)[0]).float()

    @torch.no_grad()
    def encode_levels(self, x):
        """Code indices of every level, coarse first: [(B, h, w)], or [(B, h/2, w/2), (B, h, w)]."""
        if self.top is None:
            return [self.quantizer(self.encoder(x))[2]]
        return self._quantize_levels(x)[2]

    @torch.no_grad()
    def encode_to_indices(self, x):
        """The codes the prior models: the coarsest level's."""
        return self.encode_levels(x)[0]

    @torch.no_grad()
    def decode_indices(self, codes):
        """codes: (B, h, w) indices, or a list with one per level, coarse first -> images in [0, 1]."""
        levels = list(codes) if isinstance(codes, (list, tuple)) else [codes]
        if len(levels) != self.cfg.levels:
            raise ValueError(f"this VQ-VAE decodes {self.cfg.levels} code level(s), got {len(levels)}")
        z_q = self.quantizer.codebook[levels[-1]].permute(0, 3, 1, 2)
        if self.top is not None:
            coarse = self.top.upsample(self.top.quantizer.codebook[levels[0]].permute(0, 3, 1, 2))
            z_q = torch.cat([coarse, z_q], dim=1)
        return torch.sigmoid(self.decoder(z_q)).float()


def to_unit(images_u8):
    """uint8 images -> float32 in [0, 1] (a new tensor)."""
    return images_u8.float().div(255)


def unit_batches(images_u8, batch_size=64):
    """uint8 (N, 1, H, W) -> float batches in [0, 1], converted one batch at a time."""
    for start in range(0, images_u8.shape[0], batch_size):
        yield to_unit(images_u8[start:start + batch_size])


@torch.no_grad()
def reconstruct_all(vqvae, images_u8, batch_size=64):
    """uint8 (N, 1, H, W) on the model's device -> float reconstructions on the CPU."""
    vqvae.eval()
    return torch.cat([vqvae.reconstruct(x).cpu() for x in unit_batches(images_u8, batch_size)])


@torch.no_grad()
def encode_all(vqvae, images_u8, batch_size=64):
    """uint8 (N, 1, H, W) -> long code indices (N, h, w) on the same device."""
    return torch.cat([vqvae.encode_to_indices(x) for x in unit_batches(images_u8, batch_size)])


@torch.no_grad()
def encode_all_levels(vqvae, images_u8, batch_size=64):
    """uint8 (N, 1, H, W) -> the code indices of every level, coarse first, on the same device."""
    batches = [vqvae.encode_levels(x) for x in unit_batches(images_u8, batch_size)]
    return [torch.cat(level) for level in zip(*batches)]


@torch.no_grad()
def decode_all(vqvae, codes, batch_size=64):
    """Code indices (N, h, w), or a list with one per level (coarse first) -> images (N, 1, H, W)
    in [0, 1] on the CPU."""
    levels = list(codes) if isinstance(codes, (list, tuple)) else [codes]
    return torch.cat([vqvae.decode_indices([c[i:i + batch_size] for c in levels]).cpu()
                      for i in range(0, len(levels[0]), batch_size)])


