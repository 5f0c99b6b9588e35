"""The priors at work: ancestral sampling of every code level, per-code NLL, healing (redrawing chosen codes), and the slice positions a prior is
conditioned on. The gated model is advanced a row at a time (VerticalStacks) rather than run over
the whole grid for each code. The networks themselves: modules.py. No I/O."""
import torch
import torch.nn.functional as F

from errors import DataError
from modules import GatedPixelCNN, columns_seen, crop

class RowBiases:
    """The gated model's conditioning biases, one code row at a time (`at`). Over a whole grid a
    detail prior's biases hold 4 x hidden numbers per fine code and layer (gigabytes for a batch
    of healing); its coarse-code features hold hidden, so they are kept instead and a row's
    biases made from them when it is reached (the layers' context convolutions are 1x1: exact)."""

    def __init__(self, model, cond):
        self.model, self.row, self.biases = model, None, None
        self.context = model.context(cond) if model.context is not None and cond is not None else None
        self.whole = model.layer_biases(cond) if self.context is None else None

    def at(self, row):
        """Each layer's bias over row `row`: (n, 4 * hidden, 1, width), or 1x1 per slice, or None."""
        if self.row != row:
            if self.context is None:
                self.biases = [crop(b, slice(row, row + 1), slice(None)) for b in self.whole]
            else:
                band = self.context[:, :, row:row + 1]
                self.biases = [layer.bias(context=band) for layer in self.model.layers]
            self.row = row
        return self.biases


def bands_at(model, codes, features, biases, row, cols, who):
    """The gated model's logits (m, num_codes) for the slices `who` (m,), each at its own column
    cols (m,) of `row`, from one pass of its horizontal stacks over one-row bands: each band holds
    the columns left of its code that the stacks see (columns_seen; from the row's start where
    fewer), exact because rows never mix there and later columns never reach a code.
    features: VerticalStacks.features; biases: RowBiases."""
    seen = min(columns_seen(model.cfg), codes.shape[-1])
    starts = (cols + 1 - seen).clamp(min=0)
    columns = starts[:, None] + torch.arange(seen, device=codes.device)

    def gather(tensor):
        """A (n, channels, 1, width) tensor's band of each slice of who -> (m, channels, 1, seen); a
        per-slice bias (1x1) of each slice of who as it is."""
        if tensor is None:
            return None
        if tensor.shape[-2:] == (1, 1):
            return tensor[who]
        # slices and columns indexed together: only the bands are copied, never whole rows
        return tensor[who[:, None], :, 0, columns].permute(0, 2, 1)[:, :, None]
    band = codes[who[:, None], row, columns][:, None]
    logits = model.horizontal_logits(band, [gather(f) for f in features], [gather(b) for b in biases.at(row)],
                                     row, starts)
    return logits[torch.arange(len(who), device=codes.device), :, 0, cols - starts]


def flags_in_turn(flags):
    """A row's flags (n, width) as turns (slices, columns): turn k holds every slice's k-th flagged
    column, so each slice's codes are drawn left to right, every slice's at once."""
    turn = flags.long().cumsum(dim=1) - 1
    for k in range(int(flags.sum(dim=1).max())):
        yield (flags & (turn == k)).nonzero(as_tuple=True)


def padded_to_power_of_two(who, cols):
    """A turn's slices and columns repeated up to a power of two in number: the bands then come in
    a handful of shapes, where oneDNN builds (and keeps, with its buffers) a convolution for each
    new one; a turn of every possible size took hundreds of MB more."""
    size = 1 << (len(who) - 1).bit_length()
    extra = torch.zeros(size - len(who), dtype=who.dtype, device=who.device)
    return torch.cat([who, who[extra]]), torch.cat([cols, cols[extra]])


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
    position (bands_at, every slice at the same column), per position; exact because rows never
    mix there.
    """
    device = next(model.parameters()).device
    codes = torch.zeros(n, height, width, dtype=torch.long, device=device)
    everyone = torch.arange(n, device=device)
    gated = isinstance(model, GatedPixelCNN)
    biases = RowBiases(model, cond) if gated else None
    stacks = VerticalStacks(model, n, width, biases) if gated else None
    for row in range(height):
        for col in range(width):
            # Outputs at (row, col) never depend on later rows or columns, so they are cropped away.
            if gated:
                logits = bands_at(model, codes, stacks.features, biases, row, torch.full_like(everyone, col),
                                  everyone)
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
def sample_fine(detail, coarse, generator=None, progress=None, **sampling):
    """Fine code grids (twice the side) drawn by the detail prior under given coarse codes (n, h, w):
    the prior's, or a real slice's, which isolates what the detail prior adds."""
    n, height, width = coarse.shape
    return sample_codes(detail, n, 2 * height, 2 * width, coarse, generator=generator, progress=progress, **sampling)


@torch.no_grad()
def sample_levels(prior, detail, n, grid, cond=None, generator=None, progress=None, detail_sampling=None,
                  **sampling):
    """Code grids of every level a VQ-VAE decodes, coarse first: the prior's (height, width) =
    grid, and with a detail prior the fine grids (twice the side) drawn given them. sampling:
    temperature and top_p of the prior; detail_sampling: the detail prior's (None: the same)."""
    height, width = grid
    coarse = sample_codes(prior, n, height, width, cond, generator=generator, progress=progress, **sampling)
    if detail is None:
        return [coarse]
    detail_sampling = sampling if detail_sampling is None else detail_sampling
    return [coarse, sample_fine(detail, coarse, generator=generator, progress=progress, **detail_sampling)]


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
        for i, (layer, bias) in enumerate(zip(self.model.layers, self.biases.at(row))):
            self.windows[i] = torch.cat([self.windows[i][:, :, 1:], v], dim=2)
            v, self.features[i] = layer.vertical_row(self.windows[i], bias)


@torch.no_grad()
def heal_codes(model, codes, resample, cond=None, temperature=1.0, generator=None, progress=None):
    """The codes where `resample` is set drawn afresh from the prior, in raster order, each given
    the codes before it as healed so far; every other code is kept ("healing", Pinaya et al.,
    Medical Image Analysis 2022). codes, resample: (n, height, width); returns new codes.

    Only the slices flagged at a position are drawn there. A row is drawn in turns, each slice's
    k-th flagged code in turn k (bands_at: one pass of the horizontal stacks for every slice at
    once), so a row costs as many passes as one slice has flags in it, not as many as all slices
    together; rows where no slice has a flag cost only the gated model's one-row step of its
    vertical stacks (VerticalStacks)."""
    healed = codes.clone()
    n, height, width = codes.shape
    rows = resample.any(dim=2).any(dim=0).nonzero()[:, 0].tolist()
    last_row = rows[-1] if rows else -1
    gated = isinstance(model, GatedPixelCNN)
    biases = RowBiases(model, cond) if gated else None
    stacks = VerticalStacks(model, n, width, biases) if gated else None
    for row in range(last_row + 1):
        for who, cols in flags_in_turn(resample[:, row]):
            if gated:
                padded_who, padded_cols = padded_to_power_of_two(who, cols)
                logits = bands_at(model, healed, stacks.features, biases, row, padded_cols, padded_who)[:len(who)]
            else:
                logits = model(healed[who, :row + 1], None if cond is None else cond[who])[
                    torch.arange(len(who), device=codes.device), :, row, cols]
            probs = F.softmax(logits.float() / temperature, dim=1)
            healed[who, row, cols] = torch.multinomial(probs, 1, generator=generator)[:, 0]
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
