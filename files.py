"""Writing files whole or not at all, and the image grids the scripts save.

`write_atomically` is the one writer of every file a script leaves behind: checkpoints, the
slice cache, the demo set's completion marker, and every JSON, PNG and GIF under out/. A
reader never sees half a file, and a kill or a full disk mid-write leaves the old file as it was.
"""
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from errors import OutputError, one_line


def write_atomically(path, write) -> None:
    """Write a file through write(binary file object) so that it is either the old or the new
    one: a temporary file in the same folder (so os.replace is a rename), synced, then renamed.
    An OSError (a full disk, a read-only folder) becomes an OutputError naming the file."""
    path = Path(path)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
        os.chmod(temporary, 0o644)  # mkstemp makes 0600 files; checkpoints and caches are meant to be shared
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException as err:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        if isinstance(err, OSError):
            kept = "the previous one is intact" if path.exists() else "nothing was written"
            raise OutputError(f"{path}: could not be written ({err.strerror or one_line(err)}); {kept}") from None
        raise


# write_atomically's temporary files end so; one left by a killed process can be removed.
TEMPORARY_SUFFIX = ".tmp"


def remove_leftover_temporaries(folder, name):
    """Delete the temporary files that writes of folder/name left when their process was killed."""
    for leftover in Path(folder).glob(f".{name}.*{TEMPORARY_SUFFIX}"):
        leftover.unlink(missing_ok=True)


def write_json(path, data):
    write_atomically(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


def write_text(path, text):
    write_atomically(path, lambda f: f.write(text.encode()))


def save_figure(fig, path, dpi=100):
    """A matplotlib figure as a PNG."""
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def save_gif(path, pictures, duration_ms):
    """PIL images as a looping GIF animation."""
    write_atomically(path, lambda f: pictures[0].save(f, format="GIF", save_all=True, append_images=pictures[1:],
                                                      duration=duration_ms, loop=0))



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
    write_atomically(path, lambda f: Image.fromarray(array_uint8).save(f, format="PNG"))
