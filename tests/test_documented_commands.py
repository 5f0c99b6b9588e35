"""Every command line a script's docstring or the README shows runs to the end, as a user types it:
`python <project>/X.py ...` in a subprocess, in order, in one scratch working directory (so train.py's
checkpoints feed pixelcnn.py, predict.py and anomaly.py), on tiny data.

The lines are read at test time from the module docstrings of the project's scripts (every .py of
the project root, and the scripts in tests/ that are not test modules) and from the README's code
blocks, so a newly documented line is run without touching this file. A line is changed only by the
rules listed here: a line that cannot run here is skipped with its reason (SKIPPED); an [optional
part] is run included; a placeholder, and the data every command reads, is mapped to a tiny folder
(flag_values); and tiny flags are appended (tiny_flags_of), which win because argparse keeps a
flag's last value.
"""
import ast
import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PROJECT = Path(__file__).resolve().parents[1]
# a command's first word that makes a docstring line a command line (the README: any line of a shell block)
PROGRAMS = ("python", "python3", "torchrun")
SHELL_BLOCKS = ("bash", "sh", "shell", "console")
TIMEOUT_S = 120

# (pattern the command matches, why it is not run here); every documented command is run or matches one
SKIPPED = (
    (r"torchrun\b", "one process per GPU; tests/test_distributed.py runs train.py and pixelcnn.py under "
                    "torchrun with two CPU processes"),
    (r"python3? -m venv\b", "making a virtual environment: the suite already runs in one"),
    (r"(\.|source) \S*activate$", "entering a virtual environment: the suite already runs in one"),
    (r"pip3? install\b", "installing requirements.txt: the suite already runs with it installed"),
    (r"python3? -m pytest\b", "the test suite itself"),
    (r"python3? tests/fingerprint\.py\b", "a tool run by hand around a refactoring; a minute of "
                                          "training and predicting, what the rest of this module runs"),
    (r"python3? tests/hard_kills\.py\b", "minutes of killing and resuming the trainers; tests/test_faults.py "
                                         "runs a short version of it"),
)

# A script's commands run after those of the scripts before it here (scripts not named: last). Within
# a script, in the order documented, but those that run it on its defaults (once mapped) come after
# the others, then those that --resume them: so the next script reads what the defaults wrote, as
# after the README's `python train.py && python pixelcnn.py && python predict.py`.
STAGES = ("dataset.py", "train.py", "pixelcnn.py", "predict.py", "anomaly.py", "sweep.py")
# the scripts that read --data: a command that gives none (the demo set) gets the tiny data too
DATA_SCRIPTS = ("dataset.py", "train.py", "pixelcnn.py", "predict.py", "anomaly.py")
RUNS_FILE_TEXT = "# one flag set per line\n-\n--recon-loss mse\n"
PLACEHOLDER = re.compile(r"\.\.\.|.*path/to/.*|[A-Z][A-Z_]*(\.\w+)?")  # /path/to/oasis, DIR, OUT.json, ...


@dataclasses.dataclass(frozen=True)
class DocumentedCommand:
    where: str    # file:line of the documented line
    line: str     # the documented line as written
    command: str  # this command of it (a line may chain several with &&), without its comment


@dataclasses.dataclass(frozen=True)
class TinyData:
    oasis: Path   # the data of every command: a tiny folder in the OASIS layout
    images: Path  # a user's folder of gray PNG slices (anomaly.py --images)
    masks: Path   # their lesion masks, same names (--masks)
    runs: Path    # a sweep's runs file (sweep.py --file)


def tiny_flags_of(script, vqvae, prior):
    """-> (flags appended to every command of the script, {flag: flags appended to its commands
    that hold that flag}): conftest's TinyFlags models, one epoch, few samples and steps."""
    every = {"train.py": (*vqvae, "--epochs", "1"),
             "pixelcnn.py": (*prior, "--epochs", "1"),
             "predict.py": ("--n-samples", "2", "--sweep-frames", "2"),
             "anomaly.py": ("--n-heal", "2", "--val-slices", "4", "--max-slices", "4")}
    with_flag = {"train.py": {"--resume": ("--epochs", "2"),  # one epoch more than the run it continues
                              "--benchmark": ("--benchmark-steps", "2", "--benchmark-warmup", "1")},
                 "pixelcnn.py": {"--benchmark": ("--benchmark-steps", "2", "--benchmark-warmup", "1",
                                                 "--benchmark-samples", "1")},
                 "predict.py": {"--realism": ("--realism-samples", "8", "--realism-folds", "2",
                                              "--realism-epochs", "1", "--realism-nn-train", "4")}}
    return every.get(script, ()), with_flag.get(script, {})


# --------------------------------------------------------------------------- finding the lines


def docstring_sources():
    scripts = sorted(PROJECT.glob("*.py"))
    tools = sorted(p for p in (PROJECT / "tests").glob("*.py") if not p.name.startswith("test_")
                   and p.name != "conftest.py")
    return scripts + tools


