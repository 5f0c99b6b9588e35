"""PixelCNN priors over the VQ-VAE's code indices (plain masked, and gated as in arXiv
1606.05328), conditioned on slice position; the detail prior of a two-level VQ-VAE, a gated
PixelCNN over the fine codes conditioned on the coarse ones; sampling, per-code NLL and
healing. No I/O."""
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import opt
from errors import DataError


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


def rows_per_layer(cfg: PixelCNNConfig):
    """How many rows each layer adds to what a code sees above it."""
    return cfg.kernel // 2 if cfg.kind == "gated" else 1


def rows_seen_above(cfg: PixelCNNConfig):
    """How many rows above a code its prediction can depend on. Below grid_size - 1 the
    bottom rows are predicted without seeing the top of the slice."""
    # gated: the vertical stack reaches the horizontal one shifted down a row; plain: the 7x7 type-A layer
    start = 1 if cfg.kind == "gated" else 3
    return start + cfg.n_layers * rows_per_layer(cfg)


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
        """indices (B, h, w), rows starting at row_offset, columns at col_offset -> (B, hidden, h, w)."""
        h, w = indices.shape[1:]
        x = self.codes(indices).permute(0, 3, 1, 2)
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


class Priors(NamedTuple):
    """The priors that turn into a VQ-VAE's codes: over the coarsest codes, and for a two-level
    VQ-VAE the detail prior of the fine codes given them (None for one level)."""
    coarse: nn.Module
    detail: nn.Module | None = None


