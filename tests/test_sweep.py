"""sweep.py: ranking, a real two-run sweep on the tiny demo set, reuse, resume, and flag errors."""
import json
import os

import pytest
import torch

import dataset
import sweep
import train
from errors import NonFiniteLoss

# float32 on every CPU (--dtype auto would pick bf16 where the CPU has its kernels)
TINY_COMMON = ("--image-size 32 --hidden 16 --res-hidden 8 --num-codes 16 --code-dim 8 "
               "--batch-size 8 --epochs 1 --log-every 2 --dtype float32")
RUNS = ["", "--recon-loss mse"]


def sweep_argv(data, runs=RUNS, checkpoint_root="checkpoints/sweep"):
    return ["--common", f"--data {data} {TINY_COMMON}", "--runs", *runs, "--checkpoint-root", checkpoint_root]


def refuse_training(*args, **kwargs):
    raise AssertionError("the sweep trained although it should not have")


def history(*val_ssims, test_ssim=None):
    return [{"epoch": i + 1, "val_ssim": s, "val_perplexity": 4.0 + i, "val_codes_used": 5 + i,
             "seconds": 10.0 * (i + 1), "test_ssim": test_ssim} for i, s in enumerate(val_ssims)]


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, tiny_demo):
    """One real sweep of two runs in a scratch working directory, recording every split it reads."""
    work = tmp_path_factory.mktemp("sweep")
    splits_read = []

    def recording(real):
        def load(root, split, *args, **kwargs):
            splits_read.append(split)
            return real(root, split, *args, **kwargs)
        return load

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        patch.setattr(train, "load_split_tensor", recording(train.load_split_tensor))
        patch.setattr(dataset, "load_split", recording(dataset.load_split))
        sweep.main(sweep_argv(tiny_demo))
    return work, tiny_demo, splits_read


def results_keeping(*runs):
    """rank_runs' input: (name, history, epoch whose weights vqvae_best.pt holds) per run."""
    return [{"name": name, "flags": f"--{name}", "history": records, "kept": records[kept - 1], "data": "demo",
             "checkpoint": f"checkpoints/sweep/{name}/vqvae_best.pt"} for name, records, kept in runs]


def test_ranking_follows_the_kept_validation_epoch_not_the_last_nor_any_test_score():
    rows = sweep.rank_runs(results_keeping(
        ("steady", history(0.50, 0.70, test_ssim=0.99), 2),  # best last epoch
        ("peaked", history(0.80, 0.60, test_ssim=0.10), 1),  # best earlier
        ("weak", history(0.65, 0.66, test_ssim=0.95), 2)))
    assert [row["name"] for row in rows] == ["peaked", "steady", "weak"]
    assert [row["rank"] for row in rows] == [1, 2, 3]
    assert (rows[0]["val_ssim"], rows[0]["kept_epoch"], rows[0]["val_perplexity"],
            rows[0]["val_codes_used"]) == (0.80, 1, 4.0, 5)
    assert not any("test" in key for row in rows for key in row)


def test_an_adversarial_run_ranks_by_its_kept_last_epoch_not_its_best_earlier_one():
    # with --adversarial, vqvae_best.pt holds the last epoch, whatever SSIM the earlier ones reached
    rows = sweep.rank_runs(results_keeping(
        ("adversarial", history(0.90, 0.55), 2),
        ("plain", history(0.40, 0.60), 2)))
    assert [(row["name"], row["val_ssim"], row["kept_epoch"]) for row in rows] == [("plain", 0.60, 2),
                                                                                 ("adversarial", 0.55, 2)]


def test_train_seconds_add_up_across_a_resume():
    assert sweep.train_seconds([{"seconds": 10.0}, {"seconds": 20.0}, {"seconds": 4.0}]) == 24.0


def test_run_names_are_readable_slugs_and_unique():
    assert sweep.run_name("") == "default"
    assert sweep.run_name("--recon-loss mse") == "recon-loss-mse"
    assert sweep.run_name("--no-ema") == "no-ema"
    assert sweep.run_name("--lr=3e-4 --milestones 0.5 0.8") == "lr-3e-4-milestones-0.5-0.8"
    assert sweep.run_name("--no-ema", taken=["no-ema", "no-ema-2"]) == "no-ema-3"


def test_runs_file_skips_blanks_and_comments_and_reads_defaults():
    text = "# ablations\n\n-\ndefault\n--no-ema   # codebook by gradient\n  --recon-loss mse\n"
    assert sweep.parse_run_lines(text) == ["", "", "--no-ema", "--recon-loss mse"]


def test_flag_sets_that_start_with_a_dash_are_values_not_options(tmp_path):
    runs_file = tmp_path / "runs.txt"
    runs_file.write_text("--vflip\n")
    args, runs = sweep.parse_args(["--runs", "--no-ema", "", "--lr=0.01", "--common", "--epochs 2",
                                   "--file", str(runs_file)])
    assert runs == ["--no-ema", "", "--lr=0.01", "--vflip"]
    assert args.common == "--epochs 2" and args.out_dir == "out/sweep"


