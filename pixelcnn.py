"""Fit a PixelCNN prior over the code indices of a trained VQ-VAE.

    python pixelcnn.py                        # gated PixelCNN conditioned on slice position
    python pixelcnn.py --kind plain --n-conditions 0

Encodes the train and validate splits with checkpoints/vqvae_best.pt, trains with
cross-entropy, and reports validation negative log-likelihood in bits per code beside
two baselines: uniform (log2 of the codebook size) and the code-frequency entropy.
Keeps checkpoints/pixelcnn_last.pt and the best-by-validation-NLL checkpoints/pixelcnn_best.pt.
"""
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dataset import DataError, load_split_tensor, resolve_data_root
from modules import VQVAE, PixelCNNConfig, VQVAEConfig, build_prior
from utils import (CheckpointError, StopFlag, check_same_config, die, epoch_order,
                   load_checkpoint, opt, parse_configs, pick_device, restore_rng_state,
                   rng_state, save_checkpoint, set_seed)

LN2 = math.log(2)


@dataclass
class PriorTrainConfig:
    data: str = opt("demo", "OASIS root holding keras_png_slices_{train,validate,test}, or 'demo'")
    vqvae: str = opt("checkpoints/vqvae_best.pt", "the trained VQ-VAE whose codes the prior models")
    epochs: int = opt(20, "passes over the training codes")
    batch_size: int = opt(32, "code grids per step")
    lr: float = opt(1e-3, "Adam learning rate")
    milestones: list = opt((0.6, 0.85), "MultiStepLR milestones as fractions of all steps")
    lr_gamma: float = opt(0.3, "learning-rate factor at each milestone")
    seed: int = opt(0, "random seed")
    device: str = opt("auto", "cuda, cpu, or auto (cuda when available)")
    checkpoint_dir: str = opt("checkpoints", "where pixelcnn_last.pt and pixelcnn_best.pt go")
    log_every: int = opt(50, "steps between loss printouts")
    resume: bool = opt(False, "continue from checkpoint_dir/pixelcnn_last.pt")


def load_vqvae(path, device):
    """The VQ-VAE and its whole checkpoint (configs and training history)."""
    ckpt = load_checkpoint(path, "vqvae", made_by="python train.py")
    model = VQVAE(VQVAEConfig(**ckpt["model_config"])).to(device)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt


@torch.no_grad()
def encode_to_indices(vqvae, images_u8, batch_size=64):
    """uint8 (N, 1, H, W) -> long code indices (N, h, w) on the same device."""
    return torch.cat([vqvae.encode_to_indices(images_u8[i:i + batch_size].float().div(255))
                      for i in range(0, len(images_u8), batch_size)])


def encode_split(vqvae, root, split, image_size, device):
    images_u8, slices = load_split_tensor(root, split, image_size, device)
    return encode_to_indices(vqvae, images_u8), torch.as_tensor(slices.slice_idx, device=device)


def frequency_entropy_bits(codes, num_codes):
    """Entropy of the code-frequency distribution: what a prior ignoring context achieves."""
    p = torch.bincount(codes.flatten(), minlength=num_codes).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())


def conditions_for(slice_idx, cfg: PixelCNNConfig):
    if not cfg.n_conditions:
        return None
    if int(slice_idx.max()) >= cfg.n_conditions:
        raise DataError(f"slice index {int(slice_idx.max())} is beyond --n-conditions {cfg.n_conditions}")
    return slice_idx


@torch.no_grad()
def nll_bits(model, codes, slice_idx, batch_size=64):
    """Mean negative log-likelihood per code, in bits."""
    model.eval()
    total = 0.0
    for i in range(0, len(codes), batch_size):
        c = codes[i:i + batch_size]
        cond = slice_idx[i:i + batch_size] if slice_idx is not None else None
        total += float(F.cross_entropy(model(c, cond), c, reduction="sum"))
    return total / codes.numel() / LN2


def load_prior(path, device):
    ckpt = load_checkpoint(path, "pixelcnn", made_by="python pixelcnn.py")
    model = build_prior(PixelCNNConfig(**ckpt["model_config"])).to(device)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt


