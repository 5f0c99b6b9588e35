"""Every figure the project reports, one helper a formula: SSIM and PSNR (scikit-image, on
[0, 1] images with data_range=1.0), codebook perplexity, and the detection figures of the
anomaly maps (AUROC, AUPRC, Dice)."""
import numpy as np
import torch
from scipy.stats import rankdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

# Keeps log(0) out of the entropy of a distribution with unused codes.
PERPLEXITY_EPS = 1e-12
# skimage.metrics.structural_similarity's defaults: 7 x 7 uniform window, sample covariance.
SSIM_WINDOW, SSIM_K1, SSIM_K2 = 7, 0.01, 0.03



def perplexity(probs):
    """exp(entropy) of a distribution over codes: the number of equally used codes it matches."""
    return torch.exp(-(probs * torch.log(probs + PERPLEXITY_EPS)).sum())


def codebook_usage(counts):
    """(perplexity, codes used) of per-code counts."""
    probs = counts.double() / max(int(counts.sum()), 1)
    return float(perplexity(probs)), int((counts > 0).sum())


def to_numpy_images(batch):
    """(B, 1, H, W) tensor or (B, H, W) array in [0, 1] -> (B, H, W) float64 numpy, clipped to [0, 1]."""
    if isinstance(batch, torch.Tensor):
        batch = batch.detach().float().clamp(0, 1).squeeze(1).cpu().numpy()
    return np.clip(np.asarray(batch, dtype=np.float64), 0, 1)


def ssim_per_image(originals, reconstructions):
    """scikit-image SSIM of each pair, on [0, 1] images with data_range=1.0."""
    a, b = to_numpy_images(originals), to_numpy_images(reconstructions)
    return np.array([structural_similarity(x, y, data_range=1.0) for x, y in zip(a, b)])


def psnr_per_image(originals, reconstructions):
    a, b = to_numpy_images(originals), to_numpy_images(reconstructions)
    return np.array([peak_signal_noise_ratio(x, y, data_range=1.0) for x, y in zip(a, b)])


def gradient_magnitude(images):
    """(N, H, W) images in [0, 1] -> the magnitude of numpy.gradient at each pixel, (N, H, W)."""
    rows, cols = np.gradient(np.asarray(images, dtype=np.float64), axis=(1, 2))
    return np.hypot(rows, cols)


def edge_sums(images, references, inside):
    """The summed gradient magnitudes of images and of their references over the pixels `inside`:
    sharpness's two terms, which processes holding a share of the images each add up."""
    return float(gradient_magnitude(images)[inside].sum()), float(gradient_magnitude(references)[inside].sum())


def sharpness(images, references, inside):
    """Mean gradient magnitude of images over that of their references, over the pixels `inside`
    (bool, like the images): 1.0 = edges as strong as the references'. A blur lowers it; noise
    raises it, so it is read beside SSIM, never alone. Inputs (N, H, W) in [0, 1], same size."""
    edges, reference_edges = edge_sums(images, references, inside)
    return edges / reference_edges


def _window_means(x, out=None, scratch=None):
    """(N, H, W) -> the mean over every SSIM window that fits inside the image, (N, H-6, W-6),
    into `out` when given (`scratch`: (N, H, W-6)). Shifted in-place sums: on a CPU they run
    faster than avg_pool2d, and this loop is where ssim_matrix spends its time."""
    n, height, width = x.shape
    k, h, w = SSIM_WINDOW, height - SSIM_WINDOW + 1, width - SSIM_WINDOW + 1
    rows = x.new_empty(n, height, w) if scratch is None else scratch
    torch.add(x[:, :, :w], x[:, :, 1:w + 1], out=rows)
    for shift in range(2, k):
        rows += x[:, :, shift:shift + w]
    out = x.new_empty(n, h, w) if out is None else out
    torch.add(rows[:, :h], rows[:, 1:h + 1], out=out)
    for shift in range(2, k):
        out += rows[:, shift:shift + h]
    return out.div_(k * k)


