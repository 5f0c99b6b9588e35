"""Nothing silently wrong: a prior never meets a VQ-VAE it was not fit to, a full disk or a
second run on the same folder ends with one line and loses nothing, a SIGKILL at any moment
leaves checkpoints that load and a run that resumes bit for bit."""
import errno
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import anomaly
import files
import pixelcnn
import predict
import train
from checkpoint import load_checkpoint, run_lock, save_checkpoint, vqvae_fingerprint
from errors import CheckpointError, OutputError

PROJECT = Path(__file__).resolve().parents[1]


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def one_error_line(capsys):
    """The one-line error a script ended with (progress bars may stand before it), never a traceback."""
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err, err
    return last


@pytest.fixture(scope="module")
def other_vqvae(tmp_path_factory, tiny_demo, tiny_flags):
    """A VQ-VAE of the same codebook size as tiny_models', trained with another seed."""
    work = tmp_path_factory.mktemp("other_vqvae")
    train.main(["--data", str(tiny_demo), "--epochs", "1", "--seed", "5", "--checkpoint-dir", str(work),
                "--progress-dir", str(work / "progress"), *tiny_flags.vqvae_batch_2])
    return work / "vqvae_best.pt"


def test_a_prior_records_the_vqvae_it_was_fit_to(tiny_models):
    prior_ckpt = load_checkpoint(tiny_models.prior, "pixelcnn")
    assert prior_ckpt["vqvae_fingerprint"] == vqvae_fingerprint(load_checkpoint(tiny_models.vqvae, "vqvae"))
    assert prior_ckpt["vqvae_path"].endswith("vqvae_best.pt")


def test_predict_refuses_a_prior_with_a_vqvae_it_was_not_fit_to(tiny_models, other_vqvae, tmp_path, capsys):
    flags = ["--data", str(tiny_models.data), "--vqvae", str(other_vqvae), "--prior", str(tiny_models.prior),
             "--out-dir", str(tmp_path / "out"), "--n-samples", "2", "--sweep-frames", "0"]
    with pytest.raises(SystemExit) as stop:
        predict.main(flags)
    assert stop.value.code == 2
    err = one_error_line(capsys)
    assert str(tiny_models.prior) in err and str(other_vqvae) in err and "python pixelcnn.py --vqvae" in err
    assert not (tmp_path / "out" / "samples.png").exists()

    predict.main(flags + ["--allow-unpaired"])  # an expert's choice, said aloud
    assert "--allow-unpaired" in capsys.readouterr().err
    assert (tmp_path / "out" / "samples.png").is_file()


