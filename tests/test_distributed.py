"""Two processes on the CPU (gloo), started by torchrun as a user would, must end with the
same weights while each trains on its own share of every batch."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

PROJECT = Path(__file__).resolve().parents[1]

# Runs one script's main() under torchrun and saves the weights of the model it trained,
# one file per process (the scripts themselves write checkpoints on rank 0 only).
WORKER = textwrap.dedent("""
    import os, sys
    import torch
    import pixelcnn, train
    script, out = sys.argv[1], sys.argv[2]
    module, factory = (train, "VQVAE") if script == "train" else (pixelcnn, "build_prior")
    made, build = [], getattr(module, factory)
    setattr(module, factory, lambda cfg: made.append(build(cfg)) or made[-1])
    module.main(sys.argv[3:])
    torch.save(made[0].state_dict(), os.path.join(out, f"{script}_rank{os.environ['RANK']}.pt"))
""")


def torchrun(work, script, args):
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(work / "worker.py"), script, str(work), *args],
        cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def assert_same_weights(a, b):
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"ranks differ in {different}"


def test_two_processes_end_with_identical_weights(tmp_path, tiny_demo, tiny_flags):
    (tmp_path / "worker.py").write_text(WORKER)
    # 8 training slices, 2 per process per step: 2 steps per epoch, where one process takes 4
    out = torchrun(tmp_path, "train", ["--data", str(tiny_demo), "--epochs", "2", *tiny_flags.vqvae,
                                       "--batch-size", "2", "--log-every", "1"])
    assert_same_weights(tmp_path / "train_rank0.pt", tmp_path / "train_rank1.pt")
    last = torch.load(tmp_path / "checkpoints" / "vqvae_last.pt", weights_only=True)
    assert last["run"]["step"] == 4
    assert out.count("val SSIM") == 2  # one log line per epoch: rank 1 prints nothing
    assert len(list((tmp_path / "out" / "progress").glob("epoch_*.png"))) == 2

    torchrun(tmp_path, "pixelcnn", ["--data", str(tiny_demo), "--epochs", "2", *tiny_flags.prior,
                                    "--batch-size", "2"])
    assert_same_weights(tmp_path / "pixelcnn_rank0.pt", tmp_path / "pixelcnn_rank1.pt")
    assert torch.load(tmp_path / "checkpoints" / "pixelcnn_last.pt", weights_only=True)["run"]["step"] == 4


def test_two_processes_freeze_the_codes_for_the_discriminator_and_stay_identical(tmp_path, tiny_demo, tiny_flags):
    """Once the decoder hears the discriminator the encoder stops requiring gradients; the
    processes' DDP wrapper must then be rebuilt over what still learns, or the step fails."""
    (tmp_path / "worker.py").write_text(WORKER)
    # 2 steps an epoch: the discriminator joins at step 1 and the decoder hears it from step 2
    torchrun(tmp_path, "train", ["--data", str(tiny_demo), "--epochs", "2", *tiny_flags.vqvae, "--batch-size", "2",
                                 "--adversarial", "1", "--adversarial-from", "0.25", "--adversarial-warmup", "0.25"])
    assert_same_weights(tmp_path / "train_rank0.pt", tmp_path / "train_rank1.pt")
    history = torch.load(tmp_path / "checkpoints" / "vqvae_last.pt", weights_only=True)["run"]["history"]
    assert [r["adversarial"] for r in history] == [False, True]
