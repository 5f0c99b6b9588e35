"""Train several flag sets of train.py; rank the weights each run kept by validation SSIM in a table.

    python sweep.py --common "--data ../shared/oasis --epochs 8" --runs "" "--recon-loss mse" "--no-ema"
    python sweep.py --common "--epochs 8" --file runs.txt   # one flag set per line, '#' comments, '-' = defaults

Each run trains in-process with its own flags after the common ones (so its own win), into
checkpoints/sweep/<name>/ with its progress grids in out/sweep/<name>/progress/; <name> is a
slug of its flags (recon-loss-mse, no-ema, default). Runs finished with the same settings are
reused and interrupted ones resumed, so running the same command again loses nothing.
Writes out/sweep/results.md and results.json ranked by the validation SSIM of the epoch each
run's vqvae_best.pt holds (its history record of that epoch): the best epoch by validation SSIM,
or with --adversarial the last epoch, whatever SSIM the earlier epochs reached. Prints the
predict.py command that scores the winner on the test split once; the sweep never reads it.

The one script that imports another: the sweep drives train.py's own parse_args and train()
in-process (so a run is exactly `python train.py FLAGS`, and tests replace train.train).
"""
import contextlib
import dataclasses
import io
import json
import re
import shlex
import sys
from pathlib import Path

import train
from checkpoint import load_checkpoint
from cli import HelpFormatter, OneLineErrorParser, die, run_script
from errors import NonFiniteLoss
from files import write_json, write_text
from hardware import pick_device, resolve_dtype

OWN_FLAGS = {"--runs", "--file", "--common", "--out-dir", "--checkpoint-root", "-h", "--help"}
# Where a run is written and how often it logs or saves do not change what it learns.
IGNORED_SETTINGS = {"resume", "checkpoint_dir", "progress_dir", "log_every", "checkpoint_every"}


def normalize_flags(text):
    """One flag set in a canonical spelling; '-' and 'default' mean train.py's defaults."""
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError as err:  # an unbalanced quote
        raise ValueError(f"flag set {text!r}: {err}") from None
    return "" if tokens in (["-"], ["default"]) else shlex.join(tokens)


