"""Load test of ``denseseg serve`` (issue 15): concurrent clients on the loopback interface
against a running server, with the in-process pipeline as the reference.

    PYTHONPATH=src python benchmarks/serve_load.py --model camvid --clients 8 --requests 2000
    PYTHONPATH=src python benchmarks/serve_load.py --requests 200 --max-batch 1 4 --json /tmp/s.json
    PYTHONPATH=src python benchmarks/serve_load.py --url http://127.0.0.1:8000 --pid 1234

For each ``--max-batch`` value a fresh server process is started (``python -m denseseg serve``
on 127.0.0.1 at a free port, ``OMP_NUM_THREADS=--threads``) and stopped at the end; with
``--url`` an already running server on the loopback interface is used instead (its resident
memory is read when ``--pid`` is given). The images are synthetic seeded PNGs (``--size``,
360x480 RGB as CamVid's frames), encoded into ready multipart bodies before the run, and sent
as the field ``file`` to ``POST /v1/segment?format=label`` by ``--clients`` threads (one
keep-alive connection each) until ``--requests`` are sent or ``--max-seconds`` have passed.
A warm-up (``--warmup`` requests, as concurrent) comes first; the server's resident memory
(``VmRSS`` of the process and its children) is read once it is idle after the warm-up and again
once it is idle after the load (``--settle`` seconds later each time), and sampled during the
load (peak, and the growth over the run's second half, which tells a leak from a warm-up that
was too short, are in the JSON and the target lines).

The reference, measured first in a child process with ``--threads`` torch threads: the same
images one after another through ``read_image_bytes`` (decode) -> ``Segmenter.predict`` ->
``label_png`` (encode). Targets of issue 15: no error, resident memory growth under 5 %, and
a throughput of at least 70 % of the reference's images/s. ``--cpus`` pins the server and
the reference to the same cores, ``--client-cpus`` the clients (by default they share the
machine's cores with the server). More clients than the server's ``--max-queue`` (16 by
default) get 503s: raise it with ``--server-args "--max-queue 64"``.

Server and reference run with ``OMP_WAIT_POLICY=PASSIVE`` unless ``--omp-wait-policy`` says
otherwise: OpenMP threads that spin while they wait make torch on two threads several times
slower when other processes want the same cores. On a loaded two-core machine the reference was
8x slower with the default policy and the server far less (libgomp spins less once a process
runs OpenMP work from two threads, as the server's inference thread does besides its main
thread), so the default policy would flatter the server.

Prints a Markdown table and one line per target; ``--json`` saves the numbers.
"""

from __future__ import annotations

import argparse
import http.client
import io
import ipaddress
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

MAX_CLIENTS = 64
TARGET_GROWTH = 0.05
TARGET_RATIO = 0.70
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BOUNDARY = "denseseg-serve-load-7c1f"
MB = 2**20
ANNOUNCE = re.compile(r"denseseg: serving .* at (http://[^\s,]+)")


