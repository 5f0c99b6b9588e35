"""Train the VQ-VAE on OASIS slices (or the built-in demo set).

    python train.py                          # demo set, quick CPU profile
    python train.py --data /path/to/oasis    # a folder holding keras_png_slices_{train,validate,test}
    python train.py --resume                 # continue the last run exactly where it stopped

Every epoch logs losses, codebook perplexity and codes used, and the validation SSIM;
keeps checkpoints/vqvae_last.pt and the best-by-validation-SSIM checkpoints/vqvae_best.pt;
and writes a fixed grid of validation reconstructions to out/progress/ for the GIF.
"""
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dataset import DataError, load_split_tensor, resolve_data_root
from modules import VQVAE, VQVAEConfig
from utils import (CheckpointError, StopFlag, check_same_config, die, epoch_order, image_grid,
                   load_checkpoint, opt, parse_configs, pick_device, restore_rng_state, rng_state,
                   save_checkpoint, save_gray_png, set_seed, ssim_per_image)


@dataclass
class TrainConfig:
    data: str = opt("demo", "OASIS root holding keras_png_slices_{train,validate,test}, or 'demo'")
    image_size: int = opt(128, "train and evaluate at this size (OASIS slices are 256x256)")
    epochs: int = opt(30, "passes over the training split")
    batch_size: int = opt(32, "images per step")
    lr: float = opt(1e-3, "Adam learning rate")
    milestones: list = opt((0.6, 0.85), "MultiStepLR milestones as fractions of all steps")
    lr_gamma: float = opt(0.3, "learning-rate factor at each milestone")
    recon_loss: str = opt("mse", "reconstruction loss on [0, 1] intensities", choices=["mse", "bce"])
    dtype: str = opt("float32", "autocast dtype of the convolutions (the quantizer stays float32)",
                     choices=["float32", "bfloat16"])
    seed: int = opt(0, "random seed")
    device: str = opt("auto", "cuda, cpu, or auto (cuda when available)")
    checkpoint_dir: str = opt("checkpoints", "where vqvae_last.pt and vqvae_best.pt go")
    progress_dir: str = opt("out/progress", "where the per-epoch validation grids go")
    log_every: int = opt(50, "steps between loss printouts")
    resume: bool = opt(False, "continue from checkpoint_dir/vqvae_last.pt")


def progress_indices(n, count=8):
    """A fixed spread of validation images for the per-epoch grid."""
    return np.linspace(0, n - 1, num=min(count, n)).round().astype(int).tolist()


def batches(images_u8, batch_size):
    for start in range(0, images_u8.shape[0], batch_size):
        yield images_u8[start:start + batch_size].float().div_(255)


@torch.no_grad()
def reconstruct_all(model, images_u8, batch_size=64):
    """uint8 (N, 1, H, W) on the model's device -> float reconstructions on the CPU."""
    model.eval()
    return torch.cat([model.reconstruct(x).cpu() for x in batches(images_u8, batch_size)])


def evaluate(model, images_u8, batch_size=64):
    """Mean SSIM and per-code counts over a held-out split."""
    model.eval()
    recons, counts = [], torch.zeros(model.cfg.num_codes, dtype=torch.long)
    with torch.no_grad():
        for x in batches(images_u8, batch_size):
            logits, _, indices, _ = model(x)
            recons.append(torch.sigmoid(logits).float().cpu())
            counts += torch.bincount(indices.flatten().cpu(), minlength=model.cfg.num_codes)
    ssim = ssim_per_image(images_u8.float().div(255).cpu(), torch.cat(recons))
    return float(ssim.mean()), counts


def codebook_usage(counts):
    probs = counts.double() / max(int(counts.sum()), 1)
    perplexity = float(torch.exp(-(probs * torch.log(probs + 1e-12)).sum()))
    return perplexity, int((counts > 0).sum())


def reconstruction_loss(logits, x, kind):
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits.float(), x)
    return F.mse_loss(torch.sigmoid(logits.float()), x)


def make_checkpoint(model, optimizer, scheduler, cfg, epoch, step_in_epoch, step, best, history, device):
    return {
        "kind": "vqvae",
        "model": model.state_dict(),
        "model_config": dataclasses.asdict(model.cfg),
        "train_config": dataclasses.asdict(cfg),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch, "step_in_epoch": step_in_epoch, "step": step,
        "best_val_ssim": best, "history": history, "rng": rng_state(device),
    }