def columns_seen(cfg: PixelCNNConfig):
    """How many columns of its row, itself included, the gated model's output at a position
    depends on through its horizontal stacks: each layer reaches kernel // 2 further left."""
    return cfg.n_layers * (cfg.kernel // 2) + 1


def row_band(model, codes, features, biases, row, col, who=None):
    """The gated model's logits at (row, col) from the one-row band that its horizontal stacks
    see there: the columns left of it within columns_seen, exact because nothing else reaches it.
    who: the slices wanted (None: all); each tensor is cropped before they are picked."""
    start = max(0, col + 1 - columns_seen(model.cfg))

    def pick(tensor):
        return tensor if who is None or tensor is None else tensor[who]
    band = pick(codes[:, row:row + 1, start:col + 1])
    left = [pick(f[..., start:col + 1]) for f in features]
    here = [pick(crop(b, slice(row, row + 1), slice(start, col + 1))) for b in biases]
    return model.horizontal_logits(band, left, here, row, start)[:, :, 0, -1]


def build_prior(cfg: PixelCNNConfig):
    if cfg.context_codes and cfg.kind != "gated":
        raise ValueError("a detail prior (context_codes > 0) is a gated PixelCNN")
    if cfg.kind == "gated":
        return GatedPixelCNN(cfg)
    if cfg.kind == "plain":
        return PlainPixelCNN(cfg)
    raise ValueError(f"unknown PixelCNN kind {cfg.kind!r}; expected 'gated' or 'plain'")


def slice_conditions(slice_idx, n_conditions, device=None):
    """What a prior of n_conditions slice positions is conditioned on: the slices' positions
    as a long tensor, or None for a prior conditioned on nothing."""
    if not n_conditions:
        return None
    if int(slice_idx.max()) >= n_conditions:
        raise DataError(f"slice index {int(slice_idx.max())} is beyond the prior's {n_conditions} positions "
                        f"(--n-conditions)")
    return torch.as_tensor(slice_idx, device=device)


def nucleus(probs, top_p):
    """Keep the most likely codes whose probabilities add up to top_p (at least one), renormalised
    (Holtzman et al. 2020); the unlikely tail is where an undertrained prior's errors live."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=1, descending=True)
    outside = sorted_probs.cumsum(dim=1) - sorted_probs >= top_p  # mass before this code already enough
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    kept = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    return kept / kept.sum(dim=1, keepdim=True)


@torch.no_grad()
def sample_codes(model, n, height, width, cond=None, temperature=1.0, generator=None,
                 progress=None, top_p=1.0):
    """Ancestral sampling in raster order; returns (n, height, width) code indices.

    The gated model advances its vertical stacks one finished row at a time (VerticalStacks)
    and runs only the cheap horizontal stack, over the columns it sees left of and at the
    position (row_band), per position; exact because rows never mix there.
    """
    device = next(model.parameters()).device
    codes = torch.zeros(n, height, width, dtype=torch.long, device=device)
    gated = isinstance(model, GatedPixelCNN)
    biases = model.layer_biases(cond) if gated else None
    stacks = VerticalStacks(model, n, width, biases) if gated else None
    for row in range(height):
        for col in range(width):
            # Outputs at (row, col) never depend on later rows or columns, so they are cropped away.
            if gated:
                logits = row_band(model, codes, stacks.features, biases, row, col)
            else:
                logits = model(codes[:, :row + 1], cond)[:, :, row, col]
            probs = nucleus(F.softmax(logits.float() / temperature, dim=1), top_p)
            codes[:, row, col] = torch.multinomial(probs, 1, generator=generator)[:, 0]
        if gated:
            stacks.advance(codes[:, row], row)
        if progress is not None:
            progress.update(1)
    return codes


@torch.no_grad()
def sample_levels(prior, detail, n, grid, cond=None, generator=None, progress=None, **sampling):
    """Code grids of every level a VQ-VAE decodes, coarse first: the prior's (height, width) =
    grid, and with a detail prior the fine grids (twice the side) drawn given them."""
    height, width = grid
    coarse = sample_codes(prior, n, height, width, cond, generator=generator, progress=progress, **sampling)
    if detail is None:
        return [coarse]
    return [coarse, sample_codes(detail, n, 2 * height, 2 * width, coarse, generator=generator, progress=progress,
                                 **sampling)]


@torch.no_grad()
def code_nll(model, codes, cond=None):
    """-log p(code | the codes before it) of every code, in nats, from one pass of the prior;
    (n, height, width)."""
    return F.cross_entropy(model(codes, cond).float(), codes, reduction="none")


class VerticalStacks:
    """The gated model's vertical stacks, advanced one finished code row at a time.

    Rather than running the stacks over every row above at each row, each layer keeps only
    the kernel // 2 + 1 rows of its input that its next output row needs, so a whole grid
    costs one pass of the stacks. `features` are what the horizontal stacks of the next row
    hear from above (row 0 hears nothing)."""

    def __init__(self, model, n, width, biases):
        self.model, self.biases = model, biases
        like = model.embed.position  # for the device and dtype
        hidden, rows = model.cfg.hidden, model.cfg.kernel // 2 + 1
        self.windows = [like.new_zeros(n, hidden, rows, width) for _ in model.layers]
        self.features = [like.new_zeros(n, 2 * hidden, 1, width) for _ in model.layers]

    def advance(self, codes_row, row):
        """Take in the finished code row `row` (n, width); `features` then serve row + 1."""
        v = self.model.embed(codes_row[:, None], row)
        for i, (layer, bias) in enumerate(zip(self.model.layers, self.biases)):
            self.windows[i] = torch.cat([self.windows[i][:, :, 1:], v], dim=2)
            v, self.features[i] = layer.vertical_row(self.windows[i], crop(bias, slice(row, row + 1), slice(None)))


@torch.no_grad()
def heal_codes(model, codes, resample, cond=None, temperature=1.0, generator=None, progress=None):
    """The codes where `resample` is set drawn afresh from the prior, in raster order, each given
    the codes before it as healed so far; every other code is kept ("healing", Pinaya et al.,
    Medical Image Analysis 2022). codes, resample: (n, height, width); returns new codes.

    Only the slices flagged at a position are drawn there, and rows where no slice has a flag
    cost only the gated model's one-row step of its vertical stacks (VerticalStacks)."""
    healed = codes.clone()
    n, height, width = codes.shape
    flagged = resample.any(dim=0).cpu()
    rows = flagged.any(dim=1).nonzero()[:, 0].tolist()
    last_row = rows[-1] if rows else -1
    gated = isinstance(model, GatedPixelCNN)
    biases = model.layer_biases(cond) if gated else None
    stacks = VerticalStacks(model, n, width, biases) if gated else None
    for row in range(last_row + 1):
        for col in flagged[row].nonzero()[:, 0].tolist():
            who = resample[:, row, col].nonzero()[:, 0]
            who_cond = cond[who] if cond is not None else None
            if gated:
                logits = row_band(model, healed, stacks.features, biases, row, col, who)
            else:
                logits = model(healed[who, :row + 1], who_cond)[:, :, row, col]
            probs = F.softmax(logits.float() / temperature, dim=1)
            healed[who, row, col] = torch.multinomial(probs, 1, generator=generator)[:, 0]
        if gated:
            stacks.advance(healed[:, row], row)
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.update(height - last_row - 1)  # the rows below the last flag need nothing
    return healed


@torch.no_grad()
def most_likely_positions(prior, codes, n_conditions, batch_size=64):
    """For each code grid, the slice position under which the prior finds it most likely."""
    nll = torch.stack([torch.cat([code_nll(prior, codes[i:i + batch_size],
                                           torch.full((len(codes[i:i + batch_size]),), c, device=codes.device))
                                  .sum(dim=(1, 2)) for i in range(0, len(codes), batch_size)])
                       for c in range(n_conditions)])
    return nll.argmin(dim=0).cpu().numpy()