def docstring_lines(path):
    """(line number, text) of each line of the module docstring that starts with a program."""
    tree = ast.parse(path.read_text())
    if not (tree.body and isinstance(tree.body[0], ast.Expr) and isinstance(tree.body[0].value, ast.Constant)
            and isinstance(tree.body[0].value.value, str)):
        return []
    first = tree.body[0].lineno
    return [(first + i, line.strip()) for i, line in enumerate(tree.body[0].value.value.splitlines())
            if line.split()[:1] and line.split()[0] in PROGRAMS]


def readme_lines(path):
    """(line number, text) of each line of the README's code blocks: every line of a shell block,
    and the lines of other blocks that start with a program."""
    found, fence = [], None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            fence = None if fence is not None else line.strip()[3:].strip()
        elif fence is not None and line.strip() and not line.strip().startswith("#"):
            if fence in SHELL_BLOCKS or line.split()[0] in PROGRAMS:
                found.append((number, line.strip()))
    return found


def documented_commands():
    """Every command of every documented line, in the order the files and lines come."""
    sources = [(path, docstring_lines(path)) for path in docstring_sources()]
    sources.append((PROJECT / "README.md", readme_lines(PROJECT / "README.md")))
    commands = []
    for path, lines in sources:
        for number, line in lines:
            for part in line.split("&&"):
                command = shlex.join(shlex.split(part, comments=True))  # without its # comment
                if command:
                    commands.append(DocumentedCommand(f"{path.relative_to(PROJECT)}:{number}", line, command))
    return commands


def skip_reason(command):
    return next((reason for pattern, reason in SKIPPED if re.match(pattern, command)), None)


def script_of(command):
    words = shlex.split(command)
    return words[1] if len(words) > 1 and words[0] in ("python", "python3") else None


def run_order(command, argv, data, script_flags):
    """Sort key of a command that runs (see STAGES)."""
    script = script_of(command)
    name = Path(script).name
    defaults = argv == tiny_argv(f"python {script}", data, script_flags)
    group = 2 if "--resume" in argv else 1 if defaults else 0
    return STAGES.index(name) if name in STAGES else len(STAGES), group


# --------------------------------------------------------------------------- the tiny command


def flag_values(data, script_flags):
    """The flags whose documented value is mapped, and how: documented value -> value run."""
    return {
        # whatever it names (demo, a placeholder, a real OASIS folder such as ../shared/oasis)
        "--data": lambda value: str(data.oasis),
        "--images": lambda value: str(data.images),
        "--masks": lambda value: str(data.masks),
        "--vqvae": lambda value: "checkpoints/vqvae_best.pt" if value == "..." else value,
        "--prior": lambda value: "checkpoints/pixelcnn_best.pt" if value == "..." else value,
        "--file": lambda value: str(data.runs),
        # sweep.py: the flags every run passes to train.py, made tiny as a train.py command is
        "--common": lambda value: shlex.join(tiny_args("train.py", shlex.split(value), data, script_flags)),
    }


def tiny_args(script, words, data, script_flags):
    """The documented arguments of a script: [optional parts] included, placeholders mapped, the
    tiny data given where no --data is, tiny flags appended."""
    words = [word.removeprefix("[").removesuffix("]") for word in words]
    words = [word for word in words if word]
    mapping = flag_values(data, script_flags)
    args, i = [], 0
    while i < len(words):
        flag, equals, value = words[i].partition("=")
        if flag in mapping and equals:
            args.append(f"{flag}={mapping[flag](value)}")
        elif flag in mapping and i + 1 < len(words):
            args += [flag, mapping[flag](words[i + 1])]
            i += 1
        else:
            args.append(words[i])
        i += 1
    given = {word.partition("=")[0] for word in args}
    if Path(script).name in DATA_SCRIPTS and "--data" not in given:
        args += ["--data", str(data.oasis)]
    every, with_flag = script_flags(Path(script).name)
    args += list(every)
    for flag, extra in with_flag.items():
        if flag in given:
            args += list(extra)
    return args


def tiny_argv(command, data, script_flags):
    words = shlex.split(command)
    script = script_of(command)
    if script is None:
        raise AssertionError(f"`{command}` is neither run nor skipped: add a rule to SKIPPED with its reason")
    args = tiny_args(script, words[2:], data, script_flags)
    left = [word for word in args if PLACEHOLDER.fullmatch(word)]
    if left:
        raise AssertionError(f"`{command}`: no rule maps the placeholder {left[0]!r}; add one to flag_values")
    return [sys.executable, str(PROJECT / script), *args]


# --------------------------------------------------------------------------- running them


@dataclasses.dataclass
class Ran:
    argv: list
    returncode: int
    stderr: str
    seconds: float


