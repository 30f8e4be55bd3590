"""docs/tutorial.md kept true: its commands run, in order, on a tiny folder-format dataset.

The tutorial's code blocks are read in order and each becomes a step, run in one folder that holds
the tiny dataset under the paths the tutorial uses (``my_data/``, ``colour_masks/``,
``new_photos/``; :func:`write_tutorial_data`):

- a ```yaml block whose first line is ``# PATH`` is written to PATH (the recipes, classes.yaml);
- a ```python block is executed;
- a ```bash block is read line by line (``\\`` continuations joined, a trailing ``# comment``
  dropped): ``denseseg ...`` runs in this process (``denseseg.cli.main``) and must exit 0;
  ``export NAME=VALUE`` sets the variable for the steps after it (``$PWD`` is the folder);
  ``pip install ...`` is not run: the extra is checked by import, and the steps that need a
  missing extra are skipped with the reason; any other command fails the test;
- ```text blocks and unlabelled ones (shown output, the folder layout) are not run.

What is changed to make the commands run at tiny scale, and nothing else:

- :data:`SHRINK`: overrides inserted right after the recipe on every ``denseseg train`` line, so
  the tutorial's own overrides (later on the line) still apply: 4 steps of a one-level U-Net
  on 32x32 crops.
- :data:`SUBSTITUTIONS`: exact text replaced in a command (the resumed run's length).
- :data:`NOT_RUN`: commands that would not return (``denseseg serve``) are parsed, not run.

:data:`EXPECTED_FILES` and :data:`EXPECTED_OUTPUT` hold what the tutorial says a command
writes or prints, keyed by the command as the tutorial spells it. ``test_every_command_parses``
(fast, a few seconds) parses every command, loads every recipe with its overrides, refuses an
override swallowed by ``--resume`` and a key of those tables that no longer names a command of
the tutorial, so a reworded command cannot silently lose its checks. The run itself
(``test_tutorial_step``, one test per step, each running the steps before it first when needed,
and ``test_tutorial_results``) takes about 25 s on one thread, half of it the ONNX export, so it
is marked slow.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_folder_dataset
from denseseg.cli import build_parser, main

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "tutorial.md"

SHRINK = [
    "train.max_steps=4",
    "train.eval_every=2",
    "train.ckpt_every=2",
    "train.log_every=1",
    "data.crop_size=[32,32]",
    "data.batch_size=2",
    "model.kwargs.base_channels=4",
    "model.kwargs.depth=1",  # the fewer levels, the quicker the ONNX export (12 s, not 30)
    "train.tensorboard=false",
    "train.progress=false",
]
SUBSTITUTIONS = {"train.max_steps=6000": "train.max_steps=6"}
NOT_RUN = {"serve": "serves until stopped"}
# Which extra a command needs (modules that must import), and how to tell.
EXTRAS = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "serve": ("fastapi", "uvicorn")}

RUN = "runs/my_model"
EXPECTED_FILES = {
    "denseseg check-data --dataset folder --root my_data --split train --split val --split test": [
        "runs/check_data/class_pixels.png"
    ],
    "denseseg browse --dataset folder --root my_data --n 16 --out runs/browse/train.png": [
        "runs/browse/train.png"
    ],
    "denseseg browse my_recipe.yaml --augment --out runs/browse/augmented.png": [
        "runs/browse/augmented.png"
    ],
    "denseseg train my_recipe.yaml": [
        f"{RUN}/{name}" for name in ("config.yaml", "log.csv", "curves.png", "best.pt", "last.pt")
    ],
    "denseseg train my_recipe.yaml optim.lr=0.0003 train.out_dir=runs/my_model_lr3e-4": [
        "runs/my_model_lr3e-4/log.csv"
    ],
    "denseseg eval --model runs/my_model/best.pt --root my_data --split val "
    "--out runs/my_model/eval_val": [
        f"{RUN}/eval_val/{name}"
        for name in ("metrics.json", "per_class.csv", "confusion_matrix.png", "per_class_iou.png")
    ],
    "denseseg eval --model runs/my_model/best.pt --root my_data --split test "
    "--out runs/my_model/eval_test --json runs/my_model/test_metrics.json": [
        f"{RUN}/eval_test/metrics.json",
        f"{RUN}/test_metrics.json",
    ],
    "denseseg predict new_photos/ --model runs/my_model/best.pt --out runs/my_model/predictions": [
        f"{RUN}/predictions/{name}"
        for name in ("field_101.png", "field_101_overlay.png", "field_102.png")
    ],
    'denseseg pack runs/my_model/best.pt my_model --note "U-Net, my_data, 4000 steps"': [
        "my_models/my_model.safetensors",
        "my_models/my_model.json",
    ],
    "denseseg predict new_photos/ --model my_model --out runs/my_model/predictions_packed": [
        f"{RUN}/predictions_packed/field_101_overlay.png"
    ],
    "denseseg export runs/my_model/best.pt --format onnx --out my_model.onnx": ["my_model.onnx"],
    "denseseg predict new_photos/ --model my_model.onnx --out runs/my_model/predictions_onnx": [
        f"{RUN}/predictions_onnx/field_102.png"
    ],
}
EXPECTED_OUTPUT = {
    "denseseg check-data --dataset folder --root my_data --split train --split val --split test": (
        "no problems found"
    ),
    "denseseg train my_recipe.yaml": "trained 4 steps; val mIoU",
    "denseseg train my_recipe.yaml train.max_steps=6000 --resume": "trained 6 steps",
    "denseseg train my_recipe_long.yaml --print-config": "max_steps: 4",
    "denseseg models": "my_model",
}


# ---------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Step:
    kind: str  # "denseseg", "export", "pip", "file", "python"
    text: str  # the command line as the tutorial spells it, or the block's content
    line: int  # where it starts in the tutorial
    path: str | None = None  # "file": where the block goes

    @property
    def label(self) -> str:
        return f"L{self.line}-" + (self.path or " ".join(self.text.split()[:2]))


def _blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, content, line of the first content line) of each fenced code block."""
    found, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if m:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            found.append((m.group(1), "\n".join(lines[i + 1 : end]), i + 2))
            i = end
        i += 1
    return found


