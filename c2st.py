"""The classifier two-sample test (C2ST) and the two controls that make its verdict count.

realism.py judges the prior's samples with it; everything here works on image tensors
(N, 1, H, W) in [0, 1] and numpy arrays of subject ids.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from errors import DataError

# ----------------------------------------------------------------------------- the two-sample test
#
# A classifier two-sample test (C2ST; Lopez-Paz & Oquab 2017): a small CNN learns to tell
# generated slices from real ones, and its accuracy on held-out images is the verdict
# (0.5 = indistinguishable). Two traps make such numbers lie, and both are closed here:
# - a subject's 32 slices are near copies, so a classifier scored on slices of subjects
#   it trained on recognises subjects and tells real slices from other real slices
#   (RESULTS.md has the figures). Folds are grouped by subject;
# - a classifier too weak to see anything also scores 0.5. Two controls run with the same
#   classifier and budget every time, and the verdict counts only when both pass.

# The real-vs-real control must land here, and the blurred-vs-real control at or above
# the minimum, for the classifier's verdict on the prior to count.
REAL_VS_REAL_RANGE = (0.35, 0.65)
BLURRED_MIN_ACCURACY = 0.9
# The image size the classifier sees unless told otherwise: a coarse view.
C2ST_COARSE_SIZE = 64
# The blur the classifier must see: sigma 2 px on a 256 x 256 slice, scaled with the size.
BLUR_SIGMA_AT_256 = 2.0


# ----------------------------------------------------------------------------- its classifier

C2ST_CHANNELS = (16, 32, 64, 64)


class TwoSampleClassifier(nn.Module):
    """Small and fixed on purpose: accuracies from different runs compare only if the judge
    is the same. BatchNorm because without it, on tests/test_realism.py's synthetic slices
    and budget, the classifier could not tell slices from their blurred copies (RESULTS.md)."""

    def __init__(self, channels=C2ST_CHANNELS):
        super().__init__()
        layers, width = [], 1
        for c in channels:
            layers += [nn.Conv2d(width, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            width = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))[:, 0]


# ----------------------------------------------------------------------------- cross-validation


def c2st_architecture(input_size):
    widths = "-".join(str(c) for c in C2ST_CHANNELS)
    return (f"{input_size}x{input_size} input; {len(C2ST_CHANNELS)} x (conv 3x3 stride 2, BatchNorm, "
            f"ReLU), channels {widths}; global average pool; linear -> 1 logit")


def classifier_input(images, size):
    """(N, 1, H, W) in [0, 1] -> float32, area-downsampled to size x size when larger."""
    images = images.float()
    if images.shape[-1] > size:
        images = F.interpolate(images, size=(size, size), mode="area")
    return images


def group_k_fold(groups, n_folds, seed):
    """Fold (0..n_folds-1) of every item, all items of a group in one fold.

    Groups are shuffled with the seed, then placed largest first, each into the fold that
    holds fewest items so far, so folds come out near equal in size."""
    unique, inverse, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    if len(unique) < n_folds:
        raise DataError(f"{len(unique)} subjects cannot fill {n_folds} folds; use fewer folds")
    order = np.random.default_rng(seed).permutation(len(unique))
    order = order[np.argsort(-counts[order], kind="stable")]
    group_fold, sizes = np.empty(len(unique), dtype=np.int64), np.zeros(n_folds, dtype=np.int64)
    for g in order:
        group_fold[g] = int(np.argmin(sizes))
        sizes[group_fold[g]] += counts[g]
    return group_fold[inverse.reshape(-1)]


def two_sample_folds(groups_a, groups_b, n_folds, seed):
    """Folds of the items of sample a and of sample b, for a cross-validation that never
    scores an item whose group (subject) it trained on.

    groups_*: the group of each item, or an int count for independent draws (generated
    slices), which are spread over the folds at random. Groups found in both samples (a
    slice and its blurred copy) share one fold; otherwise each sample is spread over the
    folds on its own, so every fold holds both classes in about their overall ratio."""
    def independent(groups):
        return isinstance(groups, (int, np.integer))

    if not independent(groups_a) and not independent(groups_b) and np.intersect1d(groups_a, groups_b).size:
        folds = group_k_fold(np.concatenate([groups_a, groups_b]), n_folds, seed)
        return folds[:len(groups_a)], folds[len(groups_a):]
    return tuple(group_k_fold(np.arange(groups) if independent(groups) else groups, n_folds, seed + salt)
                 for salt, groups in enumerate((groups_a, groups_b)))


def fold_splits(folds):
    """[(train indices, test indices)] for each fold number in `folds`."""
    return [(np.flatnonzero(folds != k), np.flatnonzero(folds == k)) for k in np.unique(folds)]


def balanced_accuracy(predicted, labels):
    """Mean of the per-class accuracies: 0.5 for a guess even when a fold is lopsided."""
    return float(np.mean([(predicted[labels == c] == c).mean() for c in (0, 1)]))


def train_and_score(train_x, train_y, test_x, test_y, *, epochs, lr, batch_size, seed):
    """Train a fresh TwoSampleClassifier and return its balanced accuracy on the test items.
    Seeded without touching the global random state."""
    device = train_x.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = TwoSampleClassifier().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order_rng = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=order_rng).to(device)
        for start in range(0, len(order), batch_size):
            ids = order[start:start + batch_size]
            loss = F.binary_cross_entropy_with_logits(model(train_x[ids]), train_y[ids])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(test_x[i:i + 256]) > 0 for i in range(0, len(test_x), 256)])
    return balanced_accuracy(predicted.long().cpu().numpy(), test_y.long().cpu().numpy())


def classifier_two_sample_test(images_a, images_b, groups_a, groups_b, *, n_folds=5, epochs=20,
                               lr=1e-3, batch_size=32, seed=0, device="cpu", input_size=C2ST_COARSE_SIZE):
    """Cross-validated balanced accuracy of TwoSampleClassifier telling a (label 0) from b
    (label 1); 0.5 = indistinguishable.

    images_*: (N, 1, H, W) in [0, 1]; groups_*: each image's subject, or None for
    independent draws (see two_sample_folds). The larger sample is cut, at random, to the
    size of the smaller so the classes are balanced; the same seed gives the same number."""
    rng = np.random.default_rng(seed)
    n = min(len(images_a), len(images_b))
    keep_a, keep_b = (random_subset(len(x), n, rng) for x in (images_a, images_b))
    groups = [np.asarray(g)[k] if g is not None else n for g, k in ((groups_a, keep_a), (groups_b, keep_b))]
    folds_a, folds_b = two_sample_folds(*groups, n_folds, seed)
    device = torch.device(device)
    x = classifier_input(torch.cat([images_a[keep_a], images_b[keep_b]]), input_size).to(device)
    y = torch.cat([torch.zeros(n), torch.ones(n)]).to(device)
    splits = fold_splits(np.concatenate([folds_a, folds_b]))
    accuracies = [train_and_score(x[train], y[train], x[test], y[test], epochs=epochs, lr=lr,
                                  batch_size=batch_size, seed=seed * 1000 + k)
                  for k, (train, test) in enumerate(tqdm(splits, desc=f"two-sample test at {x.shape[-1]} px",
                                                         unit="fold", leave=False))]
    subjects = [len(np.unique(g)) if not isinstance(g, int) else None for g in groups]
    return {"accuracy": float(np.mean(accuracies)), "fold_accuracies": accuracies,
            "accuracy_kind": "balanced (mean of per-class accuracies) on held-out folds",
            "architecture": c2st_architecture(x.shape[-1]), "n_per_class": n,
            "n_subjects": {"a": subjects[0], "b": subjects[1]}, "n_folds": n_folds,
            "folds_grouped_by": "subject (case id); independent draws assigned at random",
            "budget": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "optimizer": "Adam"},
            "seed": seed}


def random_subset(n_items, n, rng):
    """Sorted indices of n of n_items items drawn without replacement (all when n >= n_items)."""
    return np.sort(rng.permutation(n_items)[:n])


def real_vs_real_control(images, case_ids, n_per_class, *, seed=0, **c2st):
    """C2ST between two disjoint halves of the subjects; it should score about 0.5."""
    rng = np.random.default_rng(seed)
    subjects = rng.permutation(np.unique(case_ids))
    in_a = np.isin(case_ids, subjects[:len(subjects) // 2])
    sides = []
    for side in (np.flatnonzero(in_a), np.flatnonzero(~in_a)):
        sides.append(side[random_subset(len(side), n_per_class, rng)])
    a, b = sides
    return classifier_two_sample_test(images[a], images[b], case_ids[a], case_ids[b], seed=seed, **c2st)


def blur_sigma(image_size):
    return BLUR_SIGMA_AT_256 * image_size / 256


def gaussian_blur(images, sigma):
    """(N, 1, H, W) tensor -> the same, each image blurred in-plane with a Gaussian of sigma px."""
    blurred = gaussian_filter(images.float().cpu().numpy(), sigma=(0, 0, sigma, sigma))
    return torch.from_numpy(blurred)


def blurred_vs_real_control(images, case_ids, n_per_class, *, sigma, seed=0, **c2st):
    """C2ST between slices and their blurred copies; it should score near 1.0. A slice and its
    copy share the subject's fold."""
    picked = random_subset(len(images), n_per_class, np.random.default_rng(seed))
    real = images[picked]
    result = classifier_two_sample_test(real, gaussian_blur(real, sigma), case_ids[picked],
                                        case_ids[picked], seed=seed, **c2st)
    return {**result, "blur_sigma_px": sigma}


def controls_pass(real_vs_real_accuracy, blurred_accuracy):
    low, high = REAL_VS_REAL_RANGE
    return bool(low <= real_vs_real_accuracy <= high and blurred_accuracy >= BLURRED_MIN_ACCURACY)

