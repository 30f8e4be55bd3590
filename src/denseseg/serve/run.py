"""``denseseg serve``: load the model, bind the socket, run uvicorn (one process or
``--workers N``, each loading its own copy of the model)."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import socket
import sys
from typing import Any

from denseseg.errors import ConfigError

CONFIG_ENV = "DENSESEG_SERVE_CONFIG"
"""How ``--workers N`` hands the model and settings to its worker processes (JSON)."""

_NEEDS = ("fastapi", "uvicorn", "multipart", "prometheus_client")


def require_serve() -> None:
    """Raises ConfigError naming the extra when the serving packages are missing."""
    import importlib.util

    missing = [name for name in _NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"denseseg serve needs the extra denseseg[serve] (missing: {', '.join(missing)}); "
            "install it with: pip install 'denseseg[serve]'"
        )


def build_app(model: str, options: dict[str, Any], settings: Any) -> Any:
    """Load ``model`` (a built-in name, checkpoint or ONNX file) and make its application."""
    from denseseg.api import load_model
    from denseseg.serve.app import create_app

    return create_app(load_model(model, **options), settings)


def app_from_env() -> Any:
    """The application of a ``--workers N`` worker process (uvicorn's factory)."""
    from denseseg.serve.settings import ServeSettings

    spec = json.loads(os.environ[CONFIG_ENV])
    settings = spec["settings"]
    settings["cors_origins"] = tuple(settings["cors_origins"])
    return build_app(spec["model"], spec["options"], ServeSettings(**settings))


def serve(
    model: str,
    settings: Any,
    options: dict[str, Any],
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
) -> int:
    """Serve ``model`` until interrupted; returns the exit status.

    Raises:
        ConfigError: the extra is missing, the address cannot be bound, or the model cannot be
            served.
    """
    require_serve()
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    app = build_app(model, options, settings)  # checked (and loaded) before anything binds
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    _announce(settings, host, bound, workers)
    try:
        if workers == 1:
            config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
            uvicorn.Server(config).run(sockets=[sock])
            return 0
        del app  # each worker loads its own
        spec = {"model": model, "options": options, "settings": dataclasses.asdict(settings)}
        os.environ[CONFIG_ENV] = json.dumps(spec)
        config = uvicorn.Config(
            "denseseg.serve.run:app_from_env", factory=True, workers=workers, log_level="warning"
        )
        Multiprocess(config, sockets=[sock]).run()
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down gracefully and passes it on
        pass
    print("denseseg: server stopped", file=sys.stderr, flush=True)
    return 0


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one), or a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only for sockets
    # that say TCP, and with it on every answer after the first on a kept-open connection
    # waits about 40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise ConfigError(
            f"cannot listen on {host}:{port} ({reason}); choose another --port or --host"
        ) from None
    sock.set_inheritable(True)
    return sock


def _announce(settings: Any, host: str, port: int, workers: int) -> None:
    shown = f"[{host}]" if ":" in host else host
    procs = f", {workers} worker processes" if workers > 1 else ""
    print(f"denseseg: serving {settings.model_name} at http://{shown}:{port}{procs}", flush=True)
    if not is_loopback(host) and settings.token is None:
        print(
            f"denseseg: warning: {host} is reachable from other machines and no --token is set: "
            "anyone who can reach it can use the API",
            file=sys.stderr,
            flush=True,
        )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