# ------------------------------------------------------------------ images and request bodies
def synthetic_png(size: tuple[int, int], seed: int) -> bytes:
    """A seeded RGB PNG of ``size`` (H, W): coloured blocks, gradients and noise, so that it
    compresses about as badly as a photo does."""
    h, w = size
    rng = np.random.default_rng(seed)
    y, x = np.arange(h)[:, None], np.arange(w)[None, :]
    block = (y // 37 * 7 + x // 53 * 3 + seed) % 11
    base = np.stack([block * 23 + x * 96 // w, block * 41 + y * 96 // h, block * 59 + 0 * x], -1)
    image = (base + rng.integers(0, 24, (h, w, 3))) % 256
    buffer = io.BytesIO()
    Image.fromarray(image.astype(np.uint8), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def multipart_body(png: bytes, name: str) -> bytes:
    """``png`` as the one field ``file`` of a ``multipart/form-data`` body (:data:`BOUNDARY`)."""
    head = (
        f"--{BOUNDARY}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: image/png\r\n\r\n"
    )
    return head.encode() + png + f"\r\n--{BOUNDARY}--\r\n".encode()


def png_size(data: bytes) -> tuple[int, int, int] | None:
    """(height, width, colour type) from a PNG's header, ``None`` when it is not a PNG."""
    if len(data) < 26 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return height, width, data[25]


def check_label_png(data: bytes, size: tuple[int, int]) -> str | None:
    """Why a ``format=label`` answer is wrong (not a palette PNG of the image's size), or
    ``None``."""
    got = png_size(data)
    if got is None:
        return "not a PNG"
    if got[:2] != tuple(size):
        return "wrong PNG size"
    return None if got[2] == 3 else "not a palette PNG"


# ------------------------------------------------------------------ the server
def is_loopback(host: str) -> bool:
    """Whether every address ``host`` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def rss_bytes(pid: int | None) -> int | None:
    """Resident memory (``VmRSS``) of ``pid`` and all its descendants, ``None`` when unknown
    (no ``pid``, the process is gone, or no ``/proc``)."""
    if pid is None:
        return None
    total, found = 0, False
    for p in [pid, *_descendants(pid)]:
        try:
            with open(f"/proc/{p}/status") as fh:
                line = next((x for x in fh if x.startswith("VmRSS:")), None)
        except OSError:
            continue
        if line is not None:
            total, found = total + int(line.split()[1]) * 1024, True
    return total if found else None


def _descendants(pid: int) -> list[int]:
    """The ids of ``pid``'s children, grandchildren, ... (from ``/proc/*/stat``)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        out += children
        todo += children
    return out


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    """Poll ``GET /healthz`` until it answers 200; ``RuntimeError`` when ``proc`` exits first
    or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _check_alive(proc)
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"no answer from {url}/healthz within {timeout:.0f} s")


def _check_alive(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is not None:
        raise RuntimeError(f"the server exited with status {proc.returncode}")


@dataclass
class Server:
    """A ``denseseg serve`` child process (its own process group) and its log file."""

    proc: subprocess.Popen
    log: Path
    url: str = ""

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the server's output."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_url(self, timeout: float) -> str:
        """The address the server announces (``denseseg: serving MODEL at URL``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = ANNOUNCE.search(self.log.read_text(errors="replace"))
            if found:
                return found.group(1)
            _check_alive(self.proc)
            time.sleep(0.2)
        raise RuntimeError(f"the server did not announce its address within {timeout:.0f} s")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to its process group after 20 s; removes the log."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.unlink(missing_ok=True)


def serve_argv(args: argparse.Namespace, max_batch: int) -> list[str]:
    """The ``denseseg serve`` arguments of one run (on 127.0.0.1, a free port)."""
    argv = ["serve", "--model", args.model, "--host", "127.0.0.1", "--port", "0"]
    argv += ["--workers", str(args.workers), "--max-batch", str(max_batch)]
    argv += ["--device", args.device]
    return argv + shlex.split(args.server_args)


def _env(args: argparse.Namespace) -> dict[str, str]:
    """The environment of the server and the reference: thread count and OpenMP wait policy."""
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if args.omp_wait_policy != "inherit":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    return env


def start_server(args: argparse.Namespace, max_batch: int) -> Server:
    """Start the server and wait until it is healthy (stopped again when it does not get
    there)."""
    fd, log = tempfile.mkstemp(prefix="denseseg-serve-load-", suffix=".log")
    env = _env(args)
    if args.token:
        env["DENSESEG_SERVE_TOKEN"] = args.token
    with os.fdopen(fd, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "denseseg", *serve_argv(args, max_batch)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=_pin(args.cpus),
        )
    server = Server(proc, Path(log))
    try:
        server.url = server.wait_url(args.start_timeout)
        wait_healthy(server.url, proc, args.start_timeout)
    except BaseException as exc:
        tail = server.log_tail()
        server.stop()
        raise RuntimeError(f"{exc}; its last output:\n{tail}") from None
    return server


def _pin(cpus: list[int] | None):
    """A ``preexec_fn`` that pins the child to ``cpus`` (``None``: no pinning)."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


# ------------------------------------------------------------------ the clients
@dataclass
class LoadResult:
    """What a load run saw: latencies of the good answers (s), errors by kind, wall time."""

    latencies: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    sent: int = 0

    @property
    def ok(self) -> int:
        return len(self.latencies)


class _Work:
    """Hands out request numbers until ``total`` are taken or the deadline has passed."""

    def __init__(self, total: int, seconds: float) -> None:
        self.total, self.deadline = total, time.monotonic() + seconds
        self.taken, self.lock = 0, threading.Lock()

    def take(self) -> int | None:
        with self.lock:
            if self.taken >= self.total or time.monotonic() >= self.deadline:
                return None
            self.taken += 1
            return self.taken - 1


@dataclass
class Target:
    """Where and how to send: host, port, path with query, headers, bodies, image size."""

    host: str
    port: int
    path: str
    headers: dict[str, str]
    bodies: list[bytes]
    size: tuple[int, int]
    timeout: float = 60.0


def make_target(url: str, pngs: list[bytes], size, token: str | None, timeout: float) -> Target:
    """The :class:`Target` of ``POST URL/v1/segment?format=label`` with ``pngs`` as bodies."""
    parts = urlsplit(url)
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    bodies = [multipart_body(png, f"load{i}.png") for i, png in enumerate(pngs)]
    path = parts.path.rstrip("/") + "/v1/segment?format=label"
    return Target(parts.hostname or "", parts.port or 80, path, headers, bodies, size, timeout)


def _send(conn: http.client.HTTPConnection, target: Target, body: bytes) -> str | None:
    """One request on ``conn``; the kind of error, or ``None`` for a good answer."""
    conn.request("POST", target.path, body=body, headers=target.headers)
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        return f"HTTP {resp.status}"
    return check_label_png(data, target.size)


def _client(target: Target, work: _Work, result: LoadResult, lock: threading.Lock) -> None:
    """One client: a keep-alive connection, reopened after a connection error."""
    conn = None
    while (i := work.take()) is not None:
        conn = conn or http.client.HTTPConnection(target.host, target.port, target.timeout)
        start = time.perf_counter()
        try:
            error = _send(conn, target, target.bodies[i % len(target.bodies)])
        except (OSError, http.client.HTTPException) as exc:
            error = type(exc).__name__
            conn.close()
            conn = None
        elapsed = time.perf_counter() - start
        with lock:
            result.sent += 1
            if error is None:
                result.latencies.append(elapsed)
            else:
                result.errors[error] += 1
    if conn is not None:
        conn.close()


def run_load(target: Target, clients: int, requests: int, max_seconds: float) -> LoadResult:
    """``requests`` requests from ``clients`` threads, ``max_seconds`` at most (requests in
    flight then are finished)."""
    result, lock, work = LoadResult(), threading.Lock(), _Work(requests, max_seconds)
    threads = [
        threading.Thread(target=_client, args=(target, work, result, lock), daemon=True)
        for _ in range(clients)
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - start
    return result


# ------------------------------------------------------------------ the in-process reference
def in_process(argv: list[str], pngs: list[bytes], count: int, threads: int) -> dict:
    """Images/s of decode -> ``Segmenter.predict`` -> encode, one image after another, with
    ``threads`` torch threads (two warm-up images first), for the predictor the server of the
    ``denseseg serve`` arguments ``argv`` builds (same model, device and inference options)."""
    import torch

    from denseseg import load_model
    from denseseg.cli import _inference_options, build_parser
    from denseseg.data.io import read_image_bytes
    from denseseg.serve.encode import label_png

    torch.set_num_threads(threads)
    serve = build_parser().parse_args(argv)
    seg = load_model(serve.model, device=serve.device, **_inference_options(serve))

    def pipeline(png: bytes) -> bytes:
        return label_png(seg.predict(read_image_bytes(png)), seg.palette)

    for png in pngs[:2]:
        pipeline(png)
    start = time.perf_counter()
    for i in range(count):
        pipeline(pngs[i % len(pngs)])
    seconds = time.perf_counter() - start
    return {"images": count, "seconds": seconds, "images_per_s": count / seconds}


def reference_in_child(args: argparse.Namespace) -> dict:
    """:func:`in_process` in a fresh process (pinned like the server), for a clean measure."""
    cmd = [sys.executable, __file__, "--child", "--model", args.model, "--threads"]
    cmd += [str(args.threads), "--reference-images", str(args.reference_images)]
    cmd += ["--images", str(args.images), "--size", *map(str, args.size), "--seed", str(args.seed)]
    cmd += ["--device", args.device, f"--server-args={args.server_args}"]
    done = subprocess.run(
        cmd, capture_output=True, text=True, env=_env(args), preexec_fn=_pin(args.cpus), check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"the in-process reference failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ one measured run
class RssSampler:
    """Reads a process tree's resident memory every ``interval`` seconds in a thread, as
    ``(seconds since start, bytes)`` in :attr:`samples`, while used as a context manager."""

    def __init__(self, pid: int | None, interval: float = 0.5) -> None:
        self.pid, self.interval, self.samples = pid, interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.wait(self.interval):
            rss = rss_bytes(self.pid)
            if rss is not None:
                self.samples.append((round(time.monotonic() - start, 2), rss))

    def __enter__(self) -> RssSampler:
        if self.pid is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def at(self, seconds: float) -> int | None:
        """The last sample taken by ``seconds``, ``None`` before the first."""
        return next((rss for t, rss in reversed(self.samples) if t <= seconds), None)


def _growth(before: int | None, after: int | None) -> float | None:
    return (after - before) / before if before and after else None


def measure(target: Target, pid: int | None, args: argparse.Namespace) -> dict:
    """Warm-up, resident memory, the load (memory sampled meanwhile), resident memory again:
    one row of the table."""
    warm = run_load(target, args.clients, args.warmup, args.max_seconds)
    time.sleep(args.settle)
    before = rss_bytes(pid)
    with RssSampler(pid) as sampler:
        load = run_load(target, args.clients, args.requests, args.max_seconds)
    time.sleep(args.settle)
    after = rss_bytes(pid)
    half = sampler.at(load.seconds / 2)
    lat_ms = np.asarray(load.latencies) * 1000
    return {
        "clients": args.clients,
        "requests": load.sent,
        "ok": load.ok,
        "errors": dict(load.errors),
        "warmup_errors": dict(warm.errors),
        "seconds": load.seconds,
        "throughput": load.ok / load.seconds if load.seconds > 0 else 0.0,
        "p50_ms": float(np.percentile(lat_ms, 50)) if load.ok else None,
        "p99_ms": float(np.percentile(lat_ms, 99)) if load.ok else None,
        "rss_before": before,
        "rss_after": after,
        "growth": _growth(before, after),
        "rss_half": half,
        "growth_second_half": _growth(half, after),
        "rss_peak": max([rss for _, rss in sampler.samples] + [after or 0]) or None,
        "rss_samples": sampler.samples,
    }


def run_servers(args: argparse.Namespace, pngs: list[bytes]) -> list[dict]:
    """One :func:`measure` per ``--max-batch`` value, each in its own server process; or one
    against ``--url``."""
    if args.url:
        wait_healthy(args.url.rstrip("/"), None, 10)
        target = make_target(args.url, pngs, args.size, args.token, args.request_timeout)
        return [{"max_batch": None, **measure(target, args.pid, args)}]
    rows = []
    for max_batch in args.max_batch:
        server = start_server(args, max_batch)
        try:
            target = make_target(server.url, pngs, args.size, args.token, args.request_timeout)
            row = measure(target, server.proc.pid, args)
            if server.proc.poll() is not None:
                row["errors"]["server exited"] = 1
        finally:
            server.stop()
        rows.append({"max_batch": max_batch, **row})
    return rows


# ------------------------------------------------------------------ the report
def add_verdicts(rows: list[dict], reference: dict) -> None:
    """Each row's ratio to the reference and whether each target of issue 15 is met."""
    for row in rows:
        row["ratio"] = row["throughput"] / reference["images_per_s"]
        row["meets_errors"] = not row["errors"] and row["requests"] == row["ok"] > 0
        row["meets_growth"] = row["growth"] is not None and row["growth"] < TARGET_GROWTH
        row["meets_ratio"] = row["ratio"] >= TARGET_RATIO


def _errors_cell(errors: dict) -> str:
    if not errors:
        return "0"
    kinds = ", ".join(f"{k}: {v}" for k, v in sorted(errors.items()))
    return f"{sum(errors.values())} ({kinds})"


def _num(value: float | None, fmt: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value / scale, fmt)


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def target_lines(rows: list[dict], asked: int) -> list[str]:
    """One line per row and target of issue 15, met or not, with the numbers."""
    lines = []
    for r in rows:
        name = f"max batch {r['max_batch'] or '?'}"
        cut = f" (only {r['requests']} of {asked} sent in time)" if r["requests"] < asked else ""
        growth = _percent(r["growth"])
        if r["growth_second_half"] is not None:
            growth += f", {_percent(r['growth_second_half'])} in the run's second half"
        lines += [
            f"{name}: errors {_errors_cell(r['errors'])}{cut}: {_met(r['meets_errors'])}",
            f"{name}: memory growth {growth} (target < 5 %): {_met(r['meets_growth'])}",
            f"{name}: {r['ratio']:.2f}x the in-process images/s (target >= 0.70):"
            f" {_met(r['meets_ratio'])}",
        ]
        if r["warmup_errors"]:
            lines.append(f"{name}: warm-up errors {_errors_cell(r['warmup_errors'])}")
    return lines


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f} %"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def markdown_table(rows: list[dict], reference: dict) -> str:
    """The results as a Markdown table (latencies over the good answers)."""
    lines = [
        "| max batch | clients | requests | errors | req/s | p50 ms | p99 ms | in-process img/s "
        "| ratio | RSS before MB | RSS after MB | growth | 0 errors | growth < 5 % | >= 70 % |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        growth = None if r["growth"] is None else 100 * r["growth"]
        lines.append(
            f"| {r['max_batch'] or '?'} | {r['clients']} | {r['requests']} "
            f"| {_errors_cell(r['errors'])} | {r['throughput']:.2f} | {_num(r['p50_ms'], '.0f')} "
            f"| {_num(r['p99_ms'], '.0f')} | {reference['images_per_s']:.2f} | {r['ratio']:.2f} "
            f"| {_num(r['rss_before'], '.0f', MB)} | {_num(r['rss_after'], '.0f', MB)} "
            f"| {_num(growth, '+.1f')} % | {_yes(r['meets_errors'])} | {_yes(r['meets_growth'])} "
            f"| {_yes(r['meets_ratio'])} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ the command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, checked: one clear line (``SystemExit``) for a wrong one."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="camvid", help="built-in name, checkpoint or .onnx")
    p.add_argument("--device", default="cpu", help="of the server and the reference")
    p.add_argument(
        "--url",
        default=None,
        help="a running server on loopback (give its --model and --server-args for the reference)",
    )
    p.add_argument("--pid", type=int, default=None, help="with --url: its process, for memory")
    p.add_argument("--token", default=os.environ.get("DENSESEG_SERVE_TOKEN"))
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=2000, help="measured requests in all")
    p.add_argument("--warmup", type=int, default=100, help="requests before the measure")
    p.add_argument(
        "--settle", type=float, default=2.0, help="idle seconds before each memory reading"
    )
    p.add_argument("--max-seconds", type=float, default=600.0, help="bound of each phase")
    p.add_argument("--request-timeout", type=float, default=60.0)
    p.add_argument("--max-batch", type=int, nargs="+", default=[4], help="one server each")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--server-args",
        default="",
        help='more serve options, e.g. "--max-queue 64 --fast" (inference options such as '
        "--fast, --mode, --tta, --backend apply to the reference too)",
    )
    p.add_argument("--start-timeout", type=float, default=180.0)
    p.add_argument("--threads", type=int, default=2, help="torch threads of server and reference")
    p.add_argument(
        "--omp-wait-policy",
        choices=("passive", "active", "inherit"),
        default="passive",
        help="OMP_WAIT_POLICY of server and reference (inherit: this process's environment)",
    )
    p.add_argument("--cpus", type=int, nargs="+", default=None, help="pin server and reference")
    p.add_argument("--client-cpus", type=int, nargs="+", default=None, help="pin the clients")
    p.add_argument("--size", type=int, nargs=2, default=(360, 480), metavar=("H", "W"))
    p.add_argument("--images", type=int, default=8, help="distinct synthetic images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference-images", type=int, default=50, help="images of the reference")
    p.add_argument("--json", type=Path, default=None, help="save the results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    _check(p, args)
    return args


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 1 <= args.clients <= MAX_CLIENTS:
        p.error(f"--clients must be between 1 and {MAX_CLIENTS}")
    if min(args.requests, args.images, args.reference_images, args.threads, *args.size) < 1:
        p.error("--requests, --images, --reference-images, --threads and --size must be >= 1")
    if min(args.warmup, args.settle) < 0 or args.max_seconds <= 0 or min(args.max_batch) < 1:
        p.error("--warmup and --settle must be >= 0, --max-seconds > 0 and --max-batch >= 1")
    if args.url is not None:
        parts = urlsplit(args.url)
        if parts.scheme != "http" or not parts.hostname:
            p.error(f"--url must be http://HOST:PORT, not {args.url}")
        if not is_loopback(parts.hostname):
            p.error(f"--url must be on the loopback interface (127.0.0.1, ::1), not {args.url}")
    if args.pid is not None and args.url is None:
        p.error("--pid goes with --url (a started server's process is known)")


def save_json(result: dict, path: Path) -> None:
    """Write ``result`` to ``path`` atomically."""
    from denseseg.checkpoint import atomic_write

    with atomic_write(path, "benchmark results") as fh:
        fh.write((json.dumps(result, indent=2) + "\n").encode())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pngs = [synthetic_png(tuple(args.size), args.seed + i) for i in range(args.images)]
    if args.child:
        argv, n = serve_argv(args, 1), args.reference_images
        print(json.dumps(in_process(argv, pngs, n, args.threads)))
        return
    if args.client_cpus:
        os.sched_setaffinity(0, args.client_cpus)
    try:
        reference = reference_in_child(args)
        rows = run_servers(args, pngs)
    except RuntimeError as exc:
        sys.exit(f"serve_load: {exc}")
    add_verdicts(rows, reference)
    h, w = args.size
    print(
        f"{args.model}, {h}x{w} RGB PNGs ({np.mean([len(p) for p in pngs]) / 1024:.0f} KiB), "
        f"{args.threads} torch threads, OMP_WAIT_POLICY {args.omp_wait_policy}, format=label\n"
    )
    print(markdown_table(rows, reference))
    print("\n" + "\n".join(target_lines(rows, args.requests)))
    if args.json is not None:
        save_json({"args": _jsonable(args), "reference": reference, "rows": rows}, args.json)
        print(f"\nJSON: {args.json}")


def _jsonable(args: argparse.Namespace) -> dict:
    out = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out.pop("token", None)
    out.pop("child", None)
    return out


if __name__ == "__main__":
    main()
