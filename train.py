"""Train the VQ-VAE on OASIS slices (or the built-in demo set).

    python train.py                          # demo set, quick CPU profile
    python train.py --data /path/to/oasis    # a folder holding keras_png_slices_{train,validate,test}
    python train.py --resume                 # continue the last run exactly where it stopped
    python train.py --benchmark              # time training steps, print one JSON line
    torchrun --nproc_per_node=4 train.py ... # DistributedDataParallel, one process per GPU

Every epoch logs losses, codebook perplexity and codes used, and the validation SSIM and sharpness;
keeps checkpoints/vqvae_last.pt and the best-by-validation-SSIM checkpoints/vqvae_best.pt (with
--adversarial, the last epoch);
and writes a fixed grid of validation reconstructions to out/progress/ for the GIF.
"""
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from adversary import (build_adversary, check_schedule_flags, codes_frozen, decoder_adversarial_loss,
                       discriminator_step, freeze_codes)
from bench import BenchmarkConfig, loader_batches, report, resident_batches, time_steps, train_or_benchmark
from bench import prepare as prepare_benchmark
from checkpoint import RunState, checkpoint_payload, save_checkpoint
from cli import opt, parse_configs
from codes import reconstruct_all, to_unit, unit_batches
from dataset import load_split_tensor, resolve_data_root
from errors import FlagError
from files import image_grid, progress_indices, save_gray_png
from hardware import Ranks, pick_device, use_fast_math, wrap_for_ranks
from metrics import codebook_usage, edge_sums, ssim_per_image
from modules import VQVAE, VQVAEConfig
from slices import FOREGROUND_THRESHOLD, cases_in_several_splits
from training import (EpochLosses, StopFlag, TimeBudget, apply_time_budget, epoch_bar, epoch_order, loss_line, make_adam,
                      make_scheduler, move_milestones, my_batch, save_when_due_or_stopping, steps_per_epoch,
                      training_run)


