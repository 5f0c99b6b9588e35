"""The checkpoint: its layout, saving and loading it, rebuilding a trained model from it alone,
and the run state it carries so that a resumed run continues exactly.

The checkpoint is one dict, built by `checkpoint_payload` and read back by
`load_checkpoint`:

    kind          "vqvae" or "pixelcnn": which model; a loader refuses the other kind
    model         the model's state_dict
    model_config  dataclasses.asdict of its config: enough to rebuild the model alone
    train_config  dataclasses.asdict of the trainer's config (dtype as --dtype auto resolved
                  it); a VQ-VAE's train_config["image_size"] is the size its codes are for,
                  read with `image_size_of`
    ...           extras of the kind: a prior keeps grid (h, w), slice_counts (training
                  slices per conditioned position), baselines (uniform_bits,
                  frequency_entropy_bits), and the VQ-VAE it was fit to: vqvae_path and
                  vqvae_fingerprint (`vqvae_fingerprint`: its codebook and decoder weights)
    optimizer     the optimizer's state_dict
    scheduler     the learning-rate scheduler's state_dict
    run           dataclasses.asdict(RunState): epoch, step, best, history, total_steps
    rng           rng_state(): the Python, NumPy, torch (and CUDA) generators

Everything in it is a tensor or a plain value, so it loads with torch.load(weights_only=True).

A run holds `run_lock` on its checkpoint folder for as long as it trains, so a second run of
the same kind on the same folder is refused instead of overwriting the first one's files.
"""
import contextlib
import dataclasses
import fcntl
import hashlib
import os
import random
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from cli import opt
from errors import CheckpointError
from files import remove_leftover_temporaries, write_atomically
from modules import VQVAE, PixelCNNConfig, Priors, VQVAEConfig, build_prior


@dataclasses.dataclass
class TrainedModels:
    """The flags of a script that uses a trained VQ-VAE and its prior."""
    vqvae: str = opt("checkpoints/vqvae_best.pt", "VQ-VAE checkpoint from train.py")
    prior: str = opt("checkpoints/pixelcnn_best.pt", "PixelCNN checkpoint from pixelcnn.py")
    detail_prior: str = opt("", "a two-level VQ-VAE's detail prior from pixelcnn.py; empty = "
                                "pixelcnn_detail_best.pt beside --prior")
    allow_unpaired: bool = opt(False, "decode the prior's codes even with a VQ-VAE it was not fit to (its codes "
                                      "then mean other pictures); without it such a pair is refused")


def checkpoint_payload(kind, model, model_cfg, train_cfg, optimizer, scheduler, state, **extras):
    """The checkpoint of a run as it stands (the layout in this module's docstring)."""
    return {"kind": kind, "model": model.state_dict(),
            "model_config": dataclasses.asdict(model_cfg), "train_config": dataclasses.asdict(train_cfg),
            **extras, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "run": dataclasses.asdict(state), "rng": rng_state()}


def save_checkpoint(path, payload):
    """Write atomically: a kill mid-write leaves the previous file intact."""
    write_atomically(path, lambda f: torch.save(payload, f))


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


def image_size_of(vqvae_ckpt):
    """The image size a VQ-VAE checkpoint was trained at, which its codes belong to."""
    return vqvae_ckpt["train_config"]["image_size"]


# Checkpoints once named the coarse level of a two-level VQ-VAE "top" (as VQ-VAE-2 does); they
# load under its present name, and the digest that pairs priors with it keeps the old one, so a
# prior fit before the rename stays paired.
OLD_COARSE, COARSE = "top.", "coarse."


def present_names(state_dict):
    return {COARSE + k[len(OLD_COARSE):] if k.startswith(OLD_COARSE) else k: v for k, v in state_dict.items()}


def digest_name(name):
    return OLD_COARSE + name[len(COARSE):] if name.startswith(COARSE) else name


def load_weights(model, ckpt, path):
    """Weights into a model built from the checkpoint's config; a checkpoint whose tensors do
    not fit (written by an older version of a model) gets a one-line error."""
    try:
        model.load_state_dict(present_names(ckpt["model"]))
    except RuntimeError as err:
        detail = str(err).strip().splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise CheckpointError(f"{path} does not fit this version's {ckpt['kind']} model ({detail}); "
                              f"train it again") from None


def check_same_config(path, saved, config):
    """Refuse to resume into a model built differently, naming what differs. A setting that an
    older checkpoint does not record had its default then."""
    wanted = dataclasses.asdict(config)
    saved = {**dataclasses.asdict(type(config)()), **saved}
    changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} there, {wanted.get(k)!r} here" for k in changed)
        raise CheckpointError(f"{path} was built with other settings ({details})")


def load_model(path, kind, build, made_by, device):
    """A model rebuilt from its checkpoint alone, in eval mode, and the whole checkpoint."""
    ckpt = load_checkpoint(path, kind, made_by=made_by)
    model = build(ckpt["model_config"]).to(device)
    load_weights(model, ckpt, path)
    model.eval()
    return model, ckpt


def load_vqvae(path, device):
    return load_model(path, "vqvae", lambda c: VQVAE(VQVAEConfig(**c)), "python train.py", device)


def load_prior(path, device):
    return load_model(path, "pixelcnn", lambda c: build_prior(PixelCNNConfig(**c)),
                      "python pixelcnn.py", device)