def _bash_lines(block: str, first: int) -> list[tuple[str, int]]:
    """The block's command lines, as spelled (``\\`` continuations joined, a trailing
    ``# comment`` dropped), and the tutorial line each starts on."""
    out, pending, start = [], "", first
    for n, raw in enumerate(block.splitlines(), first):
        start = start if pending else n
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        text = re.sub(r"\s+#[^'\"]*$", "", pending + raw).strip()
        pending = ""
        if text and not text.startswith("#"):
            out.append((" ".join(text.split()), start))
    return out


def read_steps(path: Path = TUTORIAL) -> list[Step]:
    steps = []
    for lang, body, line in _blocks(path.read_text(encoding="utf-8")):
        if lang == "yaml":
            first = body.splitlines()[0]
            m = re.match(r"^# (\S+\.ya?ml)$", first)
            assert m, f"tutorial line {line}: a yaml block starts with '# PATH' (where it goes)"
            steps.append(Step("file", body, line, m.group(1)))
        elif lang == "python":
            steps.append(Step("python", body, line))
        elif lang == "bash":
            for text, n in _bash_lines(body, line):
                kind = text.split()[0]
                assert kind in ("denseseg", "export", "pip"), (
                    f"tutorial line {n}: {text!r} is not a denseseg command; the test runs only "
                    "denseseg, export NAME=VALUE and pip install lines"
                )
                steps.append(Step(kind, text, n))
    return steps


STEPS = read_steps()


def adapt(command: str) -> list[str]:
    """The argument list that runs for a tutorial command line (SUBSTITUTIONS, then SHRINK)."""
    for old, new in SUBSTITUTIONS.items():
        command = command.replace(old, new)
    argv = shlex.split(command)[1:]
    if argv[0] == "train":
        argv[2:2] = SHRINK
    return argv


