"""Writing files whole or not at all, and the image grids the scripts save.

`write_atomically` is the one writer of every file that must survive a kill mid-write:
checkpoints, the slice cache, the demo set's completion marker."""
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def write_atomically(path, write) -> None:
    """Write a file through write(binary file object) so that it is either the old or the new
    one: a temporary file in the same folder (so os.replace is a rename), synced, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, 0o644)  # mkstemp makes 0600 files; checkpoints and caches are meant to be shared
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise



def to_uint8(image):
    """[0, 1] float array -> 8-bit gray."""
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def progress_indices(n, count=8):
    """A fixed spread of count of n images, for grids that show the same images every time."""
    return np.linspace(0, n - 1, num=min(count, n)).round().astype(int).tolist()


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
