"""What both trainers share: the frame of a run and the hard parts of a training loop.

The loops themselves live in train.py and pixelcnn.py, where they read top to bottom; they
run inside one frame, `training_run` (the checkpoint folder's lock, the seed, the precision,
resuming, keeping the best and last checkpoints), and call the parts that are easy to get
wrong by name: `EpochLosses` (losses summed on the device, checked for NaN without a host sync
per step), `apply_time_budget` (a --minutes budget turned into a step count),
`save_when_due_or_stopping` (the resumable checkpoint, and a stop that processes agree on), and
`StopFlag` (SIGINT/SIGTERM as a request to stop).
"""
import collections
import contextlib
import dataclasses
import math
import signal
import time
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import resume_run, run_lock
from errors import NonFiniteLoss
from hardware import Ranks, print_on_main, process_group, resolve_dtype, set_seed, synchronize


# ----------------------------------------------------------------------------- the frame of a run

@dataclasses.dataclass
class Run:
    """Where a run trains: its config (with --dtype resolved), its processes and device, say()
    (print on the first process), whether to show progress bars, and its checkpoint files
    <name>_last.pt (resumable) and <name>_best.pt (the one kept)."""
    cfg: object
    ranks: Ranks
    device: torch.device
    say: object
    progress: bool
    last_path: Path
    best_path: Path
    kind: str
    made_by: str

    def resume(self, model, model_cfg, optimizer, scheduler, check=None, extra_states=None):
        """The RunState of the last checkpoint, with everything restored into the parts given."""
        return resume_run(self.last_path, self.kind, self.made_by, model, model_cfg, optimizer, scheduler,
                          check=check, extra_states=extra_states)

    def resume_command(self):
        return f"{self.made_by} --resume (with the same flags)"

    def end_epoch(self, state, value, keep, save):
        """After an epoch is validated: with keep, `value` is the run's best and save(path) writes
        the best checkpoint; the resumable last checkpoint is written every epoch. Every process
        calls it (they agree on keep); the first writes."""
        if keep:
            state.best = value
            if self.ranks.main:
                save(self.best_path)
        if self.ranks.main:
            save(self.last_path)


@contextlib.contextmanager
def training_run(cfg, name, kind, made_by, progress=True):
    """The frame both trainers run in: the processes (one, or torchrun's), the lock on
    cfg.checkpoint_dir for checkpoints named `name`, the seed, and --dtype resolved for the
    device. Yields a Run."""
    with process_group(cfg.device) as (ranks, device), run_lock(cfg.checkpoint_dir, name, ranks.main):
        set_seed(cfg.seed)
        say = print_on_main(ranks)
        cfg = dataclasses.replace(cfg, dtype=resolve_dtype(cfg.dtype, device, say))
        folder = Path(cfg.checkpoint_dir)
        yield Run(cfg, ranks, device, say, progress and ranks.main, folder / f"{name}_last.pt",
                  folder / f"{name}_best.pt", kind, made_by)


def make_adam(parameters, lr, device, betas=(0.9, 0.999)):
    # The fused kernel exists on CUDA; elsewhere Adam's default (foreach) implementation is used.
    return torch.optim.Adam(parameters, lr=lr, betas=betas, fused=device.type == "cuda" or None)


def epoch_order(n, seed, epoch):
    """The shuffled order of one epoch. It depends only on (seed, epoch), so a resumed
    run continues the same order without saving generator state."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def steps_per_epoch(n_items, batch_size, ranks):
    """Whole global batches in an epoch (at least one); every process takes its share of each."""
    return max(1, n_items // (batch_size * ranks.world))


def my_batch(order, i, batch_size, ranks):
    """This process's share of the epoch's i-th global batch: indices into the split."""
    start = i * batch_size * ranks.world + ranks.rank * batch_size
    return order[start:start + batch_size]


# ----------------------------------------------------------------------------- schedules

def milestone_steps(milestones, total_steps):
    """Fractions of a run of total_steps -> the steps they fall on."""
    return sorted({max(1, int(f * total_steps)) for f in milestones})


def make_scheduler(optimizer, milestones, gamma, total_steps):
    """MultiStepLR stepped once per step, milestones given as fractions of the run."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestone_steps(milestones, total_steps), gamma=gamma)


def move_milestones(scheduler, milestones, total_steps, step):
    """A MultiStepLR's milestones for a run that now ends at total_steps. Those already passed
    stay where they were; the others move, to the next step at the earliest (the milestones are
    part of the state_dict, so a resumed run decays the same way)."""
    passed = [m for m in scheduler.milestones.elements() if m <= step]
    ahead = [max(step + 1, m) for m in milestone_steps(milestones, total_steps)[len(passed):]]
    scheduler.milestones = collections.Counter(passed + ahead)


class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """Linear warm-up, then the peak rate held for a share `hold` of the remaining steps, then a
    cosine decay to zero at total_steps. The warm-up lasts warmup_steps, or a fifth of the run if
    that is shorter.

    A time budget moves the end while the run is under way (`end_at`, once the speed is known);
    total_steps is part of the state_dict, so a resumed run decays the same way."""

    def __init__(self, optimizer, warmup_steps, total_steps, hold=0.0):
        self.warmup_steps, self.total_steps, self.hold = warmup_steps, total_steps, hold
        super().__init__(optimizer)

    def factor(self, step):
        warmup = min(self.warmup_steps, self.total_steps // 5)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        if progress <= self.hold:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - self.hold) / max(1e-9, 1 - self.hold))))

    def end_at(self, total_steps):
        """The run now ends at total_steps: the decay reaches zero there."""
        self.total_steps = total_steps

    def get_lr(self):
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]


