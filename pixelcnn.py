"""Fit a PixelCNN prior over the code indices of a trained VQ-VAE.

    python pixelcnn.py                        # gated PixelCNN conditioned on slice position
    python pixelcnn.py --kind plain --n-conditions 0
    python pixelcnn.py --benchmark            # time training steps and sampling, print one JSON line
    torchrun --nproc_per_node=4 pixelcnn.py   # DistributedDataParallel, one process per GPU

Encodes the train and validate splits with checkpoints/vqvae_best.pt, trains with
cross-entropy, and reports validation negative log-likelihood in bits per code beside
two baselines: uniform (log2 of the codebook size) and the code-frequency entropy.
Keeps checkpoints/pixelcnn_last.pt and the best-by-validation-NLL checkpoints/pixelcnn_best.pt.
For a two-level VQ-VAE that prior models the coarse codes, and a detail prior, trained next,
the fine codes given the coarse ones: checkpoints/pixelcnn_detail_{last,best}.pt.
"""
import dataclasses
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench import BenchmarkConfig, report, time_steps, train_or_benchmark
from bench import prepare as prepare_benchmark
from checkpoint import (RunState, check_pairing, checkpoint_payload, image_size_of, load_checkpoint, load_vqvae,
                        save_checkpoint, vqvae_fingerprint)
from cli import opt, parse_configs
from codes import encode_all_levels
from dataset import load_split_tensor, resolve_data_root
from errors import FlagError
from hardware import Ranks, pick_device, synchronize, use_fast_math, wrap_for_ranks
from modules import PixelCNNConfig, build_prior, rows_per_layer, rows_seen_above
from prior import sample_codes, slice_conditions
from training import (EpochLosses, StopFlag, TimeBudget, WarmupCosine, apply_time_budget, epoch_bar, epoch_order,
                      loss_line, make_adam, my_batch, save_when_due_or_stopping, steps_per_epoch, training_run)

LN2 = math.log(2)


@dataclass
class PriorTrainConfig:
    data: str = opt("demo", "OASIS root holding keras_png_slices_{train,validate,test}, or 'demo'")
    vqvae: str = opt("checkpoints/vqvae_best.pt", "the trained VQ-VAE whose codes the prior models")
    epochs: int = opt(12, "passes over the training codes (at most; see --minutes)", minimum=1)
    minutes: float = opt(5.0, "time budget of the training loop: timing its steps, the run is cut to the steps "
                              "that fit (the learning rate still decays to zero at its end) and the "
                              "best-by-validation checkpoint is kept; a resumed run gets the budget afresh; "
                              "0 = no budget: all --epochs, the same steps on every machine")
    batch_size: int = opt(16, "code grids per step", minimum=1)
    lr: float = opt(8e-3, "peak Adam learning rate")
    warmup_steps: int = opt(20, "steps of linear learning-rate warm-up (at most a fifth of the run) up to "
                                "the peak rate", minimum=0)
    lr_hold: float = opt(0.8, "share of the steps after the warm-up that keep the peak learning rate before "
                              "the cosine decay begins (0 to 1)", minimum=0, maximum=1)
    dtype: str = opt("auto", "autocast dtype of the forward pass during training; auto = bfloat16 where the "
                             "device has fast bf16 kernels (CUDA, CPUs with AVX-512 BF16), float32 elsewhere",
                     choices=["auto", "float32", "bfloat16"])
    vflip: bool = opt(False, "augment with the codes of training slices flipped top-bottom (left-right "
                             "hemispheres) for a random half of each batch (the coarsest codes' prior only)")
    level: str = opt("all", "which priors to train for a two-level VQ-VAE: all, coarse (over the coarse codes, "
                            "what --hidden, --n-layers, --kernel and --minutes set) or detail (the fine codes "
                            "given the coarse ones)", choices=["all", "coarse", "detail"])
    detail_hidden: int = opt(32, "channels of the detail prior", minimum=1)
    detail_layers: int = opt(6, "gated layers of the detail prior: it sees the coarse codes everywhere, so "
                                "a few rows above each fine code suffice", minimum=1)
    detail_kernel: int = opt(5, "kernel width of the detail prior's gated layers (odd)", minimum=3)
    detail_minutes: float = opt(7.0, "time budget of the detail prior's training, as --minutes is the coarse "
                                     "prior's; 0 = all --epochs")
    seed: int = opt(0, "random seed")
    device: str = opt("auto", "cuda, cpu, or auto (cuda when available)")
    checkpoint_dir: str = opt("checkpoints", "where pixelcnn_last.pt and pixelcnn_best.pt go")
    allow_unpaired: bool = opt(False, "with --resume: continue a prior that was fit to another VQ-VAE than "
                                      "--vqvae; without it that is refused")
    log_every: int = opt(50, "steps between loss log lines", minimum=1)
    checkpoint_every: int = opt(0, "also write pixelcnn_last.pt every this many steps; 0 = once per epoch")
    resume: bool = opt(False, "continue exactly from checkpoint_dir/pixelcnn_last.pt")