def test_anomaly_refuses_a_prior_with_a_vqvae_it_was_not_fit_to(tiny_models, other_vqvae, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        anomaly.main(["--data", str(tiny_models.data), "--vqvae", str(other_vqvae), "--prior", str(tiny_models.prior),
                      "--out-dir", str(tmp_path)])
    assert stop.value.code == 2
    assert str(other_vqvae) in one_error_line(capsys)


def test_a_prior_without_a_record_of_its_vqvae_is_refused(tiny_models, tmp_path, capsys):
    old = load_checkpoint(tiny_models.prior, "pixelcnn")
    del old["vqvae_fingerprint"], old["vqvae_path"]
    save_checkpoint(tmp_path / "old_prior.pt", old)
    with pytest.raises(SystemExit):
        predict.main(["--data", str(tiny_models.data), "--vqvae", str(tiny_models.vqvae),
                      "--prior", str(tmp_path / "old_prior.pt"), "--out-dir", str(tmp_path / "out")])
    assert "records no VQ-VAE" in one_error_line(capsys)


def test_resuming_a_prior_with_another_vqvae_is_refused(tiny_models, other_vqvae, tmp_path, tiny_flags, capsys):
    shutil.copy(tiny_models.work / "checkpoints" / "pixelcnn_last.pt", tmp_path / "pixelcnn_last.pt")
    with pytest.raises(SystemExit) as stop:
        pixelcnn.main(["--data", str(tiny_models.data), "--vqvae", str(other_vqvae), "--resume", "--epochs", "30",
                       "--checkpoint-dir", str(tmp_path), *tiny_flags.prior_batch_2])
    assert stop.value.code == 2
    assert "pixelcnn_last.pt" in one_error_line(capsys)


def test_a_full_disk_mid_write_leaves_the_previous_file_whole(tmp_path):
    path = tmp_path / "run" / "vqvae_last.pt"
    save_checkpoint(path, {"kind": "vqvae", "model": {"w": torch.ones(3)}})
    before = path.read_bytes()

    def half_then_full(f):
        f.write(b"\0" * 1000)
        full_disk()

    with pytest.raises(OutputError) as failure:
        files.write_atomically(path, half_then_full)
    assert "No space left on device" in str(failure.value) and str(path) in str(failure.value)
    assert "\n" not in str(failure.value)
    assert path.read_bytes() == before
    assert list(path.parent.iterdir()) == [path]  # no half-written temporary left behind


def test_a_full_disk_during_training_ends_with_one_line_and_keeps_the_last_checkpoint(
        tmp_path, tiny_demo, tiny_flags, monkeypatch, capsys):
    flags = ["--data", str(tiny_demo), "--checkpoint-dir", str(tmp_path), "--progress-dir", str(tmp_path / "p"),
             *tiny_flags.vqvae_batch_2]
    train.main(flags + ["--epochs", "1"])
    saved = load_checkpoint(tmp_path / "vqvae_last.pt", "vqvae")
    capsys.readouterr()
    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(SystemExit) as stop:
        train.main(flags + ["--epochs", "2", "--resume"])
    assert stop.value.code == 2
    assert "No space left on device" in one_error_line(capsys)
    kept = load_checkpoint(tmp_path / "vqvae_last.pt", "vqvae")
    assert kept["run"]["step"] == saved["run"]["step"]


def test_every_output_of_predict_is_written_whole(tiny_models, tmp_path, monkeypatch, capsys):
    written, write = [], files.write_atomically

    def recording(path, writer):
        written.append(Path(path))
        write(path, writer)

    monkeypatch.setattr(files, "write_atomically", recording)
    out = tmp_path / "out"
    predict.main(["--data", str(tiny_models.data), "--vqvae", str(tiny_models.vqvae),
                  "--prior", str(tiny_models.prior), "--out-dir", str(out), "--n-samples", "2",
                  "--sweep-frames", "2", "--save-reconstructions",
                  "--progress-dir", str(tiny_models.work / "out" / "progress")])
    outputs = {p for p in out.rglob("*") if p.is_file()}
    assert out / "metrics.json" in outputs and out / "progression.gif" in outputs
    assert outputs <= set(written)

    before = (out / "metrics.json").read_bytes()
    monkeypatch.setattr(files.os, "fsync", full_disk)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        predict.main(["--data", str(tiny_models.data), "--vqvae", str(tiny_models.vqvae),
                      "--prior", str(tiny_models.prior), "--out-dir", str(out)])
    assert "No space left on device" in one_error_line(capsys)
    assert (out / "metrics.json").read_bytes() == before


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {project!r})
    from checkpoint import run_lock
    with run_lock({folder!r}, {kind!r}):
        print("holding", flush=True)
        time.sleep(600)
""")


def hold_lock(folder, kind):
    """Another process that holds the folder's lock until killed."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.format(project=str(PROJECT), folder=str(folder),
                                                                         kind=kind)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    return holder


def test_a_second_run_on_a_folder_in_use_is_refused_and_a_killed_runs_lock_blocks_nothing(
        tmp_path, tiny_demo, tiny_flags, capsys):
    flags = ["--data", str(tiny_demo), "--checkpoint-dir", str(tmp_path), "--progress-dir", str(tmp_path / "p"),
             "--epochs", "1", *tiny_flags.vqvae_batch_2]
    holder = hold_lock(tmp_path, "vqvae")
    try:
        with pytest.raises(SystemExit) as stop:
            train.main(flags)
        assert stop.value.code == 2
        err = one_error_line(capsys)
        assert str(tmp_path) in err and "in use" in err and f"pid {holder.pid}" in err
        assert not (tmp_path / "vqvae_last.pt").exists()
    finally:
        holder.kill()  # SIGKILL: the process gets no chance to clean up
        holder.wait()
    (tmp_path / ".vqvae_last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    train.main(flags)
    assert (tmp_path / "vqvae_last.pt").is_file()
    assert not list(tmp_path.glob(".*.tmp"))  # what the killed run left half-written is cleared


def test_a_prior_run_on_a_folder_in_use_is_refused(tiny_models, tmp_path, tiny_flags, capsys):
    holder = hold_lock(tmp_path, "pixelcnn")
    try:
        with pytest.raises(SystemExit):
            pixelcnn.main(["--data", str(tiny_models.data), "--vqvae", str(tiny_models.vqvae),
                           "--checkpoint-dir", str(tmp_path), *tiny_flags.prior_batch_2])
        assert "in use" in one_error_line(capsys)
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_released_when_the_run_ends(tmp_path):
    with run_lock(tmp_path, "vqvae"):
        with pytest.raises(CheckpointError):
            with run_lock(tmp_path, "vqvae"):
                pass
    with run_lock(tmp_path, "vqvae"):
        pass


def test_sigkills_at_random_moments_and_mid_write_lose_nothing():
    """The short version of tests/hard_kills.py: two kills per trainer, one during a checkpoint write."""
    done = subprocess.run([sys.executable, str(PROJECT / "tests" / "hard_kills.py"), "--kills", "2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| train.py") or
            line.startswith("| pixelcnn.py")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "2" and int(cells[2]) >= 1 and cells[3] == "0" and cells[4] == "yes", row
