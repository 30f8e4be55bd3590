"""Seconds per training step of candidate architectures, float32 against bfloat16 autocast.

One step: forward in train mode (auxiliary heads included), the cross-entropy of every output
summed, backward, an AdamW step; a random batch (8 crops of 288x384 and of 360x480 by default),
no data loading. For each model, size and precision: the fastest of ``--steps`` timed steps
after one untimed one. Prints a Markdown table (benchmarks/camvid.md, "The candidates")::

    PYTHONPATH=src python benchmarks/step_time.py --threads 2
    PYTHONPATH=src python benchmarks/step_time.py --models ddrnet23_slim --sizes 360 480
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from denseseg.models import create_model


def step_seconds(name: str, size: tuple[int, int], bf16: bool, batch: int, steps: int) -> float:
    """The fastest of ``steps`` training steps of ``name`` (11 classes) on ``size`` crops."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=11).train()
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x, y = torch.randn(batch, 3, *size), torch.randint(0, 11, (batch, *size))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out = model(x)
        loss = sum(F.cross_entropy(v.float(), y) for v in out.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--models", nargs="+", default=["ddrnet23_slim", "bisenetv2", "lraspp_mobilenet_v3_large"]
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[288, 384, 360, 480], help="H W ...")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sizes = list(zip(args.sizes[::2], args.sizes[1::2], strict=True))
    print(f"batch {args.batch}, {args.threads} thread(s), fastest of {args.steps} steps\n")
    print("| model | crop | fp32 s/step | bf16 s/step | bf16 speed-up |")
    print("|---|---|---:|---:|---:|")
    for name in args.models:
        for size in sizes:
            fp32 = step_seconds(name, size, False, args.batch, args.steps)
            bf16 = step_seconds(name, size, True, args.batch, args.steps)
            crop = f"{size[0]}x{size[1]}"
            print(f"| `{name}` | {crop} | {fp32:.2f} | {bf16:.2f} | {fp32 / bf16:.2f} |")


if __name__ == "__main__":
    main()