def parse_run_lines(text):
    """The flag sets of a runs file: one a line, blank lines and # comments skipped."""
    return [normalize_flags(line) for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def run_name(flags, taken=()):
    """A readable directory name from a run's flags, made unique against `taken`."""
    words = [token.lstrip("-") for token in shlex.split(flags)]
    name = re.sub(r"[^A-Za-z0-9.+_]+", "-", "-".join(words)).strip("-.")[:80] or "default"
    unique, n = name, 2
    while unique in taken:
        unique, n = f"{name}-{n}", n + 1
    return unique


def parse_train_flags(argv, label):
    """train.py's configs for these flags; bad flags stop everything with one line naming `label`."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return train.parse_args(argv)
    except SystemExit as stop:
        if not stop.code:  # --help among a run's flags: train.py's help was printed
            raise
        message = captured.getvalue().strip().removeprefix("error: ")
        die(f"{label}: {message.replace('(see --help)', '(see python train.py --help)')}")


def parse_run(name, flags, common, out_dir, checkpoint_root):
    """The run's configs, writing under its own folders."""
    cfg, model_cfg, _ = parse_train_flags(shlex.split(common) + shlex.split(flags), f"run {name!r}")
    defaults = train.TrainConfig()
    if (cfg.checkpoint_dir, cfg.progress_dir, cfg.resume) != (defaults.checkpoint_dir, defaults.progress_dir,
                                                              defaults.resume):
        die(f"run {name!r}: the sweep sets --checkpoint-dir, --progress-dir and --resume itself; leave them out")
    cfg = dataclasses.replace(cfg, checkpoint_dir=str(Path(checkpoint_root) / name),
                              progress_dir=str(Path(out_dir) / name / "progress"))
    return cfg, model_cfg


def comparable(settings):
    # a JSON round trip, because a saved tuple default and a parsed list must compare equal
    return json.loads(json.dumps({k: v for k, v in settings.items() if k not in IGNORED_SETTINGS}))


def changed_settings(ckpt, cfg, model_cfg):
    """Names of the settings a saved run was trained with that differ from this run's."""
    changed = []
    for saved, config in ((ckpt["train_config"], cfg), (ckpt["model_config"], model_cfg)):
        there, here = comparable(saved), comparable(dataclasses.asdict(config))
        if here.get("dtype") == "auto":  # checkpoints hold the dtype that auto picked
            here["dtype"] = resolve_dtype("auto", pick_device(cfg.device), say=lambda line: None)
        changed += sorted(k for k in there.keys() | here.keys() if there.get(k) != here.get(k))
    return changed


def train_or_reuse(name, cfg, model_cfg, progress=True):
    """The run's history: reused when finished, resumed when interrupted, else trained afresh."""
    last = Path(cfg.checkpoint_dir) / "vqvae_last.pt"
    if last.is_file():
        ckpt = load_checkpoint(last, "vqvae")
        changed = changed_settings(ckpt, cfg, model_cfg)
        if changed:
            print(f"{name}: {last} was trained with other {', '.join(changed)}; training from scratch")
        elif len(ckpt["run"]["history"]) >= cfg.epochs:
            print(f"{name}: finished earlier, reusing {last}")
            return ckpt["run"]["history"]
        else:
            cfg = dataclasses.replace(cfg, resume=True)
    try:
        return train.train(cfg, model_cfg, progress=progress)
    except KeyboardInterrupt:
        print("the sweep stopped; run the same sweep command again to continue it", file=sys.stderr)
        raise


def train_seconds(history):
    """Training time over every stretch of a run; `seconds` restarts from 0 after a resume."""
    total, previous = 0.0, 0.0
    for record in history:
        total += record["seconds"] - previous if record["seconds"] >= previous else record["seconds"]
        previous = record["seconds"]
    return total


def kept_record(checkpoint):
    """The history record of the epoch whose weights vqvae_best.pt holds: train.py saves it right
    after that epoch, so its run state ends there."""
    run = load_checkpoint(checkpoint, "vqvae", made_by="python train.py")["run"]
    return next(record for record in run["history"] if record["epoch"] == run["epoch"])


def rank_runs(results):
    """Rows sorted by the validation SSIM of the weights each run kept (result["kept"], the record
    of the epoch vqvae_best.pt holds), best first; not by the best epoch of its history, which
    with --adversarial is not the one kept."""
    rows = []
    for result in results:
        kept = result["kept"]
        rows.append({"name": result["name"], "flags": result["flags"], "val_ssim": kept["val_ssim"],
                     "kept_epoch": kept["epoch"], "epochs": len(result["history"]),
                     "val_perplexity": kept["val_perplexity"], "val_codes_used": kept["val_codes_used"],
                     "train_seconds": train_seconds(result["history"]), "data": result["data"],
                     "checkpoint": result["checkpoint"]})
    rows.sort(key=lambda row: -row["val_ssim"])
    return [{"rank": i + 1, **row} for i, row in enumerate(rows)]


def predict_command(row):
    return (f"python predict.py --vqvae {shlex.quote(row['checkpoint'])} --data {shlex.quote(row['data'])} "
            f"--reconstruction-only")


def write_table(rows, out_dir, common=""):
    """results.md and results.json in out_dir; returns the markdown."""
    lines = [f"Common flags: `{common or '(none)'}`", "",
             "Ranked by the validation SSIM of the weights each run kept (vqvae_best.pt: the best epoch, "
             "or with --adversarial the last).", "",
             "| rank | run | flags | val SSIM | epoch kept/trained | val perplexity | codes used | train s |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        flags = f"`{row['flags']}`".replace("|", "\\|") if row["flags"] else "(defaults)"
        lines.append(f"| {row['rank']} | {row['name']} | {flags} | {row['val_ssim']:.4f} "
                     f"| {row['kept_epoch']}/{row['epochs']} | {row['val_perplexity']:.1f} | {row['val_codes_used']} "
                     f"| {row['train_seconds']:.0f} |")
    markdown = "\n".join(lines) + "\n"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "results.md", markdown)
    summary = {"common": common, "runs": rows, "winner": rows[0]["name"], "predict_command": predict_command(rows[0])}
    write_json(out_dir / "results.json", summary)
    return markdown


def sweep(runs, common="", out_dir="out/sweep", checkpoint_root="checkpoints/sweep", progress=True):
    """Train (or reuse) every flag set in `runs`, then rank and write the table; returns the rows."""
    parse_train_flags(shlex.split(common), "--common")
    names = []
    for flags in runs:
        names.append(run_name(flags, names))
    # every run is parsed before any trains, so a typo in the last one costs no training
    configs = [parse_run(name, flags, common, out_dir, checkpoint_root) for name, flags in zip(names, runs)]
    results = []
    for i, (name, flags, (cfg, model_cfg)) in enumerate(zip(names, runs, configs), 1):
        print(f"=== run {i}/{len(runs)}: {name} ({flags or 'defaults'}) ===")
        try:
            history = train_or_reuse(name, cfg, model_cfg, progress)
        except NonFiniteLoss as err:  # one diverging setting (a high --lr) must not sink the others
            print(f"{name}: {err}; left out of the ranking", file=sys.stderr)
            continue
        checkpoint = str(Path(cfg.checkpoint_dir) / "vqvae_best.pt")
        results.append({"name": name, "flags": flags, "history": history, "data": cfg.data,
                        "checkpoint": checkpoint, "kept": kept_record(checkpoint)})
    if not results:
        die("every run diverged; nothing to rank")
    rows = rank_runs(results)
    print("\n" + write_table(rows, out_dir, common))
    winner = rows[0]
    print(f"winner: {winner['name']} (val SSIM {winner['val_ssim']:.4f} of epoch {winner['kept_epoch']}, the "
          f"weights in {winner['checkpoint']}); score it on the test split once with:")
    print(f"    {predict_command(rows[0])}")
    return rows


def protect_flag_values(argv):
    """argparse takes a value such as "--no-ema" for an option of ours; a leading space keeps it a
    value (shlex drops the space again)."""
    protected, values_left = [], 0
    for token in argv:
        if token in OWN_FLAGS or token.split("=")[0] in OWN_FLAGS:
            values_left = {"--runs": len(argv), "--common": 1}.get(token, 0)
        elif values_left:
            token, values_left = (" " + token if token.startswith("-") else token), values_left - 1
        protected.append(token)
    return protected


def parse_args(argv=None):
    """The command line as (options, list of normalized flag sets)."""
    parser = OneLineErrorParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    parser.add_argument("--runs", nargs="+", default=[], metavar="FLAGS",
                        help='flag sets of train.py, each one quoted string; "" = its defaults')
    parser.add_argument("--file", help="a file with one flag set per line (# comments; '-' or 'default' = defaults)")
    parser.add_argument("--common", default="", metavar="FLAGS", help="flags put before every run's own flags")
    parser.add_argument("--out-dir", default="out/sweep", help="results.md, results.json and each run's progress")
    parser.add_argument("--checkpoint-root", default="checkpoints/sweep", help="one checkpoint folder per run")
    args = parser.parse_args(protect_flag_values(sys.argv[1:] if argv is None else argv))
    try:
        runs = [normalize_flags(flags) for flags in args.runs]
        args.common = normalize_flags(args.common)
        if args.file:
            runs += parse_run_lines(Path(args.file).read_text())
    except ValueError as err:
        parser.error(str(err))
    except OSError as err:
        parser.error(f"cannot read --file {args.file}: {err.strerror}")
    if not runs:
        parser.error("no runs; give flag sets with --runs or --file")
    return args, runs


def main(argv=None):
    args, runs = parse_args(argv)
    run_script(lambda: sweep(runs, args.common, args.out_dir, args.checkpoint_root))


if __name__ == "__main__":
    main()
