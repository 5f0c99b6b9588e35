"""Kill train.py and pixelcnn.py with SIGKILL at random moments, resume, and check nothing is lost.

    python tests/hard_kills.py [--kills 20] [--seed 0]

Each trainer first runs uninterrupted on a tiny demo set (float32, a checkpoint every step).
Then the same run is started again and again, each time with --resume once a checkpoint
exists, and killed: every other time at a random moment of the run, otherwise the instant a
checkpoint write has begun (its temporary file appears). After every kill each checkpoint
left in the folder must load, and the run must finish with weights, optimizer state and run
state identical to the uninterrupted run's, bit for bit. Prints one table row per trainer and
exits 1 if any check failed. Not a test module (no test_ prefix): tests/test_faults.py runs a
short version of it.
"""
import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROJECT = Path(__file__).resolve().parents[1]
TINY_VQVAE = ["--preset", "quick", "--image-size", "32", "--hidden", "16", "--res-hidden", "8", "--num-codes", "16", "--code-dim", "8",
              "--batch-size", "2", "--epochs", "6", "--dtype", "float32", "--checkpoint-every", "1"]
TINY_PRIOR = ["--hidden", "8", "--n-layers", "2", "--kernel", "3", "--batch-size", "2", "--epochs", "6",
              "--minutes", "0", "--dtype", "float32", "--checkpoint-every", "1"]


def trainer_command(script, data, folder, extra):
    return [sys.executable, str(PROJECT / script), "--data", str(data), "--checkpoint-dir", str(folder),
            "--seed", "0", *extra]


def checkpoints_in(folder):
    return sorted(Path(folder).glob("*.pt"))


def unreadable(folder):
    """The checkpoints in folder that do not load as weights-only dicts."""
    bad = []
    for path in checkpoints_in(folder):
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            assert isinstance(payload, dict) and "model" in payload
        except Exception:  # any failure to load is what this script counts
            bad.append(path.name)
    return bad


def temporaries(folder):
    """The temporary files of checkpoint writes in folder: a write under way, or one a kill cut.
    (os.listdir, not glob: the poll that waits for a write must be quick.)"""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return set()
    return {name for name in names if name.startswith(".") and ".pt." in name and name.endswith(".tmp")}


def same_state(path_a, path_b):
    """Whether two checkpoints hold identical weights, optimizer state and run position."""
    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (path_a, path_b))
    history_a = [{k: v for k, v in r.items() if k != "seconds"} for r in a["run"]["history"]]
    history_b = [{k: v for k, v in r.items() if k != "seconds"} for r in b["run"]["history"]]
    same_weights = a["model"].keys() == b["model"].keys() and all(
        torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    same_moments = all(torch.equal(x, y) for x, y in zip(tensors_of(a["optimizer"]), tensors_of(b["optimizer"])))
    same_run = (a["run"]["step"], a["run"]["epoch"], [r["epoch"] for r in history_a]) == (
        b["run"]["step"], b["run"]["epoch"], [r["epoch"] for r in history_b])
    return same_weights and same_moments and same_run


def tensors_of(state):
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for k in sorted(state, key=str) for t in tensors_of(state[k])]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in tensors_of(v)]
    return []


def run_quietly(command, cwd):
    return subprocess.run(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_and_resume(name, command, folder, kills, rng, duration, cwd):
    """SIGKILL `command` `kills` times, resuming each time, then let it finish; returns (kills
    that cut a checkpoint write, unreadable checkpoints seen after any kill)."""
    last = Path(folder) / f"{name}_last.pt"
    killed, killed_mid_write, bad = 0, 0, []
    while killed < kills:
        left_before = temporaries(folder)  # writes cut by earlier kills, which the next run clears
        process = subprocess.Popen(command + (["--resume"] if last.is_file() else []), cwd=cwd,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        at_write = killed % 2 == 1  # every other kill waits for a checkpoint write to begin
        deadline = time.monotonic() + rng.uniform(0.2, 1.0) * duration
        while process.poll() is None:
            if temporaries(folder) - left_before if at_write else time.monotonic() >= deadline:
                process.send_signal(signal.SIGKILL)
                break
            if not at_write:
                time.sleep(0.01)
        process.wait()
        if process.returncode == 0:  # it finished first: start the run over, to kill it again
            for path in checkpoints_in(folder):
                path.unlink()
            continue
        killed += 1
        killed_mid_write += bool(temporaries(folder) - left_before)
        bad += unreadable(folder)
    finished = run_quietly(command + (["--resume"] if last.is_file() else []), cwd)
    if finished.returncode:
        raise RuntimeError(f"{name}: the last resume failed: {finished.stderr.strip()}")
    return killed_mid_write, bad + unreadable(folder)


def check_trainer(name, script, data, extra, kills, rng, work):
    reference, killed = work / f"{name}_reference", work / f"{name}_killed"
    started = time.monotonic()
    done = run_quietly(trainer_command(script, data, reference, extra), work)
    if done.returncode:
        raise RuntimeError(f"{name}: the uninterrupted run failed: {done.stderr.strip()}")
    duration = time.monotonic() - started
    mid, bad = kill_and_resume(name, trainer_command(script, data, killed, extra), killed, kills, rng, duration, work)
    identical = same_state(reference / f"{name}_last.pt", killed / f"{name}_last.pt")
    return {"trainer": script, "kills": kills, "mid_write": mid, "unreadable": len(bad), "identical": identical}


def hard_kills(kills=20, seed=0, work=None):
    """Both trainers' rows: kills, kills during a checkpoint write, unreadable checkpoints, and
    whether the final state equals the uninterrupted run's."""
    sys.path.insert(0, str(PROJECT))
    from demo import make_demo

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(work or scratch)
        data = make_demo(work / "demo", seed=1, n_train=2, n_validate=1, n_test=1, n_slices=4, progress=False)
        rows = [check_trainer("vqvae", "train.py", data, TINY_VQVAE, kills, rng, work)]
        prior = TINY_PRIOR + ["--vqvae", str(work / "vqvae_reference" / "vqvae_best.pt")]
        rows.append(check_trainer("pixelcnn", "pixelcnn.py", data, prior, kills, rng, work))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs per trainer")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    args = parser.parse_args(argv)
    rows = hard_kills(args.kills, args.seed)
    print("| trainer | SIGKILLs | of them during a checkpoint write | unreadable checkpoints | final state identical |")
    print("| --- | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['trainer']} | {r['kills']} | {r['mid_write']} | {r['unreadable']} | "
              f"{'yes' if r['identical'] else 'NO'} |")
    return 0 if all(r["identical"] and not r["unreadable"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