@dataclass
class PriorBenchmarkConfig(BenchmarkConfig):
    benchmark_samples: int = opt(64, "code grids --benchmark samples, timed; 0 = skip sampling", minimum=0)


# Named starting points, picked by the device unless --preset names one; explicit flags win.
PRESETS = {
    # a 2-core CPU: the prior over the quick VQ-VAE's 32x32 grid (16 layers of kernel 5 see
    # all 31 rows above a code), trained against a time budget. A run of minutes is far from
    # overfitting, so it learns fastest with a high peak rate held for most of the run and no
    # dropout (RESULTS.md).
    "quick": {"hidden": 32, "n_layers": 16, "kernel": 5, "dropout": 0.0, "epochs": 12, "minutes": 5.0,
              "batch_size": 16, "lr": 8e-3, "lr_hold": 0.8},
    # a GPU: the prior over the paper VQ-VAE's 64x64 grid (21 layers of kernel 7 see all 63 rows)
    "paper": {"hidden": 128, "n_layers": 21, "kernel": 7, "dropout": 0.1, "epochs": 40, "minutes": 0.0,
              "batch_size": 32, "lr": 1e-3, "lr_hold": 0.0},
}


def default_preset(args):
    """paper where the prior trains on a GPU, quick on a CPU"""
    return "paper" if pick_device(args.device).type == "cuda" else "quick"


def encode_split(vqvae, root, split, image_size, device, progress=True, flipped=False):
    """The code indices of every level (coarse first) and the slice positions of a split; with
    flipped, also the codes of every slice flipped top-bottom (None without)."""
    images_u8, slices = load_split_tensor(root, split, image_size, device, progress=progress)
    # Codes are not flip-equivariant: the flipped slice is encoded, not the flipped code grid.
    flipped_codes = encode_all_levels(vqvae, images_u8.flip(2)) if flipped else None
    return encode_all_levels(vqvae, images_u8), torch.as_tensor(slices.slice_idx, device=device), flipped_codes


def what_to_model(levels, slice_idx, model_cfg: PixelCNNConfig):
    """(codes, conditions) of one split for a prior: the coarsest codes given slice positions, or
    for a detail prior the fine codes given the coarse ones."""
    if model_cfg.context_codes:
        coarse, fine = levels
        return fine, coarse
    return levels[0], slice_conditions(slice_idx, model_cfg.n_conditions)


def detail_config(model_cfg: PixelCNNConfig, cfg: PriorTrainConfig, num_codes, grid_size):
    """The detail prior's settings: the --detail-* flags, conditioned on the coarse codes alone."""
    return dataclasses.replace(model_cfg, kind="gated", hidden=cfg.detail_hidden, n_layers=cfg.detail_layers,
                               kernel=cfg.detail_kernel, n_conditions=0, context_codes=num_codes,
                               num_codes=num_codes, grid_size=grid_size, dropout=0.0)


def frequency_entropy_bits(codes, num_codes):
    """Entropy of the code-frequency distribution: what a prior ignoring context achieves."""
    p = torch.bincount(codes.flatten(), minlength=num_codes).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())