def extra_needed(argv: list[str]) -> str | None:
    """The extra a command line needs (a key of EXTRAS), if any."""
    if argv[0] == "serve":
        return "serve"
    args = build_parser().parse_args(argv)
    onnx_export = argv[0] == "export" and args.format == "onnx"
    onnx_run = str(getattr(args, "model", "")).endswith(".onnx")
    uses_runtime = getattr(args, "backend", None) in ("onnxruntime", "openvino")
    return "onnx" if onnx_export or onnx_run or uses_runtime else None


def missing_modules(extra: str) -> list[str]:
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


# ---------------------------------------------------------------------------- the data
# The class colours of the tutorial's classes.yaml and of its colour-mask conversion.
COLOURS = [(0, 0, 0), (0, 160, 0), (220, 40, 40)]


def write_tutorial_data(folder: Path) -> None:
    """my_data/ (train, val and test list files; val images of three sizes), colour_masks/ (the
    same masks in the class colours, which the tutorial converts back into my_data/masks) and
    new_photos/ (one PNG, one JPEG): the tutorial's paths. classes.yaml comes from the tutorial."""
    data = write_folder_dataset(folder / "my_data", val_sizes=[(32, 40), (28, 36), (36, 30)])
    extra = write_folder_dataset(folder / "extra", n_train=4, n_val=0, seed=1)
    stems = []
    for i, stem in enumerate(("train_000", "train_001")):
        for sub in ("images", "masks"):
            shutil.move(extra / sub / f"{stem}.png", data / sub / f"test_{i:03d}.png")
        stems.append(f"test_{i:03d}")
    (data / "test.txt").write_text("\n".join(stems) + "\n")
    photos = folder / "new_photos"
    photos.mkdir()
    shutil.move(extra / "images" / "train_002.png", photos / "field_101.png")
    Image.open(extra / "images" / "train_003.png").save(photos / "field_102.jpg", quality=90)
    shutil.rmtree(extra)
    (folder / "colour_masks").mkdir()
    for path in sorted((data / "masks").glob("*.png")):
        rgb = np.asarray(COLOURS, np.uint8)[np.asarray(Image.open(path))]
        Image.fromarray(rgb, "RGB").save(folder / "colour_masks" / path.name)


