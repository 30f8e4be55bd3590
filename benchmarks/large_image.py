"""Peak memory and time of segmenting a huge RGB image with the built-in CamVid model in slide mode
(windows of 360x480), each case in a fresh process.

    PYTHONPATH=src python benchmarks/large_image.py                 # 20000 x 20000
    PYTHONPATH=src python benchmarks/large_image.py --size 4000 --cases memory

Cases:

* ``memory``: ``Segmenter.predict_large`` on a synthetic image held in memory (uint8, as read).
* ``file``: ``denseseg predict``'s path (``predict_folder``) from a PNG of the image to the label
  map and overlay PNGs; the PNG is written first by another process (``--out``, default a
  temporary folder; 20000 x 20000 takes about 1.2 GB of disk). The reader's pixel limit is raised
  for the run through ``DENSESEG_MAX_PIXELS``, as a user would.

For each: the process's peak resident memory over its life (``VmHWM``: imports included), its
resident memory before the run, and the budget of issue 14, 1.5 GB plus the image and the label
map as uint8. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GB = 1e9


def _status(key: str) -> int:
    """A ``/proc/self/status`` value in bytes (Linux)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key + ":"))


def synthetic_rows(size: int, top: int, rows: int) -> np.ndarray:
    """Rows ``top .. top + rows - 1`` of the synthetic ``size x size`` RGB image: coloured blocks
    with gradients and noise (never the whole image at once)."""
    y = np.arange(top, top + rows, dtype=np.int32)[:, None]
    x = np.arange(size, dtype=np.int32)[None, :]
    block = (y // 97 * 7 + x // 131 * 3) % 11
    noise = np.random.default_rng(top).integers(0, 24, (rows, size), dtype=np.int32)
    out = np.empty((rows, size, 3), dtype=np.uint8)
    out[..., 0] = (block * 23 + noise) % 256
    out[..., 1] = (block * 41 + x // 64 + noise) % 256
    out[..., 2] = (block * 59 + y // 64 + noise) % 256
    return out


def _segmenter(args: argparse.Namespace):
    import torch

    from denseseg import load_model

    torch.set_num_threads(args.threads)
    seg = load_model(
        "camvid", device="cpu", mode="slide", crop_size=args.crop, stride=args.stride or None
    )
    seg.predict_large(torch.zeros(3, 400, 1000, dtype=torch.uint8))  # warm-up
    return seg


def child_memory(args: argparse.Namespace) -> dict:
    seg = _segmenter(args)
    n = args.size
    image = np.empty((n, n, 3), dtype=np.uint8)
    for top in range(0, n, 512):
        image[top : top + 512] = synthetic_rows(n, top, min(512, n - top))
    before, start = _status("VmRSS"), time.perf_counter()
    labels = seg.predict_large(image)
    seconds = time.perf_counter() - start
    assert labels.shape == (n, n)
    return {"before": before, "peak": _status("VmHWM"), "seconds": seconds}


def child_write(args: argparse.Namespace) -> dict:
    from denseseg.engine.large_image import write_png_rows

    n, folder = args.size, Path(args.out) / "in"
    rows = (synthetic_rows(n, top, min(512, n - top)) for top in range(0, n, 512))
    write_png_rows(folder / f"synthetic{n}.png", (n, n), rows, level=1)
    return {}


def child_file(args: argparse.Namespace) -> dict:
    from denseseg.engine.predict import predict_folder

    seg = _segmenter(args)
    out = Path(args.out)
    before, start = _status("VmRSS"), time.perf_counter()
    predict_folder(seg, out / "in", out / "out", overwrite=True)
    return {"before": before, "peak": _status("VmHWM"), "seconds": time.perf_counter() - start}


def _child(case: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", case, "--size", str(args.size), "--out", args.out]
    cmd += ["--threads", str(args.threads), "--crop", *map(str, args.crop)]
    if args.stride:
        cmd += ["--stride", *map(str, args.stride)]
    env = {**os.environ, "DENSESEG_MAX_PIXELS": str(max(args.size**2, 1))}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"{case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=20000, help="image side (square)")
    parser.add_argument("--cases", nargs="+", default=["memory", "file"])
    parser.add_argument("--crop", type=int, nargs=2, default=(360, 480), metavar=("H", "W"))
    parser.add_argument("--stride", type=int, nargs=2, default=None, metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="folder for the file case's PNGs")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        handlers = {"memory": child_memory, "write": child_write, "file": child_file}
        print(json.dumps(handlers[args.child](args)))
        return
    temporary = None
    if args.out is None:
        temporary = tempfile.TemporaryDirectory(prefix="denseseg-large-")
        args.out = temporary.name
    n = args.size
    image, labels = 3 * n * n, n * n
    budget = 1.5 * GB + image + labels
    stride = args.stride or "2/3 of the crop"
    print(
        f"camvid, slide {args.crop[0]}x{args.crop[1]} stride {stride}, {n}x{n} RGB "
        f"(image {image / GB:.2f} GB, labels {labels / GB:.2f} GB), {args.threads} threads\n"
    )
    print("| case | RSS before (GB) | peak RSS (GB) | budget (GB) | within | time (s) |")
    print("|---|---:|---:|---:|---|---:|")
    for case in args.cases:
        if case == "file":
            _child("write", args)
        got = _child(case, args)
        within = "yes" if got["peak"] <= budget else "**no**"
        print(
            f"| {case} | {got['before'] / GB:.2f} | {got['peak'] / GB:.2f} | {budget / GB:.2f} "
            f"| {within} | {got['seconds']:.0f} |",
            flush=True,
        )
    if temporary is not None:
        temporary.cleanup()


if __name__ == "__main__":
    main()
