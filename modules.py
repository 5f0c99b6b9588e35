"""The networks: the VQ-VAE (van den Oord et al. 2017, arXiv 1711.00937) with its encoder,
residual stack, vector quantizer and decoder, one or two code levels (VQ-VAE-2), and its hand-off
to the priors (one batch of images to code indices and back); the PixelCNN priors over the codes
(masked convolutions, arXiv 1601.06759, and gated layers, arXiv 1606.05328), conditioned on slice
position or, for the detail prior, on the coarse codes. Whole splits in batches: codes.py;
sampling, per-code NLL and healing: prior.py. No I/O."""
import math
from dataclasses import dataclass
from typing import NamedTuple

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


class CoarseLevel(nn.Module):
    """VQ-VAE-2's coarse level (Razavi et al. 2019, arXiv 1906.00446, their "top"): the encoder's
    features at the fine grid halved once more and quantized; the coarse code vectors come back
    upsampled to the fine grid, for the fine quantizer and the decoder. The coarse grid holds the
    layout a prior can model cheaply; the fine grid the detail."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.encode = nn.Sequential(nn.Conv2d(cfg.hidden, cfg.hidden, 4, stride=2, padding=1), nn.ReLU(),
                                    ResidualStack(cfg.hidden, cfg.res_hidden, cfg.n_res_blocks),
                                    nn.Conv2d(cfg.hidden, cfg.code_dim, 1))
        self.quantizer = VectorQuantizer(cfg.num_codes, cfg.code_dim, cfg.beta, cfg.ema, cfg.ema_decay,
                                         cfg.dead_code_steps)
        self.upsample = nn.ConvTranspose2d(cfg.code_dim, cfg.code_dim, 4, stride=2, padding=1)


class VQVAE(nn.Module):
    """Encoder, quantizer, decoder; with two levels (cfg.levels == 2) a coarse level above the
    fine one. Code levels are named coarse and fine everywhere, and listed coarse first; with one
    level its codes are both the coarsest and the finest."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(cfg.num_codes, cfg.code_dim, cfg.beta, cfg.ema,
                                         cfg.ema_decay, cfg.dead_code_steps)
        self.decoder = Decoder(cfg)
        self.coarse = CoarseLevel(cfg) if cfg.levels == 2 else None

    def forward(self, x):
        """x in [0, 1], (B, C, H, W) -> (reconstruction logits, vq loss, fine indices, stats); with
        two levels the stats' counts are the coarse codebook's followed by the fine one's."""
        if self.coarse is None:
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
        coarse_q, coarse_loss, coarse_indices, coarse_stats = self.coarse.quantizer(self.coarse.encode(h))
        coarse = self.coarse.upsample(coarse_q)
        fine, loss, indices, stats = self.quantizer(self.encoder.to_code(torch.cat([h, coarse], dim=1)))
        stats = {**stats, "counts": torch.cat([coarse_stats["counts"], stats["counts"]]),
                 "codes_used": stats["codes_used"] + coarse_stats["codes_used"]}
        return [coarse, fine], loss + coarse_loss, [coarse_indices, indices], stats

    def code_quantizers(self):
        """Every level's quantizer, coarse first."""
        return ([self.coarse.quantizer] if self.coarse is not None else []) + [self.quantizer]

    def code_parameters(self):
        """What decides the codes: the encoder's weights and every level's codebook (and the
        coarse level's encoding)."""
        parts = [self.encoder, self.quantizer] + ([self.coarse] if self.coarse is not None else [])
        return [p for part in parts for p in part.parameters()]

    # The hand-off to the prior: images to code indices, and code indices back to images.
    # (codes.py runs them over a whole split in batches.)

    @torch.no_grad()
    def reconstruct(self, x):
        return torch.sigmoid(self.forward(x)[0]).float()

    @torch.no_grad()
    def encode_levels(self, x):
        """Code indices of every level, coarse first: [(B, h, w)], or [(B, h/2, w/2), (B, h, w)]."""
        if self.coarse is None:
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
        if self.coarse is not None:
            coarse = self.coarse.upsample(self.coarse.quantizer.codebook[levels[0]].permute(0, 3, 1, 2))
            z_q = torch.cat([coarse, z_q], dim=1)
        return torch.sigmoid(self.decoder(z_q)).float()


# ----------------------------------------------------------------------------- PixelCNN priors

