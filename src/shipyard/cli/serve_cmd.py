"""`shipyard serve` and `shipyard predict` (API keys: `cli/api_keys_cmd.py`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from pydantic import ValidationError

from shipyard.cli.api_keys_cmd import KEYS_FILE_HELP
from shipyard.generate.packed import DECODE_WEIGHTS, KV_CACHES
from shipyard.serve.settings import ServeError, ServeSettings, default

if TYPE_CHECKING:
    from shipyard.ui.app import UISettings


def serve(
    packages: list[Path] = typer.Argument(None, help="Package directories to serve."),
    registry: list[str] = typer.Option(
        [], "--registry", "-r", help="Registry ref to serve: NAME, NAME:VERSION or NAME@ALIAS."
    ),
    adapter: list[str] = typer.Option(
        [],
        "--adapter",
        help="NAME=PACKAGE: also serve this LoRA adapter package as model NAME, on the served "
        "package's weights (its base). Repeatable.",
    ),
    host: str = typer.Option(default("host"), "--host", help="Address to bind."),
    port: int = typer.Option(default("port"), "--port", "-p", help="Port (0: pick a free one)."),
    workers: int = typer.Option(default("workers"), "--workers", min=1, help="Server processes."),
    keys_file: Path | None = typer.Option(None, "--keys-file", help=KEYS_FILE_HELP),
    insecure_no_auth: bool = typer.Option(
        False, "--insecure-no-auth", help="Serve without API keys even off loopback."
    ),
    public_key: Path | None = typer.Option(
        None, "--public-key", help="Only serve packages signed by this Ed25519 key."
    ),
    max_batch_size: int = typer.Option(
        default("max_batch_size"), "--max-batch-size", min=1, help="Rows per forward."
    ),
    max_wait_ms: float = typer.Option(
        default("max_wait_ms"),
        "--max-wait-ms",
        min=0,
        help="Extra wait for a batch to fill (0: batch what queued).",
    ),
    max_queue: int = typer.Option(
        default("max_queue"), "--max-queue", min=1, help="Queued requests → 503."
    ),
    max_running_seqs: int = typer.Option(
        default("max_running_seqs"),
        "--max-running-seqs",
        min=1,
        help="Language models: sequences decoded together.",
    ),
    decode_weights: str = typer.Option(
        "auto",
        "--decode-weights",
        help="Language models: auto (package's weights), int8 (quantize for decoding) or fp32.",
    ),
    kv_cache: str = typer.Option(
        "auto",
        "--kv-cache",
        help="Language models: what the KV cache stores: auto (fp16 with int8 weights on the "
        "native kernels, else the model's), fp32 or fp16.",
    ),
    timeout_s: float = typer.Option(
        default("timeout_s"), "--timeout-s", help="Per-request deadline → 504."
    ),
    max_body_bytes: int = typer.Option(
        default("max_body_bytes"), "--max-body-bytes", help="Body limit → 413."
    ),
    rate_limit: float | None = typer.Option(
        None, "--rate-limit", help="Requests/s per API key (token bucket) → 429."
    ),
    rate_burst: int | None = typer.Option(None, "--rate-burst", help="Bucket size."),
    torch_threads: int | None = typer.Option(
        None, "--torch-threads", help="torch threads per worker (default: cores / workers)."
    ),
    metrics_public: bool = typer.Option(
        False, "--metrics-public", help="Serve /metrics without a key off loopback."
    ),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
    ui: bool = typer.Option(False, "--ui", help="Also serve the web dashboard at /ui/."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="With --ui: the runs folder to show."),
) -> None:
    """Serve packages over HTTP: KServe V2 (tritonclient-compatible), simple JSON, and
    OpenAI-compatible /v1/completions and /v1/chat/completions for language models.

    Example: shipyard serve runs/digits/package --port 8000

    From the registry, with keys, on all interfaces:
    shipyard serve --registry digits@production --host 0.0.0.0 --keys-file keys.json --workers 2

    One base, two LoRA adapters (pick one by the request's model name):
    shipyard serve base/package --adapter sql=runs/sql-lora/package --adapter chat=runs/chat/package

    With the web dashboard (runs, registry, live metrics, playground) at /ui/:
    shipyard serve runs/digits/package --ui --runs runs
    """
    packages = list(packages or [])
    if not packages and not registry:
        raise ServeError("nothing to serve: give PACKAGE_DIR arguments or --registry NAME[@ALIAS]")
    if decode_weights not in DECODE_WEIGHTS:
        raise ServeError(
            f"unknown --decode-weights {decode_weights!r}; "
            f"choose one of {', '.join(DECODE_WEIGHTS)}"
        )
    if kv_cache not in KV_CACHES:
        raise ServeError(f"unknown --kv-cache {kv_cache!r}; choose one of {', '.join(KV_CACHES)}")
    if keys_file is None and not insecure_no_auth:
        default = _default_keys_file()
        keys_file = default if default.is_file() else None
    if torch_threads is None and workers > 1:
        torch_threads = max(1, (os.cpu_count() or 1) // workers)
    try:
        settings = ServeSettings(
            packages=[p.resolve() for p in packages],
            registry_refs=registry,
            adapters=parse_adapters(adapter),
            host=host,
            port=port,
            workers=workers,
            keys_file=keys_file.resolve() if keys_file else None,
            insecure_no_auth=insecure_no_auth,
            public_key=public_key.resolve() if public_key else None,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
            max_running_seqs=max_running_seqs,
            decode_weights=decode_weights,
            kv_cache=kv_cache,
            timeout_s=timeout_s,
            max_body_bytes=max_body_bytes,
            rate_limit=rate_limit,
            rate_burst=rate_burst,
            torch_threads=torch_threads,
            metrics_public=metrics_public,
        )
    except ValidationError as exc:
        raise ServeError(_first_error(exc)) from None
    _preflight(settings)
    dashboard = None
    if ui:
        from shipyard.ui.app import UISettings

        dashboard = UISettings(runs_dir=runs.resolve())
    run_server(settings, log_level=log_level, ui=dashboard)


def parse_adapters(values: list[str]) -> dict[str, Path]:
    """NAME=PACKAGE flags as {NAME: package path}; ServeError for a malformed or repeated one."""
    adapters: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ServeError(
                f"--adapter {value!r}: expected NAME=PACKAGE_DIR (e.g. --adapter "
                "sql=runs/sql-lora/package)"
            )
        if name in adapters:
            raise ServeError(f"--adapter {name}: given twice; each adapter needs its own name")
        adapters[name] = Path(path).resolve()
    return adapters


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def _preflight(settings: ServeSettings) -> None:
    """Verify every package and ref before binding, so a bad one fails fast with one line."""
    from shipyard.package import verify_package

    bases: list[tuple[str, Path]] = []  # (served name, package directory)
    for path in settings.packages:
        if not path.is_dir():
            raise ServeError(f"{path}: not a package directory")
        bases.append((verify_package(path, public_key=settings.public_key).name, path))
    if settings.registry_refs:
        from shipyard.package.registry import Registry

        with Registry() as reg:
            for ref in settings.registry_refs:
                local = reg.resolve_local(ref, public_key=settings.public_key)
                bases.append((reg.get(ref).name, Path(local)))
    if settings.adapters:
        from shipyard.package.manifest import read_manifest
        from shipyard.serve.adapters import check_adapter

        base_name, base_path = bases[0]  # settings checked: exactly one
        base, _ = read_manifest(base_path)
        for name, path in settings.adapters.items():
            if name == base_name:
                raise ServeError(
                    f"--adapter {name}={path}: the base is served as {name!r}; choose another "
                    "adapter name"
                )
            check_adapter(name, path, base, base_path)
            verify_package(path, public_key=settings.public_key)
    if settings.keys_file is not None and not settings.insecure_no_auth:
        from shipyard.serve.auth import read_keys

        if not [k for k in read_keys(settings.keys_file) if not k.revoked]:
            raise ServeError(
                f"{settings.keys_file}: no active keys (add one: shipyard api-keys add)"
            )


def run_server(
    settings: ServeSettings, *, log_level: str = "info", ui: UISettings | None = None
) -> None:
    """Bind, print the address, and run uvicorn until SIGTERM/SIGINT (graceful drain).

    ui: also mount the web dashboard (`shipyard.ui`) at /ui/.
    """
    import uvicorn

    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        raise ServeError(f"cannot bind {settings.host}:{settings.port} ({exc.strerror})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    port = sock.getsockname()[1]
    shown = f"[{settings.host}]" if family == socket.AF_INET6 else settings.host
    auth = "API keys" if settings.auth_enabled else "NO authentication"
    print(
        f"shipyard serving on http://{shown}:{port} ({settings.workers} worker(s), {auth})",
        flush=True,
    )
    if ui is not None:
        print(f"dashboard: http://{shown}:{port}/ui/ (runs from {ui.runs_dir})", flush=True)
        ui.to_env()
    if settings.workers > 1:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="shipyard-metrics-")
    settings.to_env()
    common: dict[str, Any] = {
        "log_level": log_level,
        "access_log": False,  # shipyard writes its own JSON access log
        "lifespan": "on",
        "timeout_graceful_shutdown": None,
    }
    if settings.workers == 1:
        from shipyard.serve.app import create_app
        from shipyard.ui.app import create_ui_app

        app = create_app(settings) if ui is None else create_ui_app(settings, ui)
        config = uvicorn.Config(app, **common)
        server = uvicorn.Server(config)
        # uvicorn drains, then re-raises the signal it caught; after a clean drain that
        # re-raise lands here and the process exits 0 (what orchestrators expect)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        server.run(sockets=[sock])
        if not server.started:
            sys.exit(3)
        return
    from uvicorn.supervisors import Multiprocess

    # each worker imports the factory in a fresh process and reads the settings from the env
    config = uvicorn.Config(
        "shipyard.serve.app:app_from_env" if ui is None else "shipyard.ui.app:serve_app_from_env",
        factory=True,
        workers=settings.workers,
        timeout_worker_healthcheck=300,  # a worker imports torch and loads models first
        **common,
    )
    Multiprocess(config, sockets=[sock]).run()


def _default_keys_file() -> Path:
    from shipyard.serve.auth import default_keys_file

    return default_keys_file()


# ------------------------------------------------------------------------------ predict


def predict(
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help="Server base URL."),
    model: str = typer.Option(..., "--model", "-m", help="Model name."),
    input_file: Path = typer.Option(
        ..., "--input", "-i", help='JSON: {"instances": [...]}, a list, or a V2 {"inputs": ...}.'
    ),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="SHIPYARD_API_KEY", help="API key (or $SHIPYARD_API_KEY)."
    ),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds to wait."),
) -> None:
    """Send one prediction request and print the JSON answer.

    Example: shipyard predict --model digits --input examples/digits-request.json

    A file with {"inputs": [...]} goes to the KServe V2 route, anything else to :predict.
    """
    import httpx

    try:
        payload = json.loads(input_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ServeError(f"{input_file}: cannot read JSON input ({exc})") from None
    if isinstance(payload, list):
        payload = {"instances": payload}
    if not isinstance(payload, dict):
        raise ServeError(f"{input_file}: expected a JSON object or list")
    base = url.rstrip("/")
    route = (
        f"{base}/v2/models/{model}/infer"
        if "inputs" in payload
        else f"{base}/v1/models/{model}:predict"
    )
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.post(route, json=payload, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise ServeError(f"cannot reach {base} ({exc})") from None
    try:
        body = response.json()
    except ValueError:
        body = {"error": response.text[:500]}
    if response.status_code >= 400:
        message = body.get("error", body) if isinstance(body, dict) else body
        raise ServeError(f"server answered {response.status_code}: {message}")
    typer.echo(json.dumps(body, indent=2))