def train_prior(cfg: PriorTrainConfig, model_cfg: PixelCNNConfig, progress=True):
    """Train the prior and return its history. Raises DataError/CheckpointError."""
    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    vqvae, vq_ckpt = load_vqvae(cfg.vqvae, device)
    model_cfg = dataclasses.replace(model_cfg, num_codes=vqvae.cfg.num_codes)
    image_size = vq_ckpt["train_config"]["image_size"]
    root = resolve_data_root(cfg.data)
    train_codes, train_slices = encode_split(vqvae, root, "train", image_size, device)
    val_codes, val_slices = encode_split(vqvae, root, "validate", image_size, device)
    train_cond, val_cond = conditions_for(train_slices, model_cfg), conditions_for(val_slices, model_cfg)
    del vqvae
    grid = tuple(train_codes.shape[1:])
    baselines = {"uniform_bits": math.log2(model_cfg.num_codes),
                 "frequency_entropy_bits": frequency_entropy_bits(train_codes, model_cfg.num_codes)}
    print(f"codes: train {tuple(train_codes.shape)} | validate {tuple(val_codes.shape)} | "
          f"baselines: uniform {baselines['uniform_bits']:.3f} bits, "
          f"code-frequency entropy {baselines['frequency_entropy_bits']:.3f} bits")

    model = build_prior(model_cfg).to(device)
    print(f"{model_cfg.kind} PixelCNN: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"conditioned on {model_cfg.n_conditions or 'nothing'}")
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps_per_epoch = max(1, len(train_codes) // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    milestones = sorted({max(1, int(f * total_steps)) for f in cfg.milestones})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=cfg.lr_gamma)

    ckpt_dir = Path(cfg.checkpoint_dir)
    last_path, best_path = ckpt_dir / "pixelcnn_last.pt", ckpt_dir / "pixelcnn_best.pt"
    start_epoch, start_step_in_epoch, step, best, history = 0, 0, 0, math.inf, []
    if cfg.resume:
        ckpt = load_checkpoint(last_path, "pixelcnn", made_by="python pixelcnn.py")
        check_same_config(last_path, ckpt["model_config"], model_cfg)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, start_step_in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
        step, best, history = ckpt["step"], ckpt["best_val_nll"], ckpt["history"]
        restore_rng_state(ckpt["rng"], device)
        print(f"resumed from {last_path} at epoch {start_epoch + 1}, step {step}")

    slice_counts = torch.bincount(train_slices.cpu(), minlength=max(model_cfg.n_conditions, 1))

    def checkpoint(epoch, step_in_epoch):
        return {"kind": "pixelcnn", "model": model.state_dict(),
                "model_config": dataclasses.asdict(model_cfg), "train_config": dataclasses.asdict(cfg),
                "grid": grid, "slice_counts": slice_counts, "baselines": baselines,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch, "step_in_epoch": step_in_epoch, "step": step,
                "best_val_nll": best, "history": history, "rng": rng_state(device)}

    with StopFlag() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            started = time.time()
            order = epoch_order(len(train_codes), cfg.seed, epoch).to(device)
            first = start_step_in_epoch if epoch == start_epoch else 0
            loss_sum = torch.zeros((), device=device)
            bar = tqdm(range(first, steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not progress, leave=False)
            for i in bar:
                pick = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                codes = train_codes[pick]
                cond = train_cond[pick] if train_cond is not None else None
                loss = F.cross_entropy(model(codes, cond), codes)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                loss_sum += loss.detach()
                if step % cfg.log_every == 0:
                    bar.set_postfix(bits=f"{loss.item() / LN2:.3f}")
                if stop.signal:
                    save_checkpoint(last_path, checkpoint(epoch, i + 1))
                    raise KeyboardInterrupt(f"{stop.signal}: saved {last_path} at step {step}; "
                                            f"continue with: python pixelcnn.py --resume (same flags)")
            bar.close()

            train_bits = float(loss_sum) / max(steps_per_epoch - first, 1) / LN2
            val_bits = nll_bits(model, val_codes, val_cond)
            record = {"epoch": epoch + 1, "step": step, "lr": scheduler.get_last_lr()[0],
                      "train_nll_bits": train_bits, "val_nll_bits": val_bits,
                      "seconds": time.time() - started}
            history.append(record)
            print(f"epoch {epoch + 1:3d} | train {train_bits:.3f} bits/code | validate {val_bits:.3f} bits/code "
                  f"| {record['seconds']:.0f}s")
            if val_bits < best:
                best = val_bits
                save_checkpoint(best_path, checkpoint(epoch + 1, 0))
            save_checkpoint(last_path, checkpoint(epoch + 1, 0))
    print(f"best validation NLL {best:.3f} bits/code (uniform {baselines['uniform_bits']:.3f}, "
          f"code-frequency entropy {baselines['frequency_entropy_bits']:.3f}) -> {best_path}")
    return history


def main(argv=None):
    cfg, model_cfg = parse_configs(__doc__, [PriorTrainConfig, PixelCNNConfig], argv)
    try:
        train_prior(cfg, model_cfg)
    except (DataError, CheckpointError) as err:
        die(err)
    except KeyboardInterrupt as err:
        die(err if str(err) else "interrupted")


if __name__ == "__main__":
    main()