# ----------------------------------------------------------------------------- the loop's hard parts

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


class EpochLosses:
    """One epoch's losses, summed on the device, and the first step whose loss was not
    finite. Nothing here waits for the device; check_finite does, so the loop calls it only
    where it logs or saves."""

    def __init__(self, step, device):
        self.sums, self.steps = None, 0
        self.bad_step = torch.tensor(-1, device=device)
        self.step_on_device = torch.tensor(step, device=device)

    def add(self, losses):
        """losses: 1-D detached tensor, the total first."""
        self.steps += 1
        self.step_on_device += 1
        self.sums = losses if self.sums is None else self.sums + losses
        self.bad_step = torch.where((self.bad_step < 0) & ~torch.isfinite(losses[0]), self.step_on_device,
                                    self.bad_step)

    def check_finite(self):
        step = int(self.bad_step)
        if step >= 0:
            raise NonFiniteLoss(f"the loss became non-finite at step {step}; stopped without saving "
                                f"(the last checkpoint is from before it); try a lower --lr")

    def means(self, ranks):
        """Mean of each loss over the epoch's steps and all processes; [] after no step."""
        if self.sums is None:
            return []
        self.check_finite()
        return (ranks.sum(self.sums) / ranks.world / self.steps).tolist()


def loss_line(step, losses, ranks):
    """The log line of a step: its total loss, averaged over processes."""
    return f"step {step} | loss {float(ranks.sum(losses[0].clone())) / ranks.world:.5f}"


def stop_requested(stop, ranks, at_log_point, device):
    """Whether to stop after this step. Processes must agree to stop at the same step; they
    compare notes only at log points, which keeps the other steps free of host syncs."""
    wants_stop = stop.signal is not None
    if ranks.world > 1:
        wants_stop = at_log_point and ranks.any(wants_stop, device)
    return wants_stop


def checkpoint_due(step, every):
    return bool(every) and step % every == 0


def save_when_due_or_stopping(stop, state, losses, ranks, device, *, at_log_point, checkpoint_every, save_last,
                              resume_command):
    """After a step: write the resumable checkpoint every `checkpoint_every` steps and when a
    stop was requested (never with a non-finite loss), then raise to stop."""
    stopping = stop_requested(stop, ranks, at_log_point, device)
    if stopping or checkpoint_due(state.step, checkpoint_every):
        losses.check_finite()
        if ranks.main:
            save_last()
    if stopping:
        raise stopped(stop, state.step, resume_command)


def stopped(stop, step, resume_command):
    """The interruption a loop raises once it has saved the run."""
    return KeyboardInterrupt(f"{stop.signal or 'stop'}: saved the run at step {step}; "
                             f"continue with: {resume_command}")


def epoch_bar(first, steps, epoch, epochs, show, say):
    """The steps of an epoch under a progress bar, and write(line), which prints beside it
    (say(line) where no bar is shown)."""
    bar = tqdm(range(first, steps), desc=f"epoch {epoch + 1}/{epochs}", disable=not show, leave=False)
    return bar, (bar.write if show else say)


class TimeBudget:
    """Turns a budget in minutes into a number of steps.

    Every `timing_steps` steps (after the first few, which warm caches up) it extrapolates the
    average time per step so far, validation and saving included, and caps the run at the
    steps that fit in what is left of the budget, less `margin` for the last validation and
    saving, so a learning-rate schedule can end with the run instead of being cut off mid-way.
    Past the budget itself (a machine that slowed down) the run also stops at the next step."""

    clock = staticmethod(time.monotonic)

    def __init__(self, minutes, timing_steps=20, margin=0.12):
        self.seconds, self.timing_steps, self.margin = minutes * 60, timing_steps, margin
        self.started = self.clock()
        self.steps_seen = 0
        self.timing_from = None

    def elapsed(self):
        return self.clock() - self.started

    def steps_that_fit(self, step, device):
        """Called after every step; returns the total step count when it has a new estimate."""
        self.steps_seen += 1
        if self.steps_seen == 3:
            synchronize(device)
            self.timing_from = self.clock()
            return None
        timed = self.steps_seen - 3
        if timed <= 0 or timed % self.timing_steps:
            return None
        synchronize(device)
        per_step = (self.clock() - self.timing_from) / timed
        left = self.seconds * (1 - self.margin) - self.elapsed()
        return step + max(0, int(left / per_step))

    def spent(self):
        return self.elapsed() >= self.seconds


def apply_time_budget(budget, state, planned_steps, device, ranks, say):
    """After each step: set the run's length (state.total_steps) whenever the budget has a new
    estimate, and end the run at this step when the budget is spent. Returns the total when it
    changed at this step, so the learning-rate schedule can end there too."""
    changed = None
    total = budget.steps_that_fit(state.step, device)
    if total is not None:
        # every process must end at the same step: take rank 0's estimate
        total = int(ranks.sum(torch.tensor(float(total if ranks.main else 0), device=device)))
        total = max(state.step + 1, min(total, planned_steps))
        if not state.total_steps:
            say(f"time budget {budget.seconds / 60:g} min: training stops after about step {total} "
                f"of {planned_steps} ({total / planned_steps:.0%} of --epochs)")
        if total != state.total_steps:
            state.total_steps = changed = total
    if ranks.world > 1:
        if state.step % 10:  # processes compare clocks only every 10 steps, all at the same step
            return changed
        spent = ranks.any(budget.spent(), device)
    else:
        spent = budget.spent()
    if spent and state.step < (state.total_steps or planned_steps + 1):
        say(f"time budget spent at step {state.step}; validating and stopping")
        state.total_steps = state.step
    return changed
