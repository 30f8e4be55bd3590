"""The server's limits and options (``denseseg serve``'s flags)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from denseseg.errors import ConfigError

TOKEN_ENV = "DENSESEG_SERVE_TOKEN"
"""Environment variable holding the API token when ``--token`` is not given."""

DEFAULT_MAX_PIXELS = 4096 * 4096
"""Largest upload (width x height) by default: a 4096x4096 image."""

ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "MPO", "BMP", "TIFF", "WEBP", "GIF", "PPM"})
"""Image formats accepted (Pillow's names), decided from the content, never from a file name."""


@dataclass(frozen=True)
class ServeSettings:
    """What the server accepts and how it batches.

    Attributes:
        model_name: the name ``/v1/models`` gives the model.
        token: when set, ``/v1/*`` and ``/metrics`` need ``Authorization: Bearer <token>``.
        cors_origins: origins allowed to call the API from a browser; other cross-origin
            requests are refused (403).
        max_upload_bytes: largest request body.
        max_pixels: largest image (width x height), checked from the header before decoding.
        max_batch: most images of one forward pass (dynamic batching; 1 turns it off); None:
            1 on a CPU (batching did not raise throughput on two cores:
            ``benchmarks/serve_load.py``), 4 on a GPU.
        batch_wait_ms: how long the first request of a batch waits for others.
        max_queue: most requests admitted at once (decoding, queued or running); more get 503.
        timeout_s: a request not answered within this many seconds gets 504.
        max_files: most images of one ``/v1/segment/batch`` request (and at most
            ``max_queue``).
        allowed_hosts: the names a request's ``Host`` header may give (a guard against DNS
            rebinding: a web page that makes its own name point at 127.0.0.1); empty: any.
            ``denseseg serve`` bound to a loopback address allows the loopback names only.
    """

    model_name: str = "model"
    token: str | None = None
    cors_origins: tuple[str, ...] = field(default_factory=tuple)
    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_batch: int | None = None
    batch_wait_ms: float = 5.0
    max_queue: int = 16
    timeout_s: float = 30.0
    max_files: int = 16
    allowed_hosts: tuple[str, ...] = field(default_factory=tuple)

    @property
    def files_limit(self) -> int:
        """Most images a batch request may hold: ``max_files``, and no more than the queue
        takes at once (a larger batch could never be admitted whole)."""
        return min(self.max_files, self.max_queue)

    def __post_init__(self) -> None:
        whole = {"max_upload_bytes": 1, "max_pixels": 1, "max_batch": 1, "max_queue": 1}
        for name, low in {**whole, "max_files": 1}.items():
            value = getattr(self, name)
            if name == "max_batch" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{_flag(name)}={value!r} must be a whole number >= {low}")
        for name in ("batch_wait_ms", "timeout_s"):
            value = getattr(self, name)
            number = not isinstance(value, bool) and isinstance(value, int | float)
            if not number or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{_flag(name)}={value!r} must be a finite number >= 0")
        if self.timeout_s == 0:
            raise ConfigError("--timeout must be above 0 seconds")
        for origin in self.cors_origins:
            if not origin.startswith(("http://", "https://")) or origin.endswith("/"):
                raise ConfigError(
                    f"--cors-origin {origin!r} must be an origin like https://example.org "
                    "(scheme and host, optional port, no path or trailing slash)"
                )
        if self.token is not None:
            if not self.token.strip():
                raise ConfigError(
                    f"--token (or {TOKEN_ENV}) is empty; give a token or leave it out"
                )
            if not (self.token.isascii() and self.token.isprintable()) or " " in self.token:
                raise ConfigError(
                    f"--token (or {TOKEN_ENV}) must be printable ASCII without spaces (HTTP "
                    "headers carry nothing else reliably)"
                )


_FLAGS = {"max_upload_bytes": "max_upload_bytes (--max-upload-mb in MiB)", "timeout_s": "--timeout"}


def _flag(name: str) -> str:
    """The command-line flag of a setting, for messages."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def token_from(option: str | None) -> str | None:
    """The API token: the option when given, else ``$DENSESEG_SERVE_TOKEN``, else None."""
    if option is not None:
        return option
    return os.environ.get(TOKEN_ENV) or None
