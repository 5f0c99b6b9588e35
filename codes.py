"""A VQ-VAE's hand-off over whole splits: images to the code indices of every level and back,
in batches, on the model's device. No I/O."""
import torch

def to_unit(images_u8):
    """uint8 images -> float32 in [0, 1] (a new tensor)."""
    return images_u8.float().div(255)


def unit_batches(images, batch_size=64, device=None):
    """(N, 1, H, W) images, uint8 or already float in [0, 1] -> float batches in [0, 1], converted
    (and moved to `device`, if given) one batch at a time."""
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size]
        if device is not None:
            batch = batch.to(device)
        yield to_unit(batch) if batch.dtype == torch.uint8 else batch


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
def encode_all_levels(vqvae, images, batch_size=64, device=None):
    """(N, 1, H, W) images, uint8 or float in [0, 1] -> the code indices of every level, coarse
    first, on the images' device (or on `device`, where each batch is moved)."""
    batches = [vqvae.encode_levels(x) for x in unit_batches(images, batch_size, device)]
    return [torch.cat(level) for level in zip(*batches)]


@torch.no_grad()
def decode_all(vqvae, codes, batch_size=64):
    """Code indices (N, h, w), or a list with one per level (coarse first) -> images (N, 1, H, W)
    in [0, 1] on the CPU."""
    levels = list(codes) if isinstance(codes, (list, tuple)) else [codes]
    return torch.cat([vqvae.decode_indices([c[i:i + batch_size] for c in levels]).cpu()
                      for i in range(0, len(levels[0]), batch_size)])