@dataclass
class TrainConfig:
    data: str = opt("demo", "OASIS root holding keras_png_slices_{train,validate,test}, or 'demo'")
    image_size: int = opt(128, "train and evaluate at this size (OASIS slices are 256x256)", minimum=1)
    epochs: int = opt(18, "passes over the training split (at most; see --minutes)", minimum=1)
    minutes: float = opt(0.0, "time budget of the training loop: timing its steps, the run is cut to the steps that "
                              "fit, and the learning-rate milestones and the discriminator's schedule move with its "
                              "end; a resumed run gets the budget afresh; 0 = no budget: all --epochs, the same "
                              "steps on every machine", minimum=0.0)
    batch_size: int = opt(8, "images per step", minimum=1)
    lr: float = opt(1e-3, "Adam learning rate")
    milestones: list = opt((0.6, 0.85), "MultiStepLR milestones as fractions of all steps")
    lr_gamma: float = opt(0.3, "learning-rate factor at each milestone")
    vflip: bool = opt(False, "augment by flipping training slices top-bottom (left-right hemispheres)")
    recon_loss: str = opt("bce", "reconstruction loss on [0, 1] intensities", choices=["bce", "mse"])
    edge_loss: float = opt(0.0, "weight of an L1 loss between the image gradients of the reconstruction and of the "
                                "input, added to the reconstruction loss: a blurred edge costs there (0 = none)",
                           minimum=0.0)
    adversarial: float = opt(0.0, "weight of a patch discriminator's loss on the reconstructions (VQGAN), on top of "
                                  "the gradient-norm balance that makes 1 pull as hard as the reconstruction loss "
                                  "(0 = none); it asks for edges and texture a per-pixel loss lets blur away",
                             minimum=0.0)
    adversarial_from: float = opt(0.72, "share of the training steps before the discriminator joins, so that it "
                                        "first meets reconstructions worth judging", minimum=0.0, maximum=1.0)
    adversarial_warmup: float = opt(0.06, "share of the training steps the discriminator trains alone once "
                                          "joined, before the decoder hears it: until it tells real from "
                                          "reconstructed, its verdict is noise the adaptive weight scales up",
                                    minimum=0.0, maximum=1.0)
    adversarial_ramp: float = opt(0.06, "share of the training steps over which the decoder's adversarial weight "
                                        "rises from 0 to --adversarial once it hears the discriminator (0 = at "
                                        "once)", minimum=0.0, maximum=1.0)
    adversarial_freeze_codes: bool = opt(True, "freeze the encoder and codebooks once the decoder hears the "
                                               "discriminator: the decoder alone learns from it (the step skips "
                                               "the encoder's backward pass), and the codes stay as the "
                                               "reconstruction loss made them (when the whole model "
                                               "heard it, codebook usage collapsed on one seed in three)")
    adversarial_lr: float = opt(1e-4, "the discriminator's Adam learning rate (betas 0.5, 0.9); at the VQ-VAE's "
                                      "1e-3 it learns nothing, even against a fixed decoder", minimum=0.0)
    dtype: str = opt("auto", "autocast dtype of the convolutions (the quantizer stays float32); auto = "
                             "bfloat16 where the device has fast bf16 kernels (CUDA, CPUs with AVX-512 BF16), "
                             "float32 elsewhere", choices=["auto", "float32", "bfloat16"])
    seed: int = opt(0, "random seed")
    device: str = opt("auto", "cuda, cpu, or auto (cuda when available)")
    checkpoint_dir: str = opt("checkpoints", "where vqvae_last.pt and vqvae_best.pt go")
    progress_dir: str = opt("out/progress", "where the per-epoch validation grids go")
    log_every: int = opt(50, "steps between log lines (loss, codebook perplexity, codes used)", minimum=1)
    checkpoint_every: int = opt(0, "also write vqvae_last.pt every this many steps; 0 = once per epoch")
    resume: bool = opt(False, "continue exactly from checkpoint_dir/vqvae_last.pt")
    channels_last: bool = opt(True, "keep activations channels-last (the layout fast convolution kernels want)")
    compile: bool = opt(False, "torch.compile the training step's model (compiling takes a while first)")


@dataclass
class TrainBenchmarkConfig(BenchmarkConfig):
    benchmark_loader: str = opt("resident", "how --benchmark feeds batches: resident (the split sits on the device "
                                            "as uint8, batched and converted there, as training does) or "
                                            "dataloader (a DataLoader over host memory, copying every batch)",
                                choices=["resident", "dataloader"])


# Named starting points; explicit flags override them.
PRESETS = {
    # fits a 2-core CPU in minutes (the flags' own defaults; chosen on a CPU). Batches of 8 train
    # as many images per second there as 16, so each epoch makes twice the steps: every seed
    # converges within the 18 epochs instead of some stopping while still rising (RESULTS.md).
    "quick": {"image_size": 128, "hidden": 64, "res_hidden": 32, "num_codes": 256, "code_dim": 64,
              "batch_size": 8},
    # OASIS at its own 256x256 on a 2-core CPU: two code levels (VQ-VAE-2), a 32x32 grid that the
    # quick prior models and a 64x64 one that holds the detail, for a detail prior given the coarse
    # codes; 18 epochs, about 15 minutes with bf16 kernels, the last four of them a patch
    # discriminator's: it sharpens the decoder over frozen codes (RESULTS.md, "Two code levels")
    "full": {"image_size": 256, "n_downsample": 2, "levels": 2, "coarse_only": 0.25, "hidden": 64,
             "res_hidden": 32, "num_codes": 256, "code_dim": 64, "batch_size": 8, "epochs": 18,
             "adversarial": 1.0},
    # van den Oord et al. 2017 at full OASIS resolution: 256 hidden units everywhere, 512 x 64 codes
    # (chosen on a GPU)
    "paper": {"image_size": 256, "hidden": 256, "res_hidden": 256, "num_codes": 512, "code_dim": 64,
              "batch_size": 32},
}


