"""Pieces every script shares: config flags, seeding, device, several processes, benchmarks,
metrics, batches through the model, image grids. (Training runs and checkpoints: training.py.)"""
import argparse
import contextlib
import dataclasses
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


# ----------------------------------------------------------------------------- config

def opt(default, help, **extra):
    """A config field with its command-line help."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def in_range(kind, minimum, maximum=None):
    """An argparse type that also refuses values below `minimum` (and above `maximum`, if given)."""
    def convert(text):
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {text}")
        return value
    convert.__name__ = kind.__name__
    return convert


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
        elif "minimum" in f.metadata:
            kwargs["type"] = in_range(type(default), f.metadata["minimum"], f.metadata.get("maximum"))
        else:
            kwargs["type"] = type(default)
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the script's docstring as written and shows every flag's default."""


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def parse_configs(description, config_classes, argv=None, presets=None, default_preset=None):
    """Parse the flags of several config dataclasses at once; returns one instance each.

    presets: {name: {field: value}}, chosen with --preset NAME; flags given explicitly
    still win over the preset's values. default_preset(args) names the preset used when
    none is given (args: the flags parsed so far), with a line of help saying how it picks."""
    parser = OneLineErrorParser(description=description, formatter_class=HelpFormatter)
    if presets:
        pick = f"; when not given, {default_preset.__doc__.strip()}" if default_preset else ""
        parser.add_argument("--preset", choices=sorted(presets), default=None,
                            help="start from a named set of defaults" + pick + ": " + "; ".join(
                                f"{name}: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in values.items())
                                for name, values in presets.items()))
    for cls in config_classes:
        add_config_flags(parser, cls)
    if presets:
        known = parser.parse_known_args(argv)[0]
        chosen = known.preset or (default_preset(known) if default_preset else None)
        if chosen:
            parser.set_defaults(**presets[chosen])
    args = vars(parser.parse_args(argv))
    return [cls(**{f.name: args[f.name] for f in dataclasses.fields(cls)})
            for cls in config_classes]


def die(message):
    """Stop a script with a one-line error instead of a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run_script(work, batch_size=None):
    """Run a script's work, turning expected failures into one-line errors (exit 2)."""
    from dataset import DataError  # here, not at the top: dataset.py needs nothing from us
    from training import CheckpointError, NonFiniteLoss  # training.py builds on this module
    try:
        return work()
    except (DataError, CheckpointError, NonFiniteLoss) as err:
        die(err)
    except torch.OutOfMemoryError:
        hint = f" (now {batch_size})" if batch_size else ""
        die(f"out of GPU memory; try a smaller --batch-size{hint}")
    except KeyboardInterrupt as err:
        die(err if str(err) else "interrupted")


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_bfloat16_kernels():
    # oneDNN has bf16 convolution kernels only for CPUs with AVX-512 or newer; elsewhere bf16
    # falls back to a reference path, many times slower than float32 (RESULTS.md).
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without the probe: assume the fast path
        return True


def bfloat16_is_fast(device):
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bfloat16_kernels()


def resolve_dtype(name, device, say=print):
    """--dtype auto -> bfloat16 where the device has fast bf16 kernels (CUDA GPUs that support
    it, CPUs with AVX-512 BF16), float32 elsewhere; says which it picked. Other names pass."""
    if name != "auto":
        return name
    dtype = "bfloat16" if bfloat16_is_fast(device) else "float32"
    where = "this GPU" if device.type == "cuda" else "this CPU"
    has = "has" if dtype == "bfloat16" else "has no"
    say(f"precision: {dtype} (--dtype auto: {where} {has} fast bf16 kernels)")
    return dtype


def use_fast_math(device, dtype="float32"):
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    if dtype == "bfloat16" and device.type == "cpu" and not cpu_has_bfloat16_kernels():
        print("warning: this CPU has no bf16 convolution kernels (they need AVX-512); --dtype bfloat16 "
              "runs many times slower than float32 here", file=sys.stderr)


def make_adam(parameters, lr, device):
    # The fused kernel exists on CUDA; elsewhere Adam's default (foreach) implementation is used.
    return torch.optim.Adam(parameters, lr=lr, fused=device.type == "cuda" or None)


# ----------------------------------------------------------------------------- several processes