def train(cfg: TrainConfig, model_cfg: VQVAEConfig, progress=True):
    """Train and return the history (one dict per epoch). Raises DataError/CheckpointError."""
    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    root = resolve_data_root(cfg.data)
    train_u8, _ = load_split_tensor(root, "train", cfg.image_size, device)
    val_u8, _ = load_split_tensor(root, "validate", cfg.image_size, device)
    print(f"data: {root} | train {len(train_u8)} | validate {len(val_u8)} | "
          f"{cfg.image_size}x{cfg.image_size} | device {device}")

    model = VQVAE(model_cfg).to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    steps_per_epoch = max(1, len(train_u8) // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    milestones = sorted({max(1, int(f * total_steps)) for f in cfg.milestones})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=cfg.lr_gamma)

    ckpt_dir = Path(cfg.checkpoint_dir)
    last_path, best_path = ckpt_dir / "vqvae_last.pt", ckpt_dir / "vqvae_best.pt"
    start_epoch, start_step_in_epoch, step, best, history = 0, 0, 0, -1.0, []
    if cfg.resume:
        ckpt = load_checkpoint(last_path, "vqvae", made_by="python train.py")
        check_same_config(last_path, ckpt["model_config"], model_cfg)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, start_step_in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
        step, best, history = ckpt["step"], ckpt["best_val_ssim"], ckpt["history"]
        restore_rng_state(ckpt["rng"], device)
        print(f"resumed from {last_path} at epoch {start_epoch + 1}, step {step}")

    grid_ids = progress_indices(len(val_u8))
    autocast_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    counts = torch.zeros(model_cfg.num_codes, dtype=torch.long, device=device)

    with StopFlag() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            started = time.time()
            order = epoch_order(len(train_u8), cfg.seed, epoch).to(device)
            first = start_step_in_epoch if epoch == start_epoch else 0
            sums = torch.zeros(3, device=device)
            bar = tqdm(range(first, steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not progress, leave=False)
            for i in bar:
                x = train_u8[order[i * cfg.batch_size:(i + 1) * cfg.batch_size]].float().div_(255)
                with torch.autocast(device.type, dtype=autocast_dtype,
                                    enabled=autocast_dtype != torch.float32):
                    logits, vq_loss, indices, _ = model(x)
                recon = reconstruction_loss(logits, x, cfg.recon_loss)
                loss = recon + vq_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                sums += torch.stack([loss.detach(), recon.detach(), vq_loss.detach()])
                counts += torch.bincount(indices.flatten(), minlength=model_cfg.num_codes)
                if step % cfg.log_every == 0:
                    perplexity, used = codebook_usage(counts.cpu())
                    bar.set_postfix(loss=f"{loss.item():.4f}", ppl=f"{perplexity:.0f}", codes=used)
                    counts.zero_()
                if stop.signal:
                    save_checkpoint(last_path, make_checkpoint(model, optimizer, scheduler, cfg, epoch,
                                                               i + 1, step, best, history, device))
                    raise KeyboardInterrupt(f"{stop.signal}: saved {last_path} at step {step}; "
                                            f"continue with: python train.py --resume (same flags)")
            bar.close()

            n = max(steps_per_epoch - first, 1)
            train_loss, train_recon, train_vq = (sums / n).tolist()
            val_ssim, val_counts = evaluate(model, val_u8)
            perplexity, used = codebook_usage(val_counts)
            record = {"epoch": epoch + 1, "step": step, "lr": scheduler.get_last_lr()[0],
                      "train_loss": train_loss, "train_recon": train_recon, "train_vq": train_vq,
                      "val_ssim": val_ssim, "val_perplexity": perplexity, "val_codes_used": used,
                      "seconds": time.time() - started}
            history.append(record)
            print(f"epoch {epoch + 1:3d} | loss {train_loss:.5f} (recon {train_recon:.5f}, vq {train_vq:.5f}) "
                  f"| val SSIM {val_ssim:.4f} | perplexity {perplexity:.1f} | codes {used}/{model_cfg.num_codes} "
                  f"| {record['seconds']:.0f}s")
            save_progress_grid(model, val_u8[grid_ids], Path(cfg.progress_dir) / f"epoch_{epoch + 1:03d}.png")

            if val_ssim > best:
                best = val_ssim
                save_checkpoint(best_path, make_checkpoint(model, optimizer, scheduler, cfg, epoch + 1, 0,
                                                           step, best, history, device))
            save_checkpoint(last_path, make_checkpoint(model, optimizer, scheduler, cfg, epoch + 1, 0,
                                                       step, best, history, device))
    print(f"best validation SSIM {best:.4f} -> {best_path}")
    return history


def save_progress_grid(model, images_u8, path):
    """Top row: validation inputs; bottom row: their reconstructions."""
    recon = reconstruct_all(model, images_u8)
    inputs = images_u8.float().div(255).cpu()
    save_gray_png(path, image_grid(torch.cat([inputs, recon]).squeeze(1).numpy(), ncol=len(images_u8)))


def main(argv=None):
    cfg, model_cfg = parse_configs(__doc__, [TrainConfig, VQVAEConfig], argv)
    try:
        train(cfg, model_cfg)
    except (DataError, CheckpointError) as err:
        die(err)
    except KeyboardInterrupt as err:
        die(err if str(err) else "interrupted")


if __name__ == "__main__":
    main()