# ---------------------------------------------------------------------------- running
class Tutorial:
    """The tutorial's folder and the steps run so far (in order, each at most once)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.env, self.done = folder, {}, 0
        self.outputs: dict[int, str] = {}
        self.broken: str | None = None

    def run_until(self, index: int, skip: bool = True) -> None:
        """Run the steps up to ``index``; a skipped step (a missing extra, a command parsed
        only) skips the test only when it is step ``index`` itself and ``skip`` is true."""
        while self.done <= index:
            if self.broken:
                pytest.fail(f"an earlier step failed: {self.broken}")
            i, step = self.done, STEPS[self.done]
            self.done += 1
            try:
                self.outputs[i] = self._run(step)
            except pytest.skip.Exception:
                if i == index and skip:
                    raise
            except BaseException as exc:
                self.broken = f"{step.label}: {exc}".splitlines()[0]
                raise

    def _run(self, step: Step) -> str:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(self.folder)
            for name, value in self.env.items():
                mp.setenv(name, value)
            if step.kind == "file":
                Path(step.path).write_text(step.text + "\n", encoding="utf-8")
                return ""
            if step.kind == "python":
                code = compile(step.text, f"{TUTORIAL}:{step.line}", "exec")
                exec(code, {"__name__": "tutorial"})
                return ""
            if step.kind == "pip":
                return ""  # the extra is checked where a command needs it
            if step.kind == "export":
                self._export(step.text)
                return ""
            return self._denseseg(step)

    def _export(self, text: str) -> None:
        name, value = shlex.split(text)[1].split("=", 1)
        value = value.replace("$PWD", str(self.folder))
        assert "$" not in value, f"{text!r}: only $PWD is expanded"
        self.env[name] = value

    def _denseseg(self, step: Step) -> str:
        argv = adapt(step.text)
        extra = extra_needed(argv)
        if extra and missing_modules(extra):
            pytest.skip(f"needs denseseg[{extra}]: {', '.join(missing_modules(extra))} missing")
        if argv[0] in NOT_RUN:
            build_parser().parse_args(argv)
            pytest.skip(f"parsed, not run: {NOT_RUN[argv[0]]}")
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        assert code == 0, (
            f"tutorial line {step.line}: {step.text}\n(ran: denseseg {shlex.join(argv)})\n"
            f"exit status {code}\n{err.getvalue()[-2000:]}"
        )
        for name in EXPECTED_FILES.get(step.text, []):
            path = self.folder / name
            assert path.is_file() and path.stat().st_size > 0, f"{step.text}: {name} not written"
        expected = EXPECTED_OUTPUT.get(step.text)
        assert expected is None or expected in out.getvalue(), (
            f"{step.text}: {expected!r} not in its output:\n{out.getvalue()[-2000:]}"
        )
        return out.getvalue()


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory: pytest.TempPathFactory) -> Tutorial:
    folder = tmp_path_factory.mktemp("tutorial")
    write_tutorial_data(folder)
    return Tutorial(folder)


# ---------------------------------------------------------------------------- the tests
def test_every_command_parses(tmp_path: Path, monkeypatch) -> None:
    """Fast: every denseseg line parses, every recipe line's recipe and overrides load, and the
    checks above name commands the tutorial still has."""
    from denseseg.config import load_config

    monkeypatch.chdir(tmp_path)
    for step in STEPS:
        if step.kind == "file":
            Path(step.path).parent.mkdir(parents=True, exist_ok=True)
            Path(step.path).write_text(step.text + "\n", encoding="utf-8")
    commands = [s.text for s in STEPS if s.kind == "denseseg"]
    for command in commands:
        args = build_parser().parse_args(shlex.split(command)[1:])
        if args.func.__name__ == "cmd_train":
            assert args.resume in (None, ""), f"{command}: --resume took {args.resume!r}"
            load_config(args.config, args.overrides)
    for name, table in (("EXPECTED_FILES", EXPECTED_FILES), ("EXPECTED_OUTPUT", EXPECTED_OUTPUT)):
        stale = sorted(set(table) - set(commands))
        assert not stale, f"{name} names commands the tutorial lacks: {stale}"
    for old in SUBSTITUTIONS:
        assert any(old in c for c in commands), f"SUBSTITUTIONS: {old!r} is in no command"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(STEPS)), ids=[s.label for s in STEPS])
def test_tutorial_step(tutorial: Tutorial, index: int) -> None:
    tutorial.run_until(index)


@pytest.mark.slow
def test_tutorial_results(tutorial: Tutorial) -> None:
    """What the tutorial says of the results: the colour masks convert back to the class
    indices, the resumed run continues the first (steps 1-4 once, then 5-6), label maps hold
    class indices in the palette of classes.yaml, the ONNX file labels as the checkpoint does,
    the test split's report is per class, the curves are drawn."""
    tutorial.run_until(len(STEPS) - 1, skip=False)
    folder, run = tutorial.folder, tutorial.folder / RUN
    for path in sorted((folder / "colour_masks").glob("*.png")):
        mask = Image.open(folder / "my_data" / "masks" / path.name)
        assert mask.mode == "L", f"{path.name}: still the palette mask the test wrote"
        converted = np.asarray(COLOURS, np.uint8)[np.asarray(mask)]
        assert np.array_equal(converted, np.asarray(Image.open(path))), path.name
    with (run / "log.csv").open() as fh:
        logged = [int(row["step"]) for row in csv.DictReader(fh) if row["loss"]]
    assert logged == [1, 2, 3, 4, 5, 6]
    label_map = Image.open(run / "predictions" / "field_102.png")
    labels = np.asarray(label_map)
    assert label_map.mode == "P" and labels.shape == (32, 40) and labels.max() <= 2
    assert label_map.getpalette()[:9] == [c for colour in COLOURS for c in colour]
    if (folder / "my_model.onnx").is_file():
        onnx_labels = np.asarray(Image.open(run / "predictions_onnx" / "field_102.png"))
        assert (onnx_labels == labels).mean() > 0.99
    assert "crop" in (run / "eval_test" / "per_class.csv").read_text()
    assert (folder / "runs" / "curves.png").is_file()
