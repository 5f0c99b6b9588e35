"""The one `--benchmark` harness of both trainers: it times their own training step and prints one
JSON line (images/s, ms/step, peak memory, FLOPs), fed batches as training makes them or by a
DataLoader. Its flags live here, apart from the training configs, so a checkpoint never records
them.

    python train.py --benchmark [--benchmark-steps 20 --benchmark-warmup 3]
    python pixelcnn.py --benchmark
"""
import dataclasses
import itertools
import json
import time
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

from cli import opt, run_script
from codes import to_unit
from hardware import pick_device, resolve_dtype, set_seed, synchronize, use_fast_math
from training import epoch_order


def count_flops(step, *args):
    """FLOPs of one call of step(*args), counted op by op; returns (total, convolution share)."""
    with FlopCounterMode(display=False) as counter, warnings.catch_warnings():
        # the counter's module hooks fire once more under a compiled model; the count is the same
        warnings.filterwarnings("ignore", message=".*global hooks on modules")
        step(*args)
    per_op = counter.get_flop_counts().get("Global", {})
    conv = sum(n for op, n in per_op.items() if "convolution" in str(op))
    return counter.get_total_flops(), conv


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "cuda max allocated"
    import resource  # POSIX only; the CUDA branch above never needs it
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


@dataclasses.dataclass
class BenchmarkConfig:
    benchmark: bool = opt(False, "time training steps and print one JSON line (images/s, ms/step, memory, "
                                 "FLOPs); writes nothing")
    benchmark_steps: int = opt(20, "timed training steps of --benchmark", minimum=1)
    benchmark_warmup: int = opt(3, "untimed training steps before them", minimum=0)


def train_or_benchmark(configs, train, benchmark):
    """A trainer's main: configs = (training config, model config, BenchmarkConfig) as parsed;
    --benchmark times the trainer's step with benchmark(*configs), anything else trains."""
    cfg, model_cfg, bench = configs
    work = (lambda: benchmark(cfg, model_cfg, bench)) if bench.benchmark else (lambda: train(cfg, model_cfg))
    run_script(work, batch_size=cfg.batch_size)


def prepare(cfg):
    """Seed, device and precision as the trainer picks them (cfg: its training config); returns
    the device and cfg with --dtype auto resolved."""
    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    cfg = dataclasses.replace(cfg, dtype=resolve_dtype(cfg.dtype, device, lambda line: None))
    use_fast_math(device, cfg.dtype)
    return device, cfg


def report(script, settings, figures):
    """Print the benchmark's one JSON line and return it as a dict."""
    result = {"script": script, **settings, **figures}
    print(json.dumps(result))
    return result


def time_steps(step, next_batch, bench: BenchmarkConfig, *, batch_size, device):
    """Time bench.benchmark_steps calls of step(next_batch()) after bench.benchmark_warmup untimed
    ones (and one counted for FLOPs); returns the figures of the JSON line."""
    warmup, steps = bench.benchmark_warmup, bench.benchmark_steps
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


# ----------------------------------------------------------------------------- feeding train.py's step

def resident_batches(images_u8, batch_size, seed, device):
    """Batches as training makes them: indexing and conversion happen on the device."""
    epoch = itertools.count()
    order, position = epoch_order(len(images_u8), seed, next(epoch)).to(device), 0

    def next_batch():
        nonlocal order, position
        if position + batch_size > len(images_u8):
            order, position = epoch_order(len(images_u8), seed, next(epoch)).to(device), 0
        position += batch_size
        return to_unit(images_u8[order[position - batch_size:position]])

    return next_batch


def stack_as_float(items):
    return to_unit(torch.stack([x for (x,) in items]))


def loader_batches(images_u8, batch_size, seed, device):
    """The common alternative: a shuffling DataLoader over host memory, with two workers
    converting to float, and a copy to the device every step."""
    host = torch.utils.data.TensorDataset(images_u8.cpu())
    loader = torch.utils.data.DataLoader(
        host, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=2,
        persistent_workers=True, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
        collate_fn=stack_as_float)
    batches = iter(())

    def next_batch():
        nonlocal batches
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        return batch.to(device, non_blocking=True)

    return next_batch
