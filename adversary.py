"""A patch discriminator for the VQ-VAE's loss (VQGAN, Esser et al. 2021, arXiv 2012.09841).

It learns to tell real slices from reconstructions patch by patch, and the decoder learns to
make patches it cannot tell: edges and tissue texture, which a per-pixel loss lets a blur
average away. Trained from scratch beside the VQ-VAE (no pretrained weights). train.py owns the
loop; here are the network and the three formulas, each in a named helper. No I/O.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

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
