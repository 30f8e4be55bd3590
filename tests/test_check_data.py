"""``check-data`` (counts, class pixel histogram, one line per bad file, exit status) and
``browse`` (grid of samples with masks overlaid, before and after augmentation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_folder_dataset
from denseseg.cli import main
from denseseg.data.browse import instance_label_map, to_display
from denseseg.data.check import check_dataset, format_report
from denseseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms
from denseseg.errors import DataError


def _mask_counts(root: Path, stems: list[str], n: int) -> np.ndarray:
    counts = np.zeros(n, dtype=np.int64)
    for stem in stems:
        mask = np.asarray(Image.open(root / "masks" / f"{stem}.png"))
        counts += np.bincount(mask.ravel(), minlength=256)[:n]
    return counts


def _stems(root: Path, split: str) -> list[str]:
    return (root / f"{split}.txt").read_text().split()


def test_clean_folder_dataset(tmp_path, capsys):
    root = write_folder_dataset(tmp_path / "data", n_train=5, n_val=3)
    report = check_dataset("folder", root, progress=False)
    assert report.ok and [s.split for s in report.splits] == ["train", "val"]
    assert [s.images for s in report.splits] == [5, 3]
    for s in report.splits:
        want = _mask_counts(root, _stems(root, s.split), 3)
        assert np.array_equal(s.pixel_counts, want) and s.ignored_pixels == 0
    text = format_report(report)
    assert "train: 5 images, 0 with problems" in text and "bright" in text
    plot = tmp_path / "hist.png"
    code = main(["check-data", "--dataset", "folder", "--root", str(root), "--plot", str(plot),
                 "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "no problems found" in out
    assert Image.open(plot).size[0] > 300


def _broken_dataset(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    root = write_folder_dataset(tmp_path / "broken", n_train=6, n_val=2)
    (root / "images" / "train_001.png").write_bytes(b"not a png at all")
    small = Image.open(root / "masks" / "train_002.png").resize((20, 16))
    small.save(root / "masks" / "train_002.png")
    bad = np.asarray(Image.open(root / "masks" / "train_003.png")).copy()
    bad[0, 0] = 7  # classes.yaml declares three classes
    Image.fromarray(bad, "L").save(root / "masks" / "train_003.png")
    return root, {
        "train_001.png": "Pillow can read",
        "train_002.png": "masks must match their image",
        "train_003.png": "holds labels 7",
    }


def test_problems_are_named_one_line_each(tmp_path, capsys):
    root, expected = _broken_dataset(tmp_path)
    report = check_dataset("folder", root, ["train", "val"], progress=False)
    assert not report.ok
    assert len(report.problems) == 3
    for name, reason in expected.items():
        lines = [p for p in report.problems if name in p]
        assert len(lines) == 1 and reason in lines[0] and lines[0].startswith("train: ")
    # The three faulty items are left out of the histogram, the three good ones counted.
    good = ["train_000", "train_004", "train_005"]
    assert np.array_equal(report.splits[0].pixel_counts, _mask_counts(root, good, 3))
    code = main(["check-data", "--dataset", "folder", "--root", str(root), "--split", "train",
                 "--plot", str(tmp_path / "h.png"), "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1 and "3 problem(s):" in out
    problem_lines = out.split("3 problem(s):\n", 1)[1].strip().splitlines()
    assert len(problem_lines) == 3
    assert all(any(name in line for line in problem_lines) for name in expected)


def _write_camvid(root: Path) -> dict[str, np.ndarray]:
    """A tiny CamVid (SegNet layout): RGB PNGs, mode-L masks 0-10, 11 = void."""
    rng = np.random.default_rng(0)
    written = {}
    for split, n in (("train", 3), ("val", 2)):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(n):
            image = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            mask = rng.integers(0, 12, (12, 16), dtype=np.uint8)
            Image.fromarray(image, "RGB").save(root / split / f"f{i}.png")
            Image.fromarray(mask, "L").save(root / f"{split}annot" / f"f{i}.png")
            written[f"{split}/f{i}"] = mask
    return written


def test_camvid_layout_counts_void_as_ignored(tmp_path, capsys):
    root = tmp_path / "camvid"
    masks = _write_camvid(root)
    report = check_dataset("camvid", root, progress=False)
    assert report.ok and len(report.classes) == 11
    train = report.splits[0]
    stacked = np.stack([masks[f"train/f{i}"] for i in range(3)])
    assert np.array_equal(train.pixel_counts, np.bincount(stacked.ravel(), minlength=12)[:11])
    assert train.ignored_pixels == int((stacked == 11).sum())
    # A stored value the format does not define is a problem naming the mask.
    bad = masks["val/f1"].copy()
    bad[3, 3] = 40
    Image.fromarray(bad, "L").save(root / "valannot" / "f1.png")
    code = main(["check-data", "--dataset", "camvid", "--root", str(root), "--plot",
                 str(tmp_path / "c.png"), "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1 and "valannot/f1.png" in out and "40" in out


def test_splits_from_recipe_and_missing_defaults(tmp_path, capsys):
    root = write_folder_dataset(tmp_path / "data", n_train=2, n_val=2)
    (root / "val.txt").unlink()
    # Default splits: a missing 'val' is a note, not a problem.
    report = check_dataset("folder", root, progress=False)
    assert report.ok and [s.split for s in report.splits] == ["train"]
    assert report.notes and "val" in report.notes[0]
    # Asked for by the recipe, a missing split is a problem.
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  dataset: folder\n  root: {root}\n  val_split: val\n")
    code = main(["check-data", str(recipe), "--plot", str(tmp_path / "p.png"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1 and "val: dataset" in out and "no split 'val'" in out
    with pytest.raises(DataError, match="no split"):
        check_dataset("folder", root, ["nope"], progress=False)
    assert main(["check-data", "--dataset", "folder", "--root", str(tmp_path / "missing")]) == 2


def test_to_display_inverts_normalisation():
    image = torch.randint(0, 256, (3, 5, 6), dtype=torch.uint8)
    normalised, _ = build_transforms(False)(image, torch.zeros(5, 6, dtype=torch.int64))
    assert torch.equal(to_display(normalised, IMAGENET_MEAN, IMAGENET_STD), image)
    assert to_display(image) is image
    with pytest.raises(ValueError):
        to_display(normalised)


def test_instance_label_map_paints_later_over_earlier():
    masks = torch.zeros(2, 4, 4, dtype=torch.uint8)
    masks[0, :2] = 1
    masks[1, 1:3] = 1
    out = instance_label_map({"masks": masks, "labels": torch.tensor([3, 5])})
    assert out[0].tolist() == [3] * 4 and out[1].tolist() == [5] * 4
    assert out[2].tolist() == [5] * 4 and out[3].tolist() == [255] * 4


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_browse_grid(tmp_path, capsys):
    root = write_folder_dataset(tmp_path / "data", n_train=5, n_val=2)
    recipe = tmp_path / "aug.yaml"
    recipe.write_text(
        f"data:\n  dataset: folder\n  root: {root}\n  crop_size: [40, 40]\n"
        "  scale_range: [0.5, 1.5]\n  photometric: true\n  elastic: {sigma: 4}\n"
    )
    plain, a, b, c = (tmp_path / f"{k}.png" for k in ("plain", "a", "b", "c"))
    assert main(["browse", "--dataset", "folder", "--root", str(root), "--n", "4",
                 "--out", str(plain)]) == 0  # fmt: skip
    assert "4 samples of folder train" in capsys.readouterr().out
    for out, seed in ((a, 0), (b, 0), (c, 1)):
        args = ["browse", str(recipe), "--augment", "--n", "4", "--seed", str(seed)]
        assert main([*args, "--out", str(out)]) == 0
    assert np.array_equal(_pixels(a), _pixels(b))  # the seed fixes choice and augmentation
    assert not np.array_equal(_pixels(a), _pixels(c))
    assert not np.array_equal(_pixels(a), _pixels(plain))
    assert main(["browse", "--root", str(root)]) == 2  # neither a recipe nor --dataset
