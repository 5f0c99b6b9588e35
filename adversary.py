"""A patch discriminator for the VQ-VAE's loss (VQGAN, Esser et al. 2021, arXiv 2012.09841).

It learns to tell real slices from reconstructions patch by patch, and the decoder learns to
make patches it cannot tell: edges and tissue texture, which a per-pixel loss lets a blur
average away. Trained from scratch beside the VQ-VAE (no pretrained weights).

Here is all of it but the loop, which train.py owns: the network; the three formulas, each in a
named helper; and the schedule (`Adversary`): the discriminator trains from a share of the run on
(--adversarial-from), alone for a warm-up (--adversarial-warmup), then the decoder hears it, at
a weight rising over a ramp (--adversarial-ramp), while the codes stay frozen
(--adversarial-freeze-codes). No I/O.
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import FlagError
from hardware import wrap_for_ranks
from training import make_adam

# Thin on purpose: on a CPU every discriminator FLOP is taken from the VQ-VAE's time.
DISCRIMINATOR_CHANNELS = (16, 32, 64, 64)


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): 4x4 convolutions, three of stride 2, to a map of logits,
    one per overlapping patch of 70x70 px. GroupNorm, not BatchNorm: real and reconstructed
    slices go through in one batch, and a slice's logits must not depend on its batch mates."""

    def __init__(self, in_channels=1, channels=DISCRIMINATOR_CHANNELS):
        super().__init__()
        layers, width = [], in_channels
        for i, c in enumerate(channels):
            layers.append(nn.Conv2d(width, c, 4, stride=2 if i < len(channels) - 1 else 1, padding=1))
            if i:
                layers.append(nn.GroupNorm(8, c))
            layers.append(nn.LeakyReLU(0.2))
            width = c
        layers.append(nn.Conv2d(width, 1, 4, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def discriminator_hinge_loss(real_logits, fake_logits):
    """The discriminator's hinge loss: real patches pushed above +1, reconstructed below -1."""
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def generator_loss(fake_logits):
    """What the decoder minimises: the discriminator's mean logit on its patches, negated."""
    return -fake_logits.mean()


def adaptive_weight(reconstruction_loss, adversarial_loss, last_layer_weight, max_weight=1e4):
    """VQGAN's balance: the ratio of the gradient norms the two losses put on the decoder's last
    layer, so the adversarial term pulls about as hard as the reconstruction term whatever the
    scale of either. A constant (no gradient flows through it)."""
    reconstruction_grad, = torch.autograd.grad(reconstruction_loss, last_layer_weight, retain_graph=True)
    adversarial_grad, = torch.autograd.grad(adversarial_loss, last_layer_weight, retain_graph=True)
    return (reconstruction_grad.norm() / (adversarial_grad.norm() + 1e-4)).clamp(0, max_weight).detach()


# ----------------------------------------------------------------------------- the schedule

# the usual GAN momentum (Radford et al. 2015; VQGAN): a short memory, for a target that moves
GAN_BETAS = (0.5, 0.9)

# train.py's flags that shape the schedule; without --adversarial they must keep their defaults
SCHEDULE_FLAGS = ("adversarial_from", "adversarial_warmup", "adversarial_ramp", "adversarial_lr",
                  "adversarial_freeze_codes")


def check_schedule_flags(cfg):
    """Refuse discriminator settings that would do nothing: set without --adversarial, a
    discriminator whose warm-up outlasts the run, so the decoder never hears it, or codes frozen
    from the first step. cfg: train.py's TrainConfig."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    if not cfg.adversarial:
        changed = [name for name in SCHEDULE_FLAGS if getattr(cfg, name) != defaults[name]]
        if changed:
            raise FlagError(f"--{changed[0].replace('_', '-')} needs --adversarial W (W > 0): without it "
                            f"there is no discriminator")
    elif cfg.adversarial_from + cfg.adversarial_warmup >= 1:
        raise FlagError(f"--adversarial-from {cfg.adversarial_from} plus --adversarial-warmup "
                        f"{cfg.adversarial_warmup} reach the end of the run: the decoder would never hear the "
                        f"discriminator")
    elif cfg.adversarial_freeze_codes and cfg.adversarial_from + cfg.adversarial_warmup == 0:
        raise FlagError("--adversarial-freeze-codes with --adversarial-from 0 and --adversarial-warmup 0 would "
                        "freeze the codes before they learn anything (--no-adversarial-freeze-codes)")


@dataclass
class Adversary:
    """--adversarial's discriminator and its schedule: the network, what its step calls forward
    (DDP-wrapped), its optimizer, the training step from which it trains, the one from which the
    decoder hears it, the steps its weight ramps over, and whether the codes freeze then."""
    net: torch.nn.Module
    forward: object
    optimizer: torch.optim.Optimizer
    trains_from: int
    heard_from: int
    ramp_steps: int = 0
    freezes_codes: bool = True
    shares: tuple = (0.0, 0.0, 0.0)  # --adversarial-from, -warmup and -ramp: what the steps are shares of

    def state_dict(self):
        """The schedule's steps, which a time budget moves: a checkpoint keeps them, so a resumed
        run follows the same schedule."""
        return {"steps": torch.tensor([self.trains_from, self.heard_from, self.ramp_steps])}

    def load_state_dict(self, state):
        self.trains_from, self.heard_from, self.ramp_steps = (int(s) for s in state["steps"])

    def end_at(self, total_steps, step):
        """The run now ends at total_steps (a time budget's estimate): the schedule's points are
        its shares of that run. A point already reached stays where it was."""
        start, warmup, ramp = self.shares
        if not self.trains(step):
            self.trains_from = max(step + 1, int(start * total_steps))
        if not self.decoder_hears(step):
            self.heard_from = max(step + 1, self.trains_from + int(warmup * total_steps))
            self.ramp_steps = int(ramp * total_steps)

    def trains(self, step):
        return step >= self.trains_from

    def decoder_hears(self, step):
        return step >= self.heard_from

    def decoder_share(self, step):
        """How much of --adversarial the decoder's loss takes at this step: 0 before it hears the
        discriminator, then rising linearly to 1 over the ramp."""
        if not self.decoder_hears(step):
            return 0.0
        return min(1.0, (step - self.heard_from + 1) / self.ramp_steps) if self.ramp_steps else 1.0

    def codes_freeze_at(self, step):
        """Whether the codes stop learning from this step on: once the decoder hears the
        discriminator, with --adversarial-freeze-codes."""
        return self.freezes_codes and self.decoder_hears(step)


def build_adversary(cfg, in_channels, device, ranks, total_steps):
    """The Adversary of train.py's TrainConfig for a run of total_steps, or None without
    --adversarial."""
    if not cfg.adversarial:
        return None
    # drawn from a generator of its own, so the VQ-VAE trains as it would without it until it joins
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        net = PatchDiscriminator(in_channels)
    net = net.to(device)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    adversary = Adversary(net, wrap_for_ranks(net, ranks, device),
                          make_adam(net.parameters(), cfg.adversarial_lr, device, betas=GAN_BETAS),
                          trains_from=0, heard_from=0, freezes_codes=cfg.adversarial_freeze_codes,
                          shares=(cfg.adversarial_from, cfg.adversarial_warmup, cfg.adversarial_ramp))
    adversary.end_at(total_steps, step=-1)  # before the first step: every point is still ahead
    return adversary


def freeze_codes(model):
    """The VQ-VAE's encoder and codebooks stop learning. Without gradients autograd skips the
    encoder's backward pass (a fifth of the step) and Adam leaves them alone; train.py's step
    keeps the quantizers in eval mode: no EMA update, no re-seeded code."""
    for p in model.code_parameters():
        p.requires_grad_(False)


def codes_frozen(model):
    return not any(p.requires_grad for p in model.encoder.parameters())


def autocast(device_type, dtype):
    return torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)


def judge(net, images, autocast_dtype):
    """The discriminator's logits for the decoder's loss. Its weights are frozen for this pass:
    the decoder's step needs the gradient at the images only."""
    net.requires_grad_(False)
    try:
        with autocast(images.device.type, autocast_dtype):
            return net(images)
    finally:
        net.requires_grad_(True)


def decoder_adversarial_loss(adversary, fake, reconstruction_loss, last_layer_weight, weight, autocast_dtype):
    """(the term the decoder's loss adds, at `weight` times the adaptive weight; the generator
    loss itself, for the log)."""
    fooled = generator_loss(judge(adversary.net, fake, autocast_dtype).float())
    return weight * adaptive_weight(reconstruction_loss, fooled, last_layer_weight) * fooled, fooled


def discriminator_step(adversary, real, fake, autocast_dtype):
    """One step of the discriminator on a batch of real slices and their reconstructions."""
    with autocast(real.device.type, autocast_dtype):
        logits = adversary.forward(torch.cat([real, fake]))
    real_logits, fake_logits = logits.float().chunk(2)
    loss = discriminator_hinge_loss(real_logits, fake_logits)
    adversary.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    adversary.optimizer.step()
    return loss.detach()
