"""Speed of denseseg's pure-PyTorch RoIAlign (avg and max) next to torchvision's C++/CUDA op.

Prints milliseconds per call, forward only and forward + backward, on an FPN-level-sized map.
The time is the median of ``--repeats`` calls after ``--warmup`` calls.

    python benchmarks/roi_align_speed.py                    # CPU, 2 threads
    python benchmarks/roi_align_speed.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torchvision

from denseseg.ops import roi_align


def _time_ms(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _boxes(num: int, height: int, width: int, scale: float, gen: torch.Generator) -> torch.Tensor:
    """Proposal-like boxes in image coordinates, 8 px to the whole image, spread over 2 images."""
    img = torch.tensor([width / scale, height / scale])
    side = torch.exp(torch.rand(num, 2, generator=gen) * torch.log(img / 8)) * 8
    xy = torch.rand(num, 2, generator=gen) * (img - side)
    batch = torch.randint(0, 2, (num, 1), generator=gen).float()
    return torch.cat([batch, xy, xy + side], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--boxes", type=int, default=512)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--size", type=int, nargs=2, default=(50, 68), metavar=("H", "W"))
    parser.add_argument("--sampling-ratio", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    height, width = args.size
    scale = 1 / 16
    feats = torch.randn(2, args.channels, height, width, generator=gen).to(device)
    rois = _boxes(args.boxes, height, width, scale, gen).to(device)
    ratio = args.sampling_ratio

    ops: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
        "torchvision avg": lambda x, s: torchvision.ops.roi_align(x, rois, s, scale, ratio),
        "denseseg avg": lambda x, s: roi_align(x, rois, s, scale, ratio),
        "denseseg max": lambda x, s: roi_align(x, rois, s, scale, ratio, mode="max"),
    }
    print(
        f"# RoIAlign, features {tuple(feats.shape)}, {args.boxes} boxes, sampling_ratio={ratio}, "
        f"device={device}, threads={args.threads}, torch {torch.__version__}"
    )
    print(f"| {'op':<16} | {'output':>6} | {'forward ms':>10} | {'fwd+bwd ms':>10} |")
    print(f"|{'-' * 18}|{'-' * 8}|{'-' * 12}|{'-' * 12}|")
    for size in (7, 14):
        for name, op in ops.items():

            def forward(op=op, size=size) -> None:
                with torch.no_grad():
                    op(feats, size)

            def forward_backward(op=op, size=size) -> None:
                x = feats.detach().requires_grad_(True)
                op(x, size).sum().backward()

            fwd = _time_ms(forward, device, args.warmup, args.repeats)
            both = _time_ms(forward_backward, device, args.warmup, args.repeats)
            print(f"| {name:<16} | {f'{size}x{size}':>6} | {fwd:>10.1f} | {both:>10.1f} |")


if __name__ == "__main__":
    main()