@dataclass
class PixelCNNConfig:
    num_codes: int = opt(256, "codebook size; taken from the VQ-VAE checkpoint")
    kind: str = opt("gated", "gated: vertical+horizontal stacks, no blind spot; plain: masked convolutions",
                    choices=["gated", "plain"])
    hidden: int = opt(32, "channels in every layer")
    n_layers: int = opt(16, "layers; gated layers widen the view by kernel // 2 rows and columns each", minimum=1)
    kernel: int = opt(5, "kernel width of the gated layers (odd)", minimum=3)
    n_conditions: int = opt(32, "slice positions to condition on; 0 = unconditional")
    grid_size: int = opt(32, "side of the code grid; taken from the VQ-VAE checkpoint")
    dropout: float = opt(0.0, "dropout inside the layers")
    context_codes: int = opt(0, "a detail prior's coarse codebook size, whose codes it is conditioned on "
                                "(taken from a two-level VQ-VAE); 0 = a prior of the coarsest codes")


class MaskedConv2d(nn.Conv2d):
    """Convolution that sees only positions before the centre in raster order.

    Type A also hides the centre (first layer: a code must not see itself);
    type B shows it (later layers: the centre then holds features of earlier codes).
    """

    def __init__(self, in_channels, out_channels, kernel_size, mask_type):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        k = kernel_size
        mask = torch.ones(k, k)
        mask[k // 2, k // 2 + (mask_type == "B"):] = 0
        mask[k // 2 + 1:] = 0
        self.register_buffer("mask", mask[None, None])

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


def rows_per_layer(cfg: PixelCNNConfig):
    """How many rows each layer adds to what a code sees above it."""
    return cfg.kernel // 2 if cfg.kind == "gated" else 1


def rows_seen_above(cfg: PixelCNNConfig):
    """How many rows above a code its prediction can depend on. Below grid_size - 1 the
    bottom rows are predicted without seeing the top of the slice."""
    # gated: the vertical stack reaches the horizontal one shifted down a row; plain: the 7x7 type-A layer
    start = 1 if cfg.kind == "gated" else 3
    return start + cfg.n_layers * rows_per_layer(cfg)


def columns_seen(cfg: PixelCNNConfig):
    """How many columns of its row, itself included, the gated model's output at a position
    depends on through its horizontal stacks: each layer reaches kernel // 2 further left."""
    return cfg.n_layers * (cfg.kernel // 2) + 1


class CodeEmbedding(nn.Module):
    """Code embeddings plus a learnt embedding of each grid position.

    Without the position a layer only knows where it is from the zero padding within
    its receptive field, and samples drift: a second head starts at the bottom of the grid.
    The position is not data, so adding it everywhere keeps the model causal.
    """

    def __init__(self, num_codes, hidden, grid_size):
        super().__init__()
        self.codes = nn.Embedding(num_codes, hidden)
        self.position = nn.Parameter(torch.zeros(1, hidden, grid_size, grid_size))
        nn.init.normal_(self.position, std=0.02)

    def forward(self, indices, row_offset=0, col_offset=0):
        """indices (B, h, w), rows starting at row_offset, columns at col_offset -> (B, hidden, h, w).
        col_offset may also be a (B,) tensor: one-row bands (h = 1), each from its own column."""
        h, w = indices.shape[1:]
        x = self.codes(indices).permute(0, 3, 1, 2)
        if torch.is_tensor(col_offset):
            cols = col_offset[:, None] + torch.arange(w, device=indices.device)
            return x + self.position[0, :, row_offset, cols].permute(1, 0, 2)[:, :, None]
        return x + self.position[:, :, row_offset:row_offset + h, col_offset:col_offset + w]


def zero_embedding(n, dim):
    """A conditioning embedding that starts at zero. With the default N(0, 1) start every
    slice position adds its own large random bias to each gate, saturating them, and a
    conditioned prior learnt more slowly than an unconditioned one."""
    embedding = nn.Embedding(n, dim)
    nn.init.zeros_(embedding.weight)
    return embedding


class PlainResidualBlock(nn.Module):
    def __init__(self, hidden, dropout):
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(), nn.Conv2d(hidden, hidden // 2, 1),
            nn.ReLU(), MaskedConv2d(hidden // 2, hidden // 2, 3, "B"),
            nn.ReLU(), nn.Dropout(dropout), nn.Conv2d(hidden // 2, hidden, 1),
        )

    def forward(self, x):
        return x + self.net(x)


class PlainPixelCNN(nn.Module):
    """PixelCNN of masked convolutions (van den Oord et al. 2016, arXiv 1601.06759)."""

    def __init__(self, cfg: PixelCNNConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = CodeEmbedding(cfg.num_codes, cfg.hidden, cfg.grid_size)
        self.cond = zero_embedding(cfg.n_conditions, cfg.hidden) if cfg.n_conditions else None
        self.first = MaskedConv2d(cfg.hidden, cfg.hidden, 7, "A")
        self.blocks = nn.Sequential(*(PlainResidualBlock(cfg.hidden, cfg.dropout)
                                      for _ in range(cfg.n_layers)))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(cfg.hidden, cfg.hidden, 1), nn.ReLU(),
                                  nn.Conv2d(cfg.hidden, cfg.num_codes, 1))

    def forward(self, indices, cond=None):
        x = self.first(self.embed(indices))
        if self.cond is not None:
            x = x + self.cond(cond)[:, :, None, None]
        return self.head(self.blocks(x))


def gate(x, cond_bias=None):
    if cond_bias is not None:
        x = x + cond_bias
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class CoarseContext(nn.Module):
    """What a detail prior knows of the coarse codes: their embeddings mixed by ordinary (not
    masked) convolutions, since every coarse code is known before the first fine one is drawn,
    then upsampled to the fine grid (twice the side)."""

    def __init__(self, num_codes, hidden, n_blocks=3):
        super().__init__()
        self.embed = nn.Embedding(num_codes, hidden)
        self.mix = nn.Sequential(*(nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU())
                                   for _ in range(n_blocks)))
        self.upsample = nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1)

    def forward(self, coarse):
        """coarse codes (B, h, w) -> features (B, hidden, 2h, 2w)."""
        x = self.embed(coarse).permute(0, 3, 1, 2)
        return self.upsample(x + self.mix(x))


def crop(bias, rows, cols):
    """A layer's conditioning bias over rows x cols of the grid; a per-slice bias (1x1) holds
    everywhere as it is."""
    if bias is None or bias.shape[-2:] == (1, 1):
        return bias
    return bias[..., rows, cols]


class GatedLayer(nn.Module):
    """One gated layer with a vertical and a horizontal stack (arXiv 1606.05328, fig. 2).

    The vertical stack sees the rows at and above each position (its output at row r
    depends on input rows <= r); it reaches the horizontal stack shifted down one row,
    so row r's horizontal stack only hears about rows < r. The horizontal stack sees the
    current row up to the centre, excluding it in the first layer. Together they cover
    everything above and to the left, with no blind spot.
    """

    def __init__(self, hidden, kernel, first, n_conditions, dropout, last=False, context=False):
        super().__init__()
        half = kernel // 2
        self.first = first
        self.v_pad = (half, half, half, 0)                  # left, right, top, bottom
        self.v_conv = nn.Conv2d(hidden, 2 * hidden, (half + 1, kernel))
        h_width = half if first else half + 1
        self.h_pad = (h_width - 1 + first, 0, 0, 0)
        self.h_conv = nn.Conv2d(hidden, 2 * hidden, (1, h_width))
        self.v_to_h = nn.Conv2d(2 * hidden, 2 * hidden, 1)
        # The last layer speaks only through its skip connection (no unused weights, which
        # DistributedDataParallel would wait for).
        self.h_out = None if last else nn.Conv2d(hidden, hidden, 1)
        self.skip = nn.Conv2d(hidden, hidden, 1)
        self.dropout = nn.Dropout(dropout)
        self.cond = zero_embedding(n_conditions, 4 * hidden) if n_conditions else None
        self.context = nn.Conv2d(hidden, 4 * hidden, 1) if context else None

    def bias(self, cond=None, context=None):
        """What the conditioning adds before this layer's gates, (B, 4 * hidden, 1, 1) for a slice
        position, (B, 4 * hidden, H, W) for coarse-code features; the vertical stack's half first."""
        if self.context is not None and context is not None:
            return self.context(context)
        if self.cond is not None and cond is not None:
            return self.cond(cond)[:, :, None, None]
        return None

    def vertical(self, v, bias):
        """-> (vertical output, pre-gate features shifted down one row for the horizontal stack)."""
        pre = self.v_conv(F.pad(v, self.v_pad))
        v_out = gate(pre, half(bias, 0))
        shifted = F.pad(pre, (0, 0, 1, 0))[:, :, :-1]
        return v_out, shifted

    def vertical_row(self, window, bias):
        """vertical() at one row, from the kernel // 2 + 1 rows of input at and above it (zeros
        above the grid) -> (output row, its pre-gate features)."""
        pre = self.v_conv(F.pad(window, self.v_pad[:2]))
        return gate(pre, half(bias, 0)), pre

    def horizontal(self, h, v_shifted, bias):
        """Works on any band of rows: the horizontal stack never mixes rows."""
        if self.first:
            pre = self.h_conv(F.pad(h, self.h_pad)[..., :-1])   # exclude the centre
        else:
            pre = self.h_conv(F.pad(h, self.h_pad))
        out = self.dropout(gate(pre + self.v_to_h(v_shifted), half(bias, 1)))
        skip = self.skip(out)
        if self.h_out is None:
            return None, skip
        h_out = self.h_out(out)
        return (h_out if self.first else h + h_out), skip


def half(bias, which):
    """The vertical (0) or horizontal (1) stack's half of a layer's conditioning bias."""
    return None if bias is None else bias.chunk(2, dim=1)[which]


class GatedPixelCNN(nn.Module):
    """The gated PixelCNN. `cond` is what it is conditioned on: slice positions (B,) long, or, for
    a detail prior (cfg.context_codes > 0), the coarse code grids (B, H/2, W/2)."""

    def __init__(self, cfg: PixelCNNConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = CodeEmbedding(cfg.num_codes, cfg.hidden, cfg.grid_size)
        self.context = CoarseContext(cfg.context_codes, cfg.hidden) if cfg.context_codes else None
        self.layers = nn.ModuleList(
            GatedLayer(cfg.hidden, cfg.kernel, i == 0, 0 if cfg.context_codes else cfg.n_conditions, cfg.dropout,
                       last=i == cfg.n_layers - 1, context=bool(cfg.context_codes))
            for i in range(cfg.n_layers)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(cfg.hidden, cfg.hidden, 1), nn.ReLU(),
                                  nn.Conv2d(cfg.hidden, cfg.num_codes, 1))

    def layer_biases(self, cond=None):
        """Each layer's conditioning bias over the whole grid (None where there is none)."""
        if cond is None:
            return [None] * len(self.layers)
        if self.context is not None:
            context = self.context(cond)
            return [layer.bias(context=context) for layer in self.layers]
        return [layer.bias(cond=cond) for layer in self.layers]

    def vertical_features(self, indices, biases):
        """Shifted vertical features of every layer; row r depends on code rows < r only."""
        v = self.embed(indices)
        features = []
        for layer, bias in zip(self.layers, biases):
            v, shifted = layer.vertical(v, bias)
            features.append(shifted)
        return features

    def horizontal_logits(self, indices, v_features, biases, row_offset=0, col_offset=0):
        """Logits over a band of rows starting at row_offset (and of columns at col_offset), given
        the vertical features and the biases cropped to that band."""
        h = self.embed(indices, row_offset, col_offset)
        skips = 0
        for layer, v_shifted, bias in zip(self.layers, v_features, biases):
            h, skip = layer.horizontal(h, v_shifted, bias)
            skips = skips + skip
        return self.head(skips)

    def forward(self, indices, cond=None):
        """indices (B, H, W) long -> logits (B, num_codes, H, W)."""
        biases = self.layer_biases(cond)
        return self.horizontal_logits(indices, self.vertical_features(indices, biases), biases)


def build_prior(cfg: PixelCNNConfig):
    if cfg.context_codes and cfg.kind != "gated":
        raise ValueError("a detail prior (context_codes > 0) is a gated PixelCNN")
    if cfg.kind == "gated":
        return GatedPixelCNN(cfg)
    if cfg.kind == "plain":
        return PlainPixelCNN(cfg)
    raise ValueError(f"unknown PixelCNN kind {cfg.kind!r}; expected 'gated' or 'plain'")


class Priors(NamedTuple):
    """The priors that turn into a VQ-VAE's codes: over the coarsest codes, and for a two-level
    VQ-VAE the detail prior of the fine codes given them (None for one level)."""
    coarse: nn.Module
    detail: nn.Module | None = None