def default_preset(args):
    """paper where the run trains on a GPU; on a CPU full for OASIS (--data other than demo), quick for
    the demo set"""
    if pick_device(args.device).type == "cuda":
        return "paper"
    return "quick" if getattr(args, "data", "demo") == "demo" else "full"


def parse_args(argv=None):
    """(TrainConfig, VQVAEConfig, TrainBenchmarkConfig) from the command line."""
    return parse_configs(__doc__, [TrainConfig, VQVAEConfig, TrainBenchmarkConfig], argv, presets=PRESETS,
                         default_preset=default_preset)


def warn_about_leaking_cases(root):
    leaking = cases_in_several_splits(root)
    if leaking:
        examples = ", ".join(f"case {c} in {'+'.join(s)}" for c, s in list(leaking.items())[:3])
        print(f"warning: {len(leaking)} case(s) sit in more than one split ({examples}); their slices are "
              f"near copies, so validation and test scores will be optimistic", file=sys.stderr)


def evaluate(model, images_u8, batch_size=64, ranks=None):
    """Mean SSIM, sharpness (metrics.sharpness, at the model's size) and per-code counts over a
    held-out split (shared out among processes)."""
    ranks = ranks or Ranks()
    mine = images_u8[ranks.rank::ranks.world]
    model.eval()
    recons, counts = [], torch.zeros(model.cfg.num_codes, dtype=torch.long)
    with torch.no_grad():
        for x in unit_batches(mine, batch_size):
            logits, _, indices, _ = model(x)
            recons.append(torch.sigmoid(logits).float().cpu())
            counts += torch.bincount(indices.flatten().cpu(), minlength=model.cfg.num_codes)
    real = to_unit(mine).cpu()
    recon = torch.cat(recons) if recons else real
    ssim = ssim_per_image(real, recon) if len(mine) else np.zeros(0)
    real, recon = real[:, 0].numpy(), recon[:, 0].numpy()
    edges = edge_sums(recon, real, real > FOREGROUND_THRESHOLD)
    device = images_u8.device
    total = ranks.sum(torch.tensor([ssim.sum(), len(ssim), *edges], dtype=torch.float64, device=device))
    counts = ranks.sum(counts.to(device)).cpu()
    return float(total[0] / total[1]), float(total[2] / total[3]), counts


def reconstruction_loss(logits, x, kind, edge_weight=0.0):
    if kind == "bce":
        loss = F.binary_cross_entropy_with_logits(logits.float(), x)
    else:
        loss = F.mse_loss(torch.sigmoid(logits.float()), x)
    if edge_weight:
        loss = loss + edge_weight * edge_loss(torch.sigmoid(logits.float()), x)
    return loss


def image_gradients(x):
    """Finite differences of (B, C, H, W) images down the rows and along the columns."""
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def edge_loss(reconstruction, x):
    """Mean L1 between the image gradients of reconstruction and input: what a blur averages away
    costs here in full, where the per-pixel loss sees only a small error spread over the edge."""
    return sum(F.l1_loss(a, b) for a, b in zip(image_gradients(reconstruction), image_gradients(x)))


def build_training(cfg: TrainConfig, model_cfg: VQVAEConfig, device, ranks, n_train):
    """The model, what the step calls forward (DDP- or compile-wrapped), the optimizer, the
    schedule and the adversary (None without --adversarial), the same for training and
    --benchmark."""
    use_fast_math(device, cfg.dtype)
    model = VQVAE(model_cfg).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = step_forward(model, cfg, ranks, device)
    optimizer = make_adam([p for p in model.parameters() if p.requires_grad], cfg.lr, device)
    total_steps = cfg.epochs * steps_per_epoch(n_train, cfg.batch_size, ranks)
    scheduler = make_scheduler(optimizer, cfg.milestones, cfg.lr_gamma, total_steps)
    return model, forward, optimizer, scheduler, build_adversary(cfg, model_cfg.in_channels, device, ranks,
                                                                 total_steps)