@dataclasses.dataclass
class Ranks:
    """This process's place among the processes torchrun started (one process: rank 0 of 1)."""
    rank: int = 0
    world: int = 1
    started_group: bool = False

    @property
    def main(self):
        return self.rank == 0

    def sum(self, tensor):
        """All-reduce in place (sum over processes); returns the tensor."""
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def any(self, flag, device):
        if self.world == 1:
            return flag
        return bool(self.sum(torch.tensor(float(flag), device=device)) > 0)

    def close(self):
        if self.started_group:
            torch.distributed.destroy_process_group()


def join_processes(device_name):
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs, one GPU per
    process, and gloo on CPUs. Returns (Ranks, device); a plain run needs none of it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world == 1:
        return Ranks(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    started = not torch.distributed.is_initialized()
    if started:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(rank, world, started), device


@contextlib.contextmanager
def process_group(device_name):
    """join_processes for the length of a run; leaves the group it joined afterwards."""
    ranks, device = join_processes(device_name)
    try:
        yield ranks, device
    finally:
        ranks.close()


def wrap_for_ranks(model, ranks, device):
    """DistributedDataParallel over several processes. Buffers are not broadcast: the
    quantizer keeps its own in step by all-reducing its statistics."""
    if ranks.world == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def print_on_main(ranks):
    return print if ranks.main else (lambda *args, **kwargs: None)


# ----------------------------------------------------------------------------- benchmark

def count_flops(step, *args):
    """FLOPs of one call of step(*args), counted op by op; returns (total, convolution share)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, warnings.catch_warnings():
        # the counter's module hooks fire once more under a compiled model; the count is the same
        warnings.filterwarnings("ignore", message=".*global hooks on modules")
        step(*args)
    per_op = counter.get_flop_counts().get("Global", {})
    conv = sum(n for op, n in per_op.items() if "convolution" in str(op))
    return counter.get_total_flops(), conv


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "cuda max allocated"
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def benchmark(step, next_batch, *, batch_size, warmup, steps, device):
    """Time `steps` calls of step(next_batch()) after `warmup` untimed ones (and one counted
    for FLOPs); returns the figures of the JSON line the trainers print."""
    flops, conv_flops = count_flops(step, next_batch())
    for _ in range(warmup):
        step(next_batch())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step(next_batch())
    synchronize(device)
    seconds = time.perf_counter() - started
    memory, memory_kind = peak_memory_mb(device)
    return {
        "images_per_s": round(batch_size * steps / seconds, 2),
        "ms_per_step": round(1000 * seconds / steps, 3),
        "peak_memory_mb": round(memory, 1), "memory": memory_kind,
        "flops_per_image": flops / batch_size,
        "conv_flop_share": round(conv_flops / flops, 4) if flops else 0.0,
        "achieved_tflops": round(flops * steps / seconds / 1e12, 4),
        "batch_size": batch_size, "warmup_steps": warmup, "timed_steps": steps,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
    }


# ----------------------------------------------------------------------------- metrics

# Keeps log(0) out of the entropy of a distribution with unused codes.
PERPLEXITY_EPS = 1e-12
# skimage.metrics.structural_similarity's defaults: 7 x 7 uniform window, sample covariance.
SSIM_WINDOW, SSIM_K1, SSIM_K2 = 7, 0.01, 0.03


def to_unit(images_u8):
    """uint8 images -> float32 in [0, 1] (a new tensor)."""
    return images_u8.float().div(255)


def perplexity(probs):
    """exp(entropy) of a distribution over codes: the number of equally used codes it matches."""
    return torch.exp(-(probs * torch.log(probs + PERPLEXITY_EPS)).sum())


def codebook_usage(counts):
    """(perplexity, codes used) of per-code counts."""
    probs = counts.double() / max(int(counts.sum()), 1)
    return float(perplexity(probs)), int((counts > 0).sum())


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


# ----------------------------------------------------------------------------- batches through the VQ-VAE

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
def decode_all(vqvae, codes, batch_size=64):
    """Code indices (N, h, w) -> images (N, 1, H, W) in [0, 1] on the CPU."""
    return torch.cat([vqvae.decode_indices(codes[i:i + batch_size]).cpu() for i in range(0, len(codes), batch_size)])


# ----------------------------------------------------------------------------- images

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
