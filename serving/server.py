"""Start the server: check the address against the keys, load the model in the background, run uvicorn.

    serve(cfg, path, label)     # what `make serve` ends in (stages/tools/serve.py)

The port opens at once and answers 503 (with Retry-After) until the model is loaded, so a supervisor or a client
can wait on GET /health instead of guessing.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

from pipeline.core.errors import UserError
from serving.app import Service, create_app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except OSError:
            return False


def serve(cfg, path, label: str) -> None:
    import uvicorn

    from pipeline.models.loading import load_policy

    name = cfg.model_name or label
    service = Service(
        cfg, load=lambda: load_policy(path, cfg.precision), model_name=name, spawn=(str(path), str(cfg.precision))
    )
    if not service.keys and not is_loopback(cfg.host):
        raise UserError(
            f"host={cfg.host} is reachable from other machines, and no API key is set: put keys in "
            f"${cfg.auth.keys_env} (comma-separated) or auth.keys_file=<file>, or serve on host=127.0.0.1"
        )
    level = str(cfg.log_level).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("serving").setLevel(level)
    app = create_app(service)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=cfg.host,
            port=int(cfg.port),
            access_log=False,
            log_level=str(cfg.log_level).lower(),
            timeout_graceful_shutdown=5,
        )
    )
    service.on_load_failed = lambda: setattr(server, "should_exit", True)  # nothing to serve: stop, and say why
    service.start_loading()
    auth = f"{len(service.keys)} API key(s)" if service.keys else "no API key (loopback only)"
    print(
        f"serving {name} ({path}) on http://{cfg.host}:{cfg.port}: chat page at /, OpenAI API at /v1, {auth}, "
        f"moderation {cfg.moderation.classifier}",
        flush=True,
    )
    try:
        server.run()
    except SystemExit:  # uvicorn's way of saying it could not bind; said once, below, as the other errors are
        pass
    finally:
        service.close()
    if service.load_error:
        raise UserError(f"{path}: the model failed to load ({service.load_error})")
    if not server.started:
        raise UserError(
            f"could not listen on {cfg.host}:{cfg.port} (in use, or not an address of this machine); "
            f"pick another with port=<n> or host=<address>"
        )