def step_forward(model, cfg: TrainConfig, ranks, device):
    """What the training step calls forward: the model, DDP-wrapped over several processes
    (over the parameters that learn at the time of the call), compiled with --compile."""
    forward = wrap_for_ranks(model, ranks, device)
    return torch.compile(forward) if cfg.compile else forward


def train_step(model, forward, optimizer, scheduler, x, cfg: TrainConfig, adversary=None, heard_share=1.0):
    """One optimisation step on a float batch in [0, 1] (and one of the discriminator's, when
    `adversary` is given; its verdict enters the decoder's loss at `heard_share` of
    --adversarial, not at all when 0). Returns the detached losses (total, reconstruction, vq,
    the decoder's adversarial loss, the discriminator's) as one device tensor, so nothing waits
    for the device, and the batch's per-code counts."""
    model.train()
    if codes_frozen(model):  # no EMA updates, no re-seeded codes
        for quantizer in model.code_quantizers():
            quantizer.eval()
    if cfg.vflip:  # flip a random half of the batch; the draw comes from the saved torch RNG
        flip = torch.rand(len(x), device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(2), x)
    x = x.contiguous(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    autocast_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
        logits, vq_loss, _, stats = forward(x)
    recon = reconstruction_loss(logits, x, cfg.recon_loss, cfg.edge_loss)
    loss = recon + vq_loss
    fooled = discriminated = torch.zeros((), device=x.device)
    if adversary is not None:
        fake = torch.sigmoid(logits.float())
        if heard_share > 0:
            term, fooled = decoder_adversarial_loss(adversary, fake, recon, model.decoder.net[-1].weight,
                                                    heard_share * cfg.adversarial, autocast_dtype)
            loss = loss + term
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    if adversary is not None:
        discriminated = discriminator_step(adversary, x, fake.detach(), autocast_dtype)
    losses = [loss, recon, vq_loss, fooled, discriminated]
    return torch.stack([v.detach() for v in losses]), stats["counts"].long()


def end_schedules_at(total_steps, step, scheduler, adversary, cfg: TrainConfig):
    """A time budget ends the run at total_steps: the learning-rate milestones and the
    discriminator's schedule, shares of the run, move with its end."""
    move_milestones(scheduler, cfg.milestones, total_steps, step)
    if adversary is not None:
        adversary.end_at(total_steps, step)


def train(cfg: TrainConfig, model_cfg: VQVAEConfig, progress=True, stop=None):
    """Train and return the run's history (one dict per epoch).

    Raises DataError, CheckpointError, NonFiniteLoss, or KeyboardInterrupt after saving
    when stopped by SIGINT/SIGTERM (or by `stop`, an object whose .signal turns non-None).
    Started by torchrun, every process trains on its share of each batch.
    """
    if model_cfg.coarse_only and model_cfg.levels == 1:
        raise FlagError(f"--coarse-only {model_cfg.coarse_only} needs --levels 2 (one level has no coarse codes)")
    check_schedule_flags(cfg)
    with training_run(cfg, "vqvae", "vqvae", "python train.py", progress) as run:
        cfg, ranks, device, say = run.cfg, run.ranks, run.device, run.say
        root = resolve_data_root(cfg.data)
        train_u8, _ = load_split_tensor(root, "train", cfg.image_size, device, progress=run.progress)
        val_u8, _ = load_split_tensor(root, "validate", cfg.image_size, device, progress=run.progress)
        say(f"data: {root} | train {len(train_u8)} | validate {len(val_u8)} | "
            f"{cfg.image_size}x{cfg.image_size} | device {device}"
            + (f" | {ranks.world} processes" if ranks.world > 1 else ""))
        if ranks.main:
            warn_about_leaking_cases(root)

        model, forward, optimizer, scheduler, adversary = build_training(cfg, model_cfg, device, ranks,
                                                                         len(train_u8))
        adversary_states = {} if adversary is None else {"discriminator": adversary.net,
                                                         "discriminator_optimizer": adversary.optimizer}
        if adversary is not None and cfg.minutes:  # a budget moves its schedule
            adversary_states["adversary_schedule"] = adversary
        state = RunState(best=-1.0)
        if cfg.resume:
            state = run.resume(model, model_cfg, optimizer, scheduler, extra_states=adversary_states)
        elif ranks.main:  # a new run's GIF must not pick up an older run's frames
            for old_frame in Path(cfg.progress_dir).glob("epoch_*.png"):
                old_frame.unlink()

        def save(path):
            extras = {name: part.state_dict() for name, part in adversary_states.items()}
            save_checkpoint(path, checkpoint_payload("vqvae", model, model_cfg, cfg, optimizer, scheduler, state,
                                                     **extras))

        grid_ids = progress_indices(len(val_u8))
        n_steps = steps_per_epoch(len(train_u8), cfg.batch_size, ranks)
        # codes used since the last log, of every level's codebook (coarse first)
        counts = torch.zeros(model_cfg.levels * model_cfg.num_codes, dtype=torch.long, device=device)
        budget = TimeBudget(cfg.minutes) if cfg.minutes > 0 else None
        started = time.time()
        with stop or StopFlag() as stop:
            for epoch in range(state.epoch, cfg.epochs):
                if state.finished():
                    break
                order = epoch_order(len(train_u8), cfg.seed, epoch).to(device)
                losses = EpochLosses(state.step, device)
                bar, write = epoch_bar(state.step_in_epoch, n_steps, epoch, cfg.epochs, run.progress, say)
                for i in bar:
                    if state.finished():
                        break
                    x = to_unit(train_u8[my_batch(order, i, cfg.batch_size, ranks)])
                    judging = adversary if adversary is not None and adversary.trains(state.step) else None
                    share = judging.decoder_share(state.step) if judging is not None else 0.0
                    if adversary is not None and adversary.codes_freeze_at(state.step) and not codes_frozen(model):
                        freeze_codes(model)  # also on resuming a run past this point
                        forward = step_forward(model, cfg, ranks, device)
                    step_losses, step_counts = train_step(model, forward, optimizer, scheduler, x, cfg, judging,
                                                          heard_share=share)
                    counts += step_counts
                    state.step, state.step_in_epoch = state.step + 1, i + 1
                    if budget is not None:
                        total = apply_time_budget(budget, state, cfg.epochs * n_steps, device, ranks, write)
                        if total is not None:
                            end_schedules_at(total, state.step, scheduler, adversary, cfg)
                    losses.add(step_losses)
                    at_log_point = state.step % cfg.log_every == 0
                    if at_log_point:
                        losses.check_finite()
                        write(loss_line(state.step, step_losses, ranks) + " | "
                              + codebook_line(counts, model_cfg.num_codes, ranks))
                        counts.zero_()
                    save_when_due_or_stopping(stop, state, losses, ranks, device, at_log_point=at_log_point,
                                              checkpoint_every=cfg.checkpoint_every,
                                              save_last=lambda: save(run.last_path),
                                              resume_command=run.resume_command())
                bar.close()
                train_loss, train_recon, train_vq, train_fooled, train_judged = (losses.means(ranks)
                                                                                  or [float("nan")] * 5)
                state.epoch, state.step_in_epoch = epoch + 1, 0

                val_ssim, val_sharpness, val_counts = evaluate(model, val_u8, ranks=ranks)
                perplexity, used = codebook_usage(val_counts)
                # the epoch's last step: the discriminator trained (judged), the decoder heard it (heard)
                judged = adversary is not None and adversary.trains(state.step - 1)
                heard = judged and adversary.decoder_hears(state.step - 1)
                record = {"epoch": epoch + 1, "step": state.step, "lr": scheduler.get_last_lr()[0],
                          "train_loss": train_loss, "train_recon": train_recon, "train_vq": train_vq,
                          "train_adversarial": train_fooled, "train_discriminator": train_judged,
                          "val_ssim": val_ssim, "val_sharpness": val_sharpness, "val_perplexity": perplexity,
                          "val_codes_used": used, "adversarial": heard, "seconds": time.time() - started}
                state.history.append(record)
                say(f"epoch {epoch + 1:3d} | loss {train_loss:.5f} (recon {train_recon:.5f}, vq {train_vq:.5f}) "
                    + (f"| adversarial {train_fooled:.3f}, discriminator {train_judged:.3f} " if judged else "")
                    + f"| val SSIM {val_ssim:.4f} | sharpness {val_sharpness:.3f} | perplexity {perplexity:.1f} "
                    f"| codes {used}/{model_cfg.num_codes} | {record['seconds']:.0f}s")
                if ranks.main:
                    save_progress_grid(model, val_u8[grid_ids], Path(cfg.progress_dir) / f"epoch_{epoch + 1:03d}.png")
                # every process holds the same all-reduced figure. With a discriminator the last epoch is
                # kept: validation SSIM prefers the blur it is there to remove, down to the epochs that
                # barely heard it, and its dips (RESULTS.md, "A patch discriminator")
                run.end_epoch(state, val_ssim, heard if adversary is not None else val_ssim > state.best, save)
        say(f"best validation SSIM {state.best:.4f}{' (the last epoch)' if adversary is not None else ''} "
            f"-> {run.best_path}")
        return state.history


def codebook_line(counts, num_codes, ranks):
    """Perplexity and codes used of per-code counts summed over processes, each level's codebook
    on its own (coarse first)."""
    levels = ranks.sum(counts.clone()).cpu().split(num_codes)
    names = ["coarse ", "fine "] if len(levels) == 2 else [""]
    return " | ".join(f"{name}perplexity {p:.1f} | {name}codes used {u}/{num_codes}"
                      for name, (p, u) in zip(names, map(codebook_usage, levels)))


def benchmark_training(cfg: TrainConfig, model_cfg: VQVAEConfig, bench: TrainBenchmarkConfig):
    """Time training steps on the real training split; writes no checkpoint or image."""
    device, cfg = prepare_benchmark(cfg)
    train_u8, _ = load_split_tensor(resolve_data_root(cfg.data), "train", cfg.image_size, device)
    model, forward, optimizer, scheduler, adversary = build_training(cfg, model_cfg, device, Ranks(), len(train_u8))
    if adversary is not None and adversary.freezes_codes:
        freeze_codes(model)  # the steps timed are the decoder's, hearing the discriminator
    next_batch = (resident_batches if bench.benchmark_loader == "resident" else loader_batches)(
        train_u8, cfg.batch_size, cfg.seed, device)
    figures = time_steps(lambda x: train_step(model, forward, optimizer, scheduler, x, cfg, adversary), next_batch,
                         bench, batch_size=cfg.batch_size, device=device)
    return report("train.py", {"loader": bench.benchmark_loader, "image_size": cfg.image_size, "dtype": cfg.dtype,
                               "adversarial": cfg.adversarial,
                               "channels_last": cfg.channels_last, "compile": cfg.compile,
                               "hidden": model_cfg.hidden, "num_codes": model_cfg.num_codes}, figures)


def save_progress_grid(model, images_u8, path):
    """Top row: validation inputs; bottom row: their reconstructions."""
    recon = reconstruct_all(model, images_u8)
    inputs = to_unit(images_u8).cpu()
    save_gray_png(path, image_grid(torch.cat([inputs, recon]).squeeze(1).numpy(), ncol=len(images_u8)))


def main(argv=None):
    train_or_benchmark(parse_args(argv), train, benchmark_training)


if __name__ == "__main__":
    main()
