"""Pieces every script shares: config flags, seeding, device, checkpoints, metrics, image grids."""
import argparse
import dataclasses
import os
import random
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or of the wrong kind; one-line message."""


# ----------------------------------------------------------------------------- config

def opt(default, help, **extra):
    """A config field with its command-line help."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def add_config_flags(parser, config_cls):
    """One flag per dataclass field; the flag's type follows the default's type."""
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs = {"default": default, "help": f.metadata.get("help", " ")}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, (list, tuple)):
            kwargs.update(type=float, nargs="*")
        else:
            kwargs["type"] = type(default)
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def parse_configs(description, config_classes, argv=None):
    """Parse the flags of several config dataclasses at once; returns one instance each."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for cls in config_classes:
        add_config_flags(parser, cls)
    args = vars(parser.parse_args(argv))
    return [cls(**{f.name: args[f.name] for f in dataclasses.fields(cls)})
            for cls in config_classes]


def die(message):
    """Stop a script with a one-line error instead of a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, payload):
    """Write atomically: a kill mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; checkpoints are meant to be shared
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path, kind, made_by=None):
    """Load one of our checkpoints (weights only, never pickled code) and check its kind."""
    path = Path(path)
    if not path.is_file():
        hint = f"; run `{made_by}` first" if made_by else ""
        raise CheckpointError(f"checkpoint {path} not found{hint}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({first_line})") from None
    if not isinstance(payload, dict) or payload.get("kind") != kind:
        found = payload.get("kind") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} is not a {kind} checkpoint of this project (found {found!r})")
    return payload


def check_same_config(path, saved, config):
    """Refuse to resume into a model built differently, naming what differs."""
    wanted = dataclasses.asdict(config)
    changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} there, {wanted.get(k)!r} here" for k in changed)
        raise CheckpointError(f"{path} was built with other settings ({details})")


# ----------------------------------------------------------------------------- training

class StopFlag:
    """Turns SIGINT/SIGTERM into a request to stop after the current step."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def epoch_order(n, seed, epoch):
    """The shuffled order of one epoch. It depends only on (seed, epoch), so a resumed
    run continues the same order without saving generator state."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


# ----------------------------------------------------------------------------- metrics

def to_numpy_images(batch):
    """(B, 1, H, W) tensor in [0, 1] -> (B, H, W) float64 numpy, clipped to [0, 1]."""
    return batch.detach().float().clamp(0, 1).squeeze(1).cpu().numpy().astype(np.float64)


def ssim_per_image(originals, reconstructions):
    """scikit-image SSIM of each pair, on [0, 1] images with data_range=1.0."""
    a, b = to_numpy_images(originals), to_numpy_images(reconstructions)
    return np.array([structural_similarity(x, y, data_range=1.0) for x, y in zip(a, b)])


def psnr_per_image(originals, reconstructions):
    a, b = to_numpy_images(originals), to_numpy_images(reconstructions)
    return np.array([peak_signal_noise_ratio(x, y, data_range=1.0) for x, y in zip(a, b)])


# ----------------------------------------------------------------------------- images

def to_uint8(image):
    """[0, 1] float array -> 8-bit gray."""
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def image_grid(images, ncol, pad=2):
    """(N, H, W) floats in [0, 1] -> one (rows*H, ncol*W) 8-bit grayscale mosaic."""
    images = np.asarray(images)
    n, h, w = images.shape
    nrow = -(-n // ncol)
    grid = np.zeros((nrow * (h + pad) + pad, ncol * (w + pad) + pad), dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top:top + h, left:left + w] = to_uint8(image)
    return grid


def save_gray_png(path, array_uint8):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array_uint8).save(path)