def last_lines(text, n=15):
    """The last n lines as a terminal shows them (a progress bar's \\r redraws keep their last state)."""
    lines = [line.rsplit("\r", 1)[-1][:300] for line in text.split("\n")]
    return "\n".join([line for line in lines if line.strip()][-n:])


def run(argv, cwd):
    started = time.perf_counter()
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)
        returncode, stderr = done.returncode, done.stderr
    except subprocess.TimeoutExpired as timeout:
        err = timeout.stderr.decode(errors="replace") if isinstance(timeout.stderr, bytes) else timeout.stderr or ""
        returncode, stderr = -1, f"{err}\n(killed after {TIMEOUT_S} s)"
    return Ran(argv, returncode, stderr, time.perf_counter() - started)


def write_oasis(demo, oasis):
    """The tiny demo set's slices in the OASIS layout alone (no demo marker); each train subject
    twice, under a second case id, as predict.py --realism needs 4 train subjects for its 2 folds."""
    for split in sorted(demo.glob("keras_png_slices_*")):
        shutil.copytree(split, oasis / split.name)
        if split.name.endswith("_train"):
            for path in sorted(split.glob("case_*")):
                shutil.copy(path, oasis / split.name / path.name.replace("case_", "case_9", 1))


def write_own_slices(oasis, folder):
    """A user's folder of gray PNG slices under names that are not OASIS names, and their masks:
    a bright square lesion in the first, none in the others."""
    images, masks = folder / "my_slices", folder / "my_masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for i, path in enumerate(sorted((oasis / "keras_png_slices_test").glob("*.png"))[:3]):
        pixels = np.array(Image.open(path).convert("L"))
        mask = np.zeros_like(pixels)
        if i == 0:
            mask[112:144, 112:144] = 255
            pixels[mask > 0] = 255
        Image.fromarray(pixels).save(images / f"scan_{i}.png")
        Image.fromarray(mask).save(masks / f"scan_{i}.png")
    return images, masks


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, tiny_demo):
    folder = tmp_path_factory.mktemp("documented_data")
    oasis = folder / "oasis"
    write_oasis(tiny_demo, oasis)
    images, masks = write_own_slices(oasis, folder)
    runs = folder / "runs.txt"
    runs.write_text(RUNS_FILE_TEXT)
    return TinyData(oasis=oasis, images=images, masks=masks, runs=runs)


@pytest.fixture(scope="module")
def script_flags(tiny_flags):
    return lambda script: tiny_flags_of(script, tiny_flags.vqvae, tiny_flags.prior)


@pytest.fixture(scope="module")
def ran(tmp_path_factory, tiny_data, script_flags):
    """{command: Ran} of every documented command not skipped, run in the order of STAGES in one
    working directory; a command documented twice (or the same once mapped) runs once."""
    work = tmp_path_factory.mktemp("documented_work")
    to_run = [(c, tiny_argv(c.command, tiny_data, script_flags)) for c in documented_commands()
              if skip_reason(c.command) is None]
    to_run.sort(key=lambda pair: run_order(pair[0].command, pair[1], tiny_data, script_flags))
    results, by_argv = {}, {}
    for command, argv in to_run:
        key = tuple(argv)
        if key not in by_argv:
            by_argv[key] = run(argv, work)
        results[command] = by_argv[key]
    return results


COMMANDS = documented_commands()
TO_RUN = [command for command in COMMANDS if skip_reason(command.command) is None]


def test_the_docstrings_and_the_readme_show_the_pipeline_scripts_commands():
    scripts = {Path(script_of(c.command)).name for c in TO_RUN}
    assert {"train.py", "pixelcnn.py", "predict.py", "anomaly.py"} <= scripts
    assert any(c.where.startswith("README.md") for c in TO_RUN)


def test_every_documented_command_is_run_or_skipped_by_a_listed_rule(tmp_path):
    # run: a script of the project with every placeholder mapped; each is run by the test below
    data = TinyData(oasis=tmp_path, images=tmp_path, masks=tmp_path, runs=tmp_path)
    for command in TO_RUN:  # raises, naming the command, when no rule covers it
        argv = tiny_argv(command.command, data, lambda script: tiny_flags_of(script, (), ()))
        assert Path(argv[1]).is_file(), f"{command.where}: `{command.line}` names no script of the project"


@pytest.mark.parametrize("command", TO_RUN, ids=lambda c: f"{c.where} {c.command}")
def test_documented_command_ends_without_a_traceback(ran, command):
    result = ran[command]
    if result.returncode != 0 or "Traceback (most recent call last)" in result.stderr:
        pytest.fail(f"{command.where}: `{command.line}` failed (exit code {result.returncode} after "
                    f"{result.seconds:.0f} s)\nran: {shlex.join(result.argv)}\n"
                    f"last lines of its stderr:\n{last_lines(result.stderr)}", pytrace=False)