def vqvae_fingerprint(vqvae_ckpt):
    """A digest of what turns a prior's codes into pictures: the VQ-VAE's codebooks and decoder
    weights (with two levels, all of the coarse level's too). Two VQ-VAEs with the same
    fingerprint decode every code grid alike."""
    digest = hashlib.sha256()
    for name, tensor in sorted((digest_name(name), tensor) for name, tensor in vqvae_ckpt["model"].items()):
        if name == "quantizer.codebook" or name.startswith(("decoder.", OLD_COARSE)):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_pairing(prior_ckpt, prior_path, vqvae_ckpt, vqvae_path, allow_unpaired=False):
    """Refuse a prior with a VQ-VAE it was not fit to: its codes would decode to other pictures,
    with every shape matching. allow_unpaired turns the refusal into a warning."""
    recorded = prior_ckpt.get("vqvae_fingerprint")
    if recorded == vqvae_fingerprint(vqvae_ckpt):
        return
    fitted = (f"was fit to another VQ-VAE ({prior_ckpt.get('vqvae_path')} as it was then)" if recorded
              else "records no VQ-VAE it was fit to (an older checkpoint)")
    if allow_unpaired:
        print(f"warning: {prior_path} {fitted}; decoding with {vqvae_path} anyway (--allow-unpaired)",
              file=sys.stderr)
        return
    raise CheckpointError(f"{prior_path} {fitted}, not to {vqvae_path}; fit a prior to it with "
                          f"`python pixelcnn.py --vqvae {vqvae_path} --data ...`, or pass --allow-unpaired")


class TrainedPair(NamedTuple):
    """A VQ-VAE and the priors fit to it, with their checkpoints. detail: the detail prior of a
    two-level VQ-VAE, None for one level."""
    vqvae: torch.nn.Module
    vqvae_ckpt: dict
    prior: torch.nn.Module
    prior_ckpt: dict
    detail: torch.nn.Module | None

    @property
    def priors(self):
        return Priors(self.prior, self.detail)


def load_trained_pair(models: TrainedModels, device):
    """The VQ-VAE and the prior that --vqvae and --prior name, checked to belong together, as a
    TrainedPair. The detail prior is None for a one-level VQ-VAE; for a two-level one it is
    --detail-prior, checked the same way."""
    vqvae, vqvae_ckpt = load_vqvae(models.vqvae, device)
    prior, prior_ckpt = load_prior(models.prior, device)
    check_pairing(prior_ckpt, models.prior, vqvae_ckpt, models.vqvae, models.allow_unpaired)
    if vqvae.cfg.levels == 1:
        return TrainedPair(vqvae, vqvae_ckpt, prior, prior_ckpt, None)
    detail_path = models.detail_prior or str(Path(models.prior).with_name("pixelcnn_detail_best.pt"))
    detail, detail_ckpt = load_prior(detail_path, device)
    if not detail.cfg.context_codes or prior.cfg.context_codes:
        raise CheckpointError(f"{models.prior} must be the coarse codes' prior and {detail_path} the detail prior "
                              f"of {models.vqvae}; pixelcnn.py writes them as pixelcnn_best.pt and "
                              f"pixelcnn_detail_best.pt")
    check_pairing(detail_ckpt, detail_path, vqvae_ckpt, models.vqvae, models.allow_unpaired)
    return TrainedPair(vqvae, vqvae_ckpt, prior, prior_ckpt, detail)


@contextlib.contextmanager
def run_lock(folder, kind, hold=True):
    """Hold folder/<kind>.lock while a run trains (hold=False: a no-op, for the processes of a
    torchrun other than the first). A second run of the kind on the folder gets a one-line
    error. The kernel releases the lock when its process ends, however it ends, so a killed
    run never blocks the next; that run also clears the killed one's half-written files."""
    if not hold:
        yield
        return
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / f"{kind}.lock", "a+")
    except OSError as err:
        raise CheckpointError(f"{folder}: cannot hold a checkpoint folder here ({err.strerror})") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise CheckpointError(f"{folder} is in use by a {kind} run that is still training ({holder}); "
                                  f"wait for it, or give this run its own --checkpoint-dir") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}\n")
        lock.flush()
        for name in (f"{kind}_last.pt", f"{kind}_best.pt"):
            remove_leftover_temporaries(folder, name)
        yield


def resume_run(path, kind, made_by, model, model_cfg, optimizer, scheduler, check=None, extra_states=None):
    """Restore everything a run needs to continue exactly; returns its RunState. check(ckpt),
    when given, may refuse the checkpoint before anything is restored; extra_states: {key: what
    load_state_dict restores from ckpt[key]}, for parts only some runs have."""
    ckpt = load_checkpoint(path, kind, made_by=made_by)
    if check is not None:
        check(ckpt)
    check_same_config(path, ckpt["model_config"], model_cfg)
    extra_states = extra_states or {}
    missing = [key for key in extra_states if key not in ckpt]
    if missing:
        raise CheckpointError(f"{path} holds no {missing[0]}: its run was trained without it; resume with the "
                              f"flags it was started with")
    load_weights(model, ckpt, path)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    for key, part in extra_states.items():
        part.load_state_dict(ckpt[key])
    restore_rng_state(ckpt["rng"])
    state = RunState(**ckpt["run"])
    print(f"resumed from {path} at step {state.step} (epoch {state.epoch + 1})")
    return state


@dataclasses.dataclass
class RunState:
    """Where a training run stands; saved in every checkpoint, so resuming is exact."""
    epoch: int = 0           # epochs completed
    step_in_epoch: int = 0   # steps done in the epoch under way
    step: int = 0            # steps done in all
    best: float = float("nan")
    history: list = dataclasses.field(default_factory=list)
    total_steps: int = 0     # where a time budget ends the run; 0 = after the last epoch

    def finished(self):
        """Past the step a time budget ends the run at (never, without a budget)."""
        return bool(self.total_steps) and self.step >= self.total_steps


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


