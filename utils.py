"""Pieces every script shares: config flags, seeding, device, checkpoints, metrics, image grids."""
import argparse
import contextlib
import dataclasses
import math
import os
import random
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from tqdm import tqdm


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or of the wrong kind; one-line message."""


# ----------------------------------------------------------------------------- config

def opt(default, help, **extra):
    """A config field with its command-line help."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def at_least(kind, minimum):
    """An argparse type that also refuses values below `minimum`."""
    def convert(text):
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
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
            kwargs["type"] = at_least(type(default), f.metadata["minimum"])
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
    # falls back to a reference path (measured on an AVX2 CPU: 9 times slower than float32).
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


def load_weights(model, ckpt, path):
    """Weights into a model built from the checkpoint's config; a checkpoint whose tensors do
    not fit (written by an older version of a model) gets a one-line error."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        detail = str(err).strip().splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise CheckpointError(f"{path} does not fit this version's {ckpt['kind']} model ({detail}); "
                              f"train it again") from None


def check_same_config(path, saved, config):
    """Refuse to resume into a model built differently, naming what differs."""
    wanted = dataclasses.asdict(config)
    changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} there, {wanted.get(k)!r} here" for k in changed)
        raise CheckpointError(f"{path} was built with other settings ({details})")


# ----------------------------------------------------------------------------- training

class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; nothing was saved from that point on."""


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


def rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": numpy_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def numpy_rng_state():
    # As tensors and plain values, so that weights_only loading accepts them.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def restore_rng_state(state):
    random.setstate(_as_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def epoch_order(n, seed, epoch):
    """The shuffled order of one epoch. It depends only on (seed, epoch), so a resumed
    run continues the same order without saving generator state."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def make_scheduler(optimizer, milestones, gamma, total_steps):
    """MultiStepLR stepped once per step, milestones given as fractions of the run."""
    steps = sorted({max(1, int(f * total_steps)) for f in milestones})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, steps, gamma=gamma)


class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """Linear warm-up, then a cosine decay to zero at total_steps. The warm-up lasts
    warmup_steps, or a fifth of the run if that is shorter.

    total_steps may be lowered while the run is under way (a time budget fixes it once the
    speed is known); it is part of the state_dict, so a resumed run decays the same way."""

    def __init__(self, optimizer, warmup_steps, total_steps):
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        super().__init__(optimizer)

    def factor(self, step):
        warmup = min(self.warmup_steps, self.total_steps // 5)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def get_lr(self):
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]


@dataclasses.dataclass
class RunState:
    """Where a training run stands; saved in every checkpoint, so resuming is exact."""
    epoch: int = 0           # epochs completed
    step_in_epoch: int = 0   # steps done in the epoch under way
    step: int = 0            # steps done in all
    best: float = float("nan")
    history: list = dataclasses.field(default_factory=list)
    total_steps: int = 0     # where a time budget ends the run; 0 = after the last epoch


class TimeBudget:
    """Turns a budget in minutes into a number of steps.

    After `timing_steps` steps it extrapolates the time per step and caps the run at the
    steps that fit in what is left of the budget, less `margin` for validation and saving,
    so a learning-rate schedule can end with the run instead of being cut off mid-way. Past
    the budget itself (a machine that slowed down) the run also stops at the next step."""

    clock = staticmethod(time.monotonic)

    def __init__(self, minutes, timing_steps=20, margin=0.12):
        self.seconds, self.timing_steps, self.margin = minutes * 60, timing_steps, margin
        self.started = self.clock()
        self.steps_timed = 0
        self.timing_from = None

    def elapsed(self):
        return self.clock() - self.started

    def steps_that_fit(self, step, device):
        """Called after every step; returns the total step count once it is known, else None."""
        self.steps_timed += 1
        if self.steps_timed == 3:  # the first steps warm caches and allocators up; time the rest
            synchronize(device)
            self.timing_from = self.clock()
        if self.steps_timed != self.timing_steps + 3:
            return None
        synchronize(device)
        per_step = (self.clock() - self.timing_from) / self.timing_steps
        left = self.seconds * (1 - self.margin) - self.elapsed()
        return step + max(0, int(left / per_step))

    def spent(self):
        return self.elapsed() >= self.seconds


def resume_run(path, kind, made_by, model, model_cfg, optimizer, scheduler):
    """Restore everything a run needs to continue exactly; returns its RunState."""
    ckpt = load_checkpoint(path, kind, made_by=made_by)
    check_same_config(path, ckpt["model_config"], model_cfg)
    load_weights(model, ckpt, path)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    restore_rng_state(ckpt["rng"])
    state = RunState(**ckpt["run"])
    print(f"resumed from {path} at step {state.step} (epoch {state.epoch + 1})")
    return state


def run_epochs(state, *, epochs, n_items, batch_size, seed, device, train_step, end_epoch,
               save_last, on_log=None, log_every=50, checkpoint_every=0, stop=None,
               resume_command="", show_progress=True, ranks=None, minutes=0.0, on_total_steps=None):
    """The loop both trainers share.

    train_step(batch_ids) -> 1-D tensor of detached losses, the total first;
    end_epoch(epoch, mean_losses) evaluates, records and saves the best checkpoint;
    save_last() writes the resumable checkpoint. Losses stay on the device between log
    points (no host sync per step); they are checked for NaN before anything is saved.
    With several processes each takes its own share of every batch-sized slice of the
    epoch's order, losses are averaged over processes, and only rank 0 saves and prints.
    minutes > 0 is a time budget (TimeBudget): once it has fixed the run's length,
    on_total_steps(total) is called so the learning-rate schedule can end there too; the
    epoch under way when the run ends is validated (end_epoch) like a whole one.
    """
    ranks = ranks or Ranks()
    say = print_on_main(ranks)
    global_batch = batch_size * ranks.world
    steps_per_epoch = max(1, n_items // global_batch)
    budget = TimeBudget(minutes) if minutes > 0 else None
    with stop or StopFlag() as stop:
        for epoch in range(state.epoch, epochs):
            if state.total_steps and state.step >= state.total_steps:
                break
            order = epoch_order(n_items, seed, epoch).to(device)
            first = state.step_in_epoch
            sums, bad_step = None, torch.tensor(-1, device=device)
            step_on_device = torch.tensor(state.step, device=device)
            bar = tqdm(range(first, steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}",
                       disable=not (show_progress and ranks.main), leave=False)
            steps_done = 0
            for i in bar:
                if state.total_steps and state.step >= state.total_steps:
                    break
                start = i * global_batch + ranks.rank * batch_size
                losses = train_step(order[start:start + batch_size])
                state.step += 1
                state.step_in_epoch = i + 1
                steps_done += 1
                step_on_device += 1
                if budget is not None:
                    _apply_budget(budget, state, epochs * steps_per_epoch, device, ranks,
                                  bar.write if show_progress and ranks.main else say, on_total_steps)
                sums = losses if sums is None else sums + losses
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(losses[0]), step_on_device, bad_step)
                at_log_point = state.step % log_every == 0
                if at_log_point:
                    _check_finite(bad_step, losses)
                    message = f"step {state.step} | loss {float(ranks.sum(losses[0].clone())) / ranks.world:.5f}"
                    if on_log is not None:
                        message += " | " + on_log()
                    if show_progress and ranks.main:
                        bar.write(message)
                    else:
                        say(message)
                # Processes must agree to stop at the same step; they compare notes only at
                # log points, which keeps the other steps free of host syncs.
                wants_stop = stop.signal is not None
                if ranks.world > 1:
                    wants_stop = at_log_point and ranks.any(wants_stop, device)
                if wants_stop or (checkpoint_every and state.step % checkpoint_every == 0):
                    _check_finite(bad_step, losses)
                    if ranks.main:
                        save_last()
                if wants_stop:
                    raise KeyboardInterrupt(f"{stop.signal or 'stop'}: saved the run at step {state.step}; "
                                            f"continue with: {resume_command}")
            bar.close()
            if sums is not None:
                _check_finite(bad_step, sums)
                means = (ranks.sum(sums) / ranks.world / steps_done).tolist()
            else:
                means = []
            state.epoch, state.step_in_epoch = epoch + 1, 0
            end_epoch(epoch + 1, means)
            if ranks.main:
                save_last()


def _apply_budget(budget, state, planned_steps, device, ranks, say, on_total_steps):
    """Fix the run's length once the budget has timed enough steps; end it when spent."""
    if not state.total_steps:
        total = budget.steps_that_fit(state.step, device)
        if total is not None:
            # every process must end at the same step: take rank 0's estimate
            total = int(ranks.sum(torch.tensor(float(total if ranks.main else 0), device=device)))
            state.total_steps = max(state.step + 1, min(total, planned_steps))
            say(f"time budget {budget.seconds / 60:g} min: training stops after step {state.total_steps} "
                f"of {planned_steps} ({state.total_steps / planned_steps:.0%} of --epochs)")
            if on_total_steps is not None:
                on_total_steps(state.total_steps)
    if ranks.world > 1:
        if state.step % 10:  # processes compare clocks only every 10 steps, all at the same step
            return
        spent = ranks.any(budget.spent(), device)
    else:
        spent = budget.spent()
    if spent and state.step < (state.total_steps or planned_steps + 1):
        say(f"time budget spent at step {state.step}; validating and stopping")
        state.total_steps = state.step


def _check_finite(bad_step, losses):
    step = int(bad_step)
    if step >= 0:
        raise NonFiniteLoss(f"the loss became non-finite at step {step}; stopped without saving "
                            f"(the last checkpoint is from before it); try a lower --lr")


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