@torch.no_grad()
def ssim_matrix(queries, references, chunk=32, device="cpu"):
    """SSIM of every query against every reference: (Q, R) float64 numpy.

    The number ssim_per_image (skimage structural_similarity, data_range=1.0) gives for each
    pair (to 1e-10), batched, because one skimage call per pair is far too slow for every
    sample against every training slice. skimage filters with a 7 x 7 window and then drops
    a 3-pixel border, which leaves exactly the windows that fit inside the image, as here.
    Small reference chunks stay in cache. Inputs: (N, 1, H, W) or (N, H, W) in [0, 1]."""
    def prepare(x):
        x = torch.as_tensor(x).to(device=device, dtype=torch.float64).clamp(0, 1)
        return x[:, 0] if x.dim() == 4 else x

    queries = prepare(queries)
    cov_norm = SSIM_WINDOW ** 2 / (SSIM_WINDOW ** 2 - 1)
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2  # data_range 1.0
    mean_q = _window_means(queries)
    var_q = cov_norm * (_window_means(queries * queries) - mean_q ** 2)
    square_mean_q = mean_q ** 2
    result = torch.empty(len(queries), len(references), dtype=torch.float64)
    for start in range(0, len(references), chunk):
        refs = prepare(references[start:start + chunk])
        mean_r = _window_means(refs)
        var_r_c2 = cov_norm * (_window_means(refs * refs) - mean_r ** 2) + c2
        square_mean_r_c1 = mean_r ** 2 + c1
        product, scratch = torch.empty_like(refs), refs.new_empty(refs.shape[:2] + mean_r.shape[2:])
        ssim, denominator = torch.empty_like(mean_r), torch.empty_like(mean_r)
        for i, query in enumerate(queries):
            # S = (2 mu_q mu_r + C1)(2 cov + C2) / ((mu_q^2 + mu_r^2 + C1)(var_q + var_r + C2)),
            # in place in preallocated buffers
            torch.mul(refs, query, out=product)
            _window_means(product, out=ssim, scratch=scratch)
            ssim.addcmul_(mean_r, mean_q[i], value=-1).mul_(2 * cov_norm).add_(c2)
            ssim.mul_(torch.mul(mean_r, mean_q[i], out=denominator).mul_(2).add_(c1))
            ssim.div_(torch.add(square_mean_r_c1, square_mean_q[i], out=denominator))
            ssim.div_(torch.add(var_r_c2, var_q[i], out=denominator))
            result[i, start:start + len(refs)] = ssim.mean(dim=(1, 2)).cpu()
    return result.numpy()



def auroc(scores, labels):
    """Area under the ROC curve: the chance that a positive scores above a negative, ties
    counting half (Mann-Whitney); nan without both classes."""
    labels = np.asarray(labels, dtype=bool)
    positives, negatives = labels.sum(), labels.size - labels.sum()
    if not positives or not negatives:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def ranked_counts(scores, labels):
    """For each distinct score, highest first: (the score, positives and items scoring at least it)."""
    scores, labels = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels, dtype=bool).ravel()
    if not scores.size:
        return scores, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last_of_each = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    return scores[last_of_each], np.cumsum(labels)[last_of_each], last_of_each + 1


def average_precision(scores, labels):
    """AUPRC as average precision: the precision at each threshold weighted by the recall it
    adds (scikit-learn's definition); nan without positives."""
    _, true_positives, called = ranked_counts(scores, labels)
    if not true_positives.size or not true_positives[-1]:
        return float("nan")
    recall = true_positives / true_positives[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * true_positives / called))


def best_dice(scores, labels):
    """(the best Dice over every threshold, that threshold): items scoring at least the
    threshold are called positive. (nan, inf) without positives."""
    thresholds, true_positives, called = ranked_counts(scores, labels)
    if not true_positives.size or not true_positives[-1]:
        return float("nan"), float("inf")
    dice = 2 * true_positives / (called + true_positives[-1])
    best = int(np.argmax(dice))
    return float(dice[best]), float(thresholds[best])


def dice_at(scores, labels, threshold):
    """Dice of the items scoring at least `threshold` against the labels; nan if both are empty."""
    called, labels = np.asarray(scores) >= threshold, np.asarray(labels, dtype=bool)
    total = called.sum() + labels.sum()
    return float(2 * (called & labels).sum() / total) if total else float("nan")