@torch.no_grad()
def nll_bits(model, codes, slice_idx, batch_size=64, ranks=None):
    """Mean negative log-likelihood per code, in bits (shared out among processes)."""
    ranks = ranks or Ranks()
    codes = codes[ranks.rank::ranks.world]
    slice_idx = slice_idx[ranks.rank::ranks.world] if slice_idx is not None else None
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=codes.device)
    for i in range(0, len(codes), batch_size):
        c = codes[i:i + batch_size]
        cond = slice_idx[i:i + batch_size] if slice_idx is not None else None
        total[0] += F.cross_entropy(model(c, cond), c, reduction="sum").double()
        total[1] += c.numel()
    total = ranks.sum(total)
    return float(total[0] / total[1]) / LN2


def receptive_field_note(cfg: PixelCNNConfig):
    seen, needed = rows_seen_above(cfg), cfg.grid_size - 1
    if seen >= needed:
        return f"receptive field: {seen} rows above each code, covering the {cfg.grid_size}-row grid"
    layers = cfg.n_layers + math.ceil((needed - seen) / rows_per_layer(cfg))
    return (f"warning: each code sees only {seen} rows above it, so the bottom of the {cfg.grid_size}-row "
            f"grid is predicted without its top; --n-layers {layers} would cover it")


def train_step(model, forward, optimizer, scheduler, codes, cond, dtype):
    """One optimisation step on a batch of code grids; returns the detached loss as a 1-element
    device tensor, so nothing waits for the device."""
    model.train()
    with torch.autocast(codes.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        logits = forward(codes, cond)
    loss = F.cross_entropy(logits.float(), codes)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.detach()[None]


def train_prior(cfg: PriorTrainConfig, model_cfg: PixelCNNConfig, progress=True, stop=None):
    """Train the prior, and for a two-level VQ-VAE the detail prior after it (as --level says);
    returns the history of the last one trained. Raises as train.train does."""
    levels = load_checkpoint(cfg.vqvae, "vqvae", made_by="python train.py")["model_config"].get("levels", 1)
    if levels == 1 and cfg.level == "detail":
        raise FlagError(f"--level detail: {cfg.vqvae} has one code level, so there is no detail prior to train")
    details = {"all": [False, True], "coarse": [False], "detail": [True]}[cfg.level] if levels == 2 else [False]
    encoded = {}  # the priors of one run share one pass of the encoder (most of a minute at 256x256 on a CPU)
    for detail in details:
        history = train_one_prior(cfg, model_cfg, detail, progress, stop, encoded)
    return history


def encode_splits(vqvae, root, image_size, device, progress, flipped):
    """The train and validate codes of every level with their slice positions (and the train slices'
    flipped codes, with flipped), in the form train_one_prior reads."""
    train_levels, train_slices, flipped_levels = encode_split(vqvae, root, "train", image_size, device, progress,
                                                              flipped=flipped)
    val_levels, val_slices, _ = encode_split(vqvae, root, "validate", image_size, device, progress)
    return {"train": (train_levels, train_slices), "validate": (val_levels, val_slices),
            "flipped_levels": flipped_levels}


def train_one_prior(cfg: PriorTrainConfig, model_cfg: PixelCNNConfig, detail, progress=True, stop=None, encoded=None):
    """Train the prior (detail: the detail prior) and return its history. encoded, a dict the priors
    of one run share, keeps the codes of the first for the next (the coarse prior comes first and
    encodes the flipped slices it may need). Started by torchrun, every process trains on its share of
    each batch."""
    encoded = {} if encoded is None else encoded
    name = "pixelcnn_detail" if detail else "pixelcnn"
    with training_run(cfg, name, "pixelcnn", "python pixelcnn.py", progress) as run:
        cfg, ranks, device, say, progress = run.cfg, run.ranks, run.device, run.say, run.progress
        use_fast_math(device, cfg.dtype)
        vqvae, vq_ckpt = load_vqvae(cfg.vqvae, device)
        image_size = image_size_of(vq_ckpt)
        fine_grid = image_size // 2 ** vqvae.cfg.n_downsample
        if detail:
            model_cfg = detail_config(model_cfg, cfg, vqvae.cfg.num_codes, fine_grid)
        else:
            model_cfg = dataclasses.replace(model_cfg, num_codes=vqvae.cfg.num_codes,
                                            grid_size=fine_grid // 2 ** (vqvae.cfg.levels - 1))
        if "train" not in encoded:
            encoded.update(encode_splits(vqvae, resolve_data_root(cfg.data), image_size, device, progress,
                                         flipped=cfg.vflip and not detail))
        (train_levels, train_slices), (val_levels, val_slices) = encoded["train"], encoded["validate"]
        train_codes, train_cond = what_to_model(train_levels, train_slices, model_cfg)
        val_codes, val_cond = what_to_model(val_levels, val_slices, model_cfg)
        flipped_levels = None if detail else encoded["flipped_levels"]
        flipped_codes = flipped_levels[0] if flipped_levels else None
        del vqvae
        grid = tuple(train_codes.shape[1:])
        baselines = {"uniform_bits": math.log2(model_cfg.num_codes),
                     "frequency_entropy_bits": frequency_entropy_bits(train_codes, model_cfg.num_codes)}
        say(f"codes: train {tuple(train_codes.shape)} | validate {tuple(val_codes.shape)} | "
            f"baselines: uniform {baselines['uniform_bits']:.3f} bits, "
            f"code-frequency entropy {baselines['frequency_entropy_bits']:.3f} bits")

        model = build_prior(model_cfg).to(device)
        conditioned_on = ("the coarse codes" if detail else "slice position" if model_cfg.n_conditions
                          else "nothing")
        say(f"{'detail' if detail else model_cfg.kind} PixelCNN: "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, conditioned on {conditioned_on}")
        say(f"each fine code sees {rows_seen_above(model_cfg)} rows of fine codes above it" if detail
            else receptive_field_note(model_cfg))
        forward = wrap_for_ranks(model, ranks, device)
        optimizer = make_adam(model.parameters(), cfg.lr, device)
        n_steps = steps_per_epoch(len(train_codes), cfg.batch_size, ranks)
        scheduler = WarmupCosine(optimizer, cfg.warmup_steps, cfg.epochs * n_steps, cfg.lr_hold)
        state = RunState(best=math.inf)
        # a detail prior whose run never began (the coarse one was stopped) starts afresh
        if cfg.resume and (run.last_path.exists() or not detail):
            def paired(ckpt):
                check_pairing(ckpt, run.last_path, vq_ckpt, cfg.vqvae, cfg.allow_unpaired)
            state = run.resume(model, model_cfg, optimizer, scheduler, check=paired)
        slice_counts = torch.bincount(train_slices.cpu(), minlength=max(model_cfg.n_conditions, 1))
        fitted_to = vqvae_fingerprint(vq_ckpt)

        def save(path):
            save_checkpoint(path, checkpoint_payload("pixelcnn", model, model_cfg, cfg, optimizer, scheduler, state,
                                                     grid=grid, slice_counts=slice_counts, baselines=baselines,
                                                     vqvae_path=str(cfg.vqvae), vqvae_fingerprint=fitted_to))

        minutes = cfg.detail_minutes if detail else cfg.minutes
        budget = TimeBudget(minutes) if minutes > 0 else None
        started = time.time()
        with stop or StopFlag() as stop:
            for epoch in range(state.epoch, cfg.epochs):
                if state.finished():
                    break
                order = epoch_order(len(train_codes), cfg.seed, epoch).to(device)
                losses = EpochLosses(state.step, device)
                bar, write = epoch_bar(state.step_in_epoch, n_steps, epoch, cfg.epochs, progress, say)
                for i in bar:
                    if state.finished():
                        break
                    batch_ids = my_batch(order, i, cfg.batch_size, ranks)
                    codes = train_codes[batch_ids]
                    if flipped_codes is not None:  # the draw comes from the saved torch RNG, so resume stays exact
                        flip = torch.rand(len(batch_ids), device=device) < 0.5
                        codes = torch.where(flip[:, None, None], flipped_codes[batch_ids], codes)
                    cond = train_cond[batch_ids] if train_cond is not None else None
                    step_loss = train_step(model, forward, optimizer, scheduler, codes, cond, cfg.dtype)
                    state.step, state.step_in_epoch = state.step + 1, i + 1
                    if budget is not None:
                        total = apply_time_budget(budget, state, cfg.epochs * n_steps, device, ranks, write)
                        if total is not None:
                            scheduler.end_at(total)
                    losses.add(step_loss)
                    at_log_point = state.step % cfg.log_every == 0
                    if at_log_point:
                        losses.check_finite()
                        write(loss_line(state.step, step_loss, ranks))
                    save_when_due_or_stopping(stop, state, losses, ranks, device, at_log_point=at_log_point,
                                              checkpoint_every=cfg.checkpoint_every,
                                              save_last=lambda: save(run.last_path),
                                              resume_command=run.resume_command())
                bar.close()
                means = losses.means(ranks)
                state.epoch, state.step_in_epoch = epoch + 1, 0

                # the epoch a time budget ends is validated like a whole one
                train_bits = means[0] / LN2 if means else float("nan")
                val_bits = nll_bits(model, val_codes, val_cond, ranks=ranks)
                record = {"epoch": epoch + 1, "step": state.step, "lr": scheduler.get_last_lr()[0],
                          "train_nll_bits": train_bits, "val_nll_bits": val_bits, "seconds": time.time() - started}
                state.history.append(record)
                say(f"epoch {epoch + 1:3d} | train {train_bits:.3f} bits/code | validate {val_bits:.3f} bits/code "
                    f"| {record['seconds']:.0f}s")
                run.end_epoch(state, val_bits, val_bits < state.best, save)
        say(f"best validation NLL {state.best:.3f} bits/code (uniform {baselines['uniform_bits']:.3f}, "
            f"code-frequency entropy {baselines['frequency_entropy_bits']:.3f}) -> {run.best_path}")
        return state.history


def benchmark_prior(cfg: PriorTrainConfig, model_cfg: PixelCNNConfig, bench: PriorBenchmarkConfig):
    """Time training steps and the sampling of bench.benchmark_samples grids; writes nothing."""
    device, cfg = prepare_benchmark(cfg)
    model = build_prior(model_cfg).to(device)
    optimizer = make_adam(model.parameters(), cfg.lr, device)
    scheduler = WarmupCosine(optimizer, cfg.warmup_steps, 10 ** 6)
    side, b = model_cfg.grid_size, cfg.batch_size

    def next_batch():
        codes = torch.randint(0, model_cfg.num_codes, (b, side, side), device=device)
        cond = torch.randint(0, model_cfg.n_conditions, (b,), device=device) if model_cfg.n_conditions else None
        return codes, cond

    figures = time_steps(lambda batch: train_step(model, model, optimizer, scheduler, *batch, cfg.dtype),
                         next_batch, bench, batch_size=b, device=device)
    if bench.benchmark_samples:
        n = bench.benchmark_samples
        cond = torch.randint(0, model_cfg.n_conditions, (n,), device=device) if model_cfg.n_conditions else None
        synchronize(device)
        started = time.perf_counter()
        sample_codes(model.eval(), n, side, side, cond, generator=torch.Generator(device).manual_seed(cfg.seed))
        synchronize(device)
        figures.update({"samples": n, "sampling_seconds": round(time.perf_counter() - started, 3)})
    return report("pixelcnn.py", {"kind": model_cfg.kind, "dtype": cfg.dtype, "grid_size": side,
                                  "num_codes": model_cfg.num_codes, "hidden": model_cfg.hidden,
                                  "n_layers": model_cfg.n_layers}, figures)


def parse_args(argv=None):
    """(PriorTrainConfig, PixelCNNConfig, PriorBenchmarkConfig) from the command line."""
    return parse_configs(__doc__, [PriorTrainConfig, PixelCNNConfig, PriorBenchmarkConfig], argv, presets=PRESETS,
                         default_preset=default_preset)


def main(argv=None):
    train_or_benchmark(parse_args(argv), train_prior, benchmark_prior)


if __name__ == "__main__":
    main()