def test_sweep_writes_both_runs_ranked_by_validation_ssim(finished_sweep):
    work, data, _ = finished_sweep
    summary = json.loads((work / "out/sweep/results.json").read_text())
    rows = summary["runs"]
    assert sorted(row["name"] for row in rows) == ["default", "recon-loss-mse"]
    assert [row["val_ssim"] for row in rows] == sorted((row["val_ssim"] for row in rows), reverse=True)
    assert summary["winner"] == rows[0]["name"]
    for row in rows:
        best = torch.load(work / row["checkpoint"], weights_only=True)
        assert best["train_config"]["checkpoint_dir"] == f"checkpoints/sweep/{row['name']}"
        assert best["run"]["history"][-1]["val_ssim"] == row["val_ssim"]
        assert (work / "out/sweep" / row["name"] / "progress/epoch_001.png").is_file()
    assert best["train_config"]["image_size"] == 32 and best["train_config"]["data"] == str(data)
    assert summary["predict_command"] == (f"python predict.py --vqvae checkpoints/sweep/{rows[0]['name']}"
                                          f"/vqvae_best.pt --data {data} --reconstruction-only")
    table = (work / "out/sweep/results.md").read_text()
    assert "| 1 | " in table and "| 2 | " in table and "`--recon-loss mse`" in table


def test_sweep_never_reads_the_test_split(finished_sweep):
    _, _, splits_read = finished_sweep
    assert set(splits_read) == {"train", "validate"}


def test_rerunning_a_finished_sweep_reuses_its_runs(finished_sweep, monkeypatch, capsys):
    work, data, _ = finished_sweep
    monkeypatch.chdir(work)
    monkeypatch.setattr(train, "train", refuse_training)
    before = (work / "out/sweep/results.json").read_text()
    sweep.main(sweep_argv(data))
    assert "finished earlier, reusing" in capsys.readouterr().out
    assert json.loads((work / "out/sweep/results.json").read_text()) == json.loads(before)


def test_a_sweep_ranks_the_epoch_each_vqvae_best_holds_not_the_best_of_its_history(finished_sweep, monkeypatch):
    # as after --adversarial: "default" peaked at epoch 1 (0.99) but kept epoch 2 (0.10)
    work, data, _ = finished_sweep
    monkeypatch.chdir(work)
    monkeypatch.setattr(train, "train", refuse_training)
    for name, val_ssims, kept in (("default", (0.99, 0.10), 2), ("recon-loss-mse", (0.50,), 1)):
        (work / "kept" / name).mkdir(parents=True)
        ckpt = torch.load(work / "checkpoints/sweep" / name / "vqvae_best.pt", weights_only=True)
        records = [{**ckpt["run"]["history"][-1], "epoch": i + 1, "val_ssim": s} for i, s in enumerate(val_ssims)]
        ckpt["run"].update(history=records, epoch=len(records), best=val_ssims[-1])
        torch.save(ckpt, work / "kept" / name / "vqvae_last.pt")
        ckpt["run"].update(history=records[:kept], epoch=kept, best=val_ssims[kept - 1])
        torch.save(ckpt, work / "kept" / name / "vqvae_best.pt")
    sweep.main([*sweep_argv(data, checkpoint_root="kept"), "--out-dir", "out/kept"])
    rows = json.loads((work / "out/kept/results.json").read_text())["runs"]
    assert [(row["name"], row["val_ssim"], row["kept_epoch"], row["epochs"]) for row in rows] == [
        ("recon-loss-mse", 0.50, 1, 1), ("default", 0.10, 2, 2)]


def test_an_interrupted_run_resumes_and_a_changed_one_retrains(finished_sweep, monkeypatch, capsys):
    work, data, _ = finished_sweep
    monkeypatch.chdir(work)
    for name in ("default", "recon-loss-mse"):
        (work / "copy" / name).mkdir(parents=True)
        ckpt = torch.load(work / "checkpoints/sweep" / name / "vqvae_last.pt", weights_only=True)
        if name == "default":  # as if stopped before its first epoch ended
            ckpt["run"].update(epoch=0, step_in_epoch=0, step=0, best=-1.0, history=[])
        else:
            ckpt["train_config"]["lr"] = 0.5
        torch.save(ckpt, work / "copy" / name / "vqvae_last.pt")
    calls, real_train = {}, train.train

    def recording_train(cfg, model_cfg, **kwargs):
        calls[os.path.basename(cfg.checkpoint_dir)] = cfg.resume
        return real_train(cfg, model_cfg, **kwargs)

    monkeypatch.setattr(train, "train", recording_train)
    sweep.main(sweep_argv(data, checkpoint_root="copy"))
    assert calls == {"default": True, "recon-loss-mse": False}
    assert "other lr; training from scratch" in capsys.readouterr().out


def test_a_diverging_run_is_left_out_and_the_others_still_ranked(finished_sweep, monkeypatch, capsys):
    work, data, _ = finished_sweep
    monkeypatch.chdir(work)

    def diverge(*args, **kwargs):
        raise NonFiniteLoss("the loss became non-finite at step 3")

    monkeypatch.setattr(train, "train", diverge)
    sweep.main([*sweep_argv(data, runs=[*RUNS, "--lr 1e9"]), "--out-dir", "out/diverged"])
    assert "lr-1e9: the loss became non-finite" in capsys.readouterr().err
    rows = json.loads((work / "out/diverged/results.json").read_text())["runs"]
    assert sorted(row["name"] for row in rows) == ["default", "recon-loss-mse"]


@pytest.mark.parametrize("bad_run, complaint", [("--epochz 3", "--epochz"),
                                                ("--checkpoint-dir elsewhere", "--checkpoint-dir")])
def test_a_bad_run_stops_the_sweep_in_one_line_naming_it_before_training(tmp_path, monkeypatch, capsys,
                                                                         bad_run, complaint):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train, "train", refuse_training)
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(sweep_argv("demo", runs=["", bad_run]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"run '{sweep.run_name(bad_run)}'" in err and complaint in err
    assert not (tmp_path / "checkpoints").exists()


def test_no_runs_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--common", "--epochs 1"])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
