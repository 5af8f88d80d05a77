"""The inference core every protocol shares: loaded models, their batchers, input checks.

A protocol adapter parses its wire format into named numpy arrays, calls `ModelRepository.get`
and `ServedModel.infer`, and encodes the outputs. Nothing here knows about HTTP bodies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from shipyard.package import (
    InvalidInputError,
    LoadedModel,
    TensorSpec,
    conform_input,
    load_package,
)
from shipyard.package.registry import Registry
from shipyard.serve import lm, metrics
from shipyard.serve.adapters import load_adapter
from shipyard.serve.batching import Batcher, Outputs
from shipyard.serve.errors import BadRequest, Conflict, DeadlineExceeded, NotFound, Unavailable
from shipyard.serve.settings import MODEL_NAME, ServeError, ServeSettings

if TYPE_CHECKING:
    from shipyard.generate import Engine

log = logging.getLogger("shipyard.serve")

# A request starts watching for its client's disconnect only after waiting this long.
WATCH_AFTER_S = 0.05

# KServe V2 datatype ↔ numpy dtype (BYTES are object arrays of str/bytes)
V2_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}


def v2_datatype(arr: np.ndarray) -> str:
    """The KServe V2 datatype of a numpy array."""
    if arr.dtype.kind in "OUS":
        return "BYTES"
    for name, dtype in V2_TO_NUMPY.items():
        if dtype == arr.dtype and name != "BYTES":
            return name
    raise TypeError(f"no KServe V2 datatype for numpy dtype {arr.dtype}")


def check_model_name(name: str) -> str:
    """A model name from a URL: 404 unless it matches MODEL_NAME (so it is safe to log/echo)."""
    if not MODEL_NAME.match(name):
        raise NotFound("unknown model (names match ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$)")
    return name


@dataclass(eq=False)
class ServedModel:
    """One loaded model version with its batcher (and, for a language model, its generation
    engine, which the OpenAI routes use)."""

    name: str
    version: str
    loaded: LoadedModel
    batcher: Batcher
    load_seconds: float
    source: str  # the package path or registry ref it came from
    loaded_at: float = field(default_factory=time.time)
    engine: Engine | None = None

    @property
    def input_spec(self) -> TensorSpec:
        return self.loaded.signature.inputs[0]

    def check_input(self, name: str | None, datatype: str, arr: np.ndarray) -> np.ndarray:
        """Check one input against the signature (package.conform_input, after the name and the
        declared datatype); BadRequest names the field and what's expected."""
        spec = self.input_spec
        if name is not None and name != spec.name:
            raise BadRequest(
                f"unknown input {name!r}: model {self.name!r} takes one input, {spec.name!r} "
                f"({spec.datatype}, shape {spec.shape})"
            )
        if datatype != spec.datatype:
            raise BadRequest(
                f"input {spec.name!r}: datatype {datatype} does not match the model's "
                f"{spec.datatype}"
            )
        try:
            return conform_input(spec, arr, vocab_size=self.loaded.manifest.data.get("vocab_size"))
        except InvalidInputError as exc:
            raise BadRequest(str(exc)) from None

    async def infer(
        self,
        x: np.ndarray,
        *,
        timeout_s: float,
        disconnected: Callable[[], Awaitable[Any]] | None = None,
    ) -> Outputs:
        """Run `x` (N, ...) through the batcher; 503 when the queue is full, 504 on timeout.

        `disconnected`, when given, is awaited alongside once the request has waited
        `WATCH_AFTER_S`: if it returns (client gone) the request is withdrawn from the queue and
        `asyncio.CancelledError` is raised. Most requests finish before that, so they pay for
        two timer handles rather than a watcher task and an `asyncio.wait` each.
        """
        future = self.batcher.submit(x)  # no await before this: see Batcher.submit
        loop = asyncio.get_running_loop()
        expired = False
        watcher: asyncio.Future[Any] | None = None

        def expire() -> None:
            nonlocal expired
            expired = True
            future.cancel()

        def withdraw_if_gone(done: asyncio.Future[Any]) -> None:
            if not done.cancelled() and done.exception() is None:
                future.cancel()  # the client went away: drop its queued work

        def watch() -> None:
            nonlocal watcher
            assert disconnected is not None
            watcher = asyncio.ensure_future(disconnected())
            watcher.add_done_callback(withdraw_if_gone)

        deadline = loop.call_later(timeout_s, expire)
        watch_timer = (
            loop.call_later(min(WATCH_AFTER_S, timeout_s), watch)
            if disconnected is not None
            else None
        )
        try:
            return await future
        except asyncio.CancelledError:
            future.cancel()
            if expired:
                raise DeadlineExceeded(f"inference did not finish within {timeout_s:g}s") from None
            raise
        finally:
            deadline.cancel()
            if watch_timer is not None:
                watch_timer.cancel()
            if watcher is not None:
                watcher.cancel()


def _forward(loaded: LoadedModel) -> Callable[[np.ndarray], Outputs]:
    def run(x: np.ndarray) -> Outputs:
        with torch.inference_mode():
            return loaded.predict_arrays(x)

    return run


class ModelRepository:
    """The models this process serves: name → version → ServedModel, plus a default version.

    Every mutation happens on the event loop; swapping the default is one dict assignment, so a
    request sees either the old or the new version, never neither.
    """

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self._versions: dict[str, dict[str, ServedModel]] = {}
        self._default: dict[str, str] = {}
        self.configured: set[str] = set()  # model names loaded at start-up (readiness)
        self.started = False
        self._lock = asyncio.Lock()

    # -- lookup ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self._versions)

    def versions(self, name: str) -> dict[str, ServedModel]:
        return dict(self._versions.get(name, {}))

    def default_version(self, name: str) -> str | None:
        return self._default.get(name)

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """The served model for `name` (default version unless `version`); 404 when unknown."""
        check_model_name(name)
        versions = self._versions.get(name)
        if not versions:
            raise NotFound(f"unknown model {name!r}; loaded: {', '.join(self.names()) or 'none'}")
        key = version if version is not None else self._default[name]
        served = versions.get(key)
        if served is None:
            raise NotFound(
                f"model {name!r} has no loaded version {key!r}; loaded: "
                f"{', '.join(sorted(versions))}"
            )
        return served

    @property
    def ready(self) -> bool:
        """True when every model configured at start-up is loaded."""
        return self.started and all(name in self._versions for name in self.configured)

    # -- mutation -------------------------------------------------------------------------

    async def load(self, source: str | Path, *, make_default: bool = True) -> ServedModel:
        """Load, verify and serve a package directory (Path) or a registry ref (str).

        Served under the registry's NAME and VERSION for a ref, the manifest's for a directory.
        Loading runs in a thread; the event loop keeps serving meanwhile.
        """
        start = time.perf_counter()
        loaded, name, version = await asyncio.to_thread(self._load_sync, source)
        return await self.add(
            loaded,
            time.perf_counter() - start,
            name=name,
            version=version,
            source=str(source),
            make_default=make_default,
        )

    def _load_sync(self, source: str | Path) -> tuple[LoadedModel, str, str]:
        public_key = self.settings.public_key
        if isinstance(source, Path):
            loaded = load_package(source, public_key=public_key)
            return loaded, loaded.manifest.name, str(loaded.manifest.version)
        with Registry() as registry:
            mv = registry.get(source)
            path = registry.resolve_local(mv.ref, public_key=public_key)
        return load_package(path, public_key=public_key), mv.name, str(mv.version)

    async def load_adapter(self, name: str, path: Path, base: ServedModel) -> ServedModel:
        """Serve the LoRA adapter package at `path` as model `name`, on `base`'s weights (shared,
        not copied); ServeError when `name` is taken or the adapter was trained on another base.
        """
        if name in self._versions:
            raise ServeError(
                f"--adapter {name}={path}: a served model is already named {name!r}; choose "
                "another adapter name"
            )
        start = time.perf_counter()
        loaded = await asyncio.to_thread(
            load_adapter, name, path, base.loaded, public_key=self.settings.public_key
        )
        return await self.add(
            loaded,
            time.perf_counter() - start,
            name=name,
            source=f"{path} (adapter on {base.name}:{base.version})",
        )

    async def add(
        self,
        loaded: LoadedModel,
        load_seconds: float = 0.0,
        *,
        name: str | None = None,
        version: str | None = None,
        source: str = "",
        make_default: bool = True,
    ) -> ServedModel:
        """Serve an already loaded model; it becomes the default version unless told otherwise."""
        name = name if name is not None else loaded.manifest.name
        version = version if version is not None else str(loaded.manifest.version)
        if not MODEL_NAME.match(name) or not MODEL_NAME.match(version):
            raise Conflict(
                f"cannot serve {name!r} version {version!r}: names and versions must match "
                f"{MODEL_NAME.pattern}"
            )
        if len(loaded.signature.inputs) != 1:
            raise Conflict(
                f"model {name!r} has {len(loaded.signature.inputs)} inputs; serving supports "
                "models with exactly one input"
            )
        async with self._lock:
            if version in self._versions.get(name, {}):
                raise Conflict(f"model {name!r} version {version!r} is already loaded")
            s = self.settings
            batcher = Batcher(
                f"{name}:{version}",
                _forward(loaded),
                max_batch_size=s.max_batch_size,
                max_wait_ms=s.max_wait_ms,
                max_queue=s.max_queue,
                on_batch=metrics.batch_observer(name),
                on_queue_time=metrics.QUEUE_TIME.labels(model=name).observe,
                on_depth=metrics.depth_observer(name, version),
                client_errors=(InvalidInputError,),
            )
            batcher.start()
            served = ServedModel(name, version, loaded, batcher, load_seconds, source or name)
            if lm.supports_generation(loaded):
                served.engine = lm.start_engine(loaded, name, version, s)
            self._versions.setdefault(name, {})[version] = served
            if make_default or name not in self._default:
                self._default[name] = version
            metrics.LOAD_TIME.labels(model=name, version=version).set(load_seconds)
        log.info("loaded %s:%s in %.2fs", name, version, load_seconds)
        return served

    async def set_default(self, name: str, version: str) -> None:
        """Route unversioned requests for `name` to `version` (atomic)."""
        self.get(name, version)
        self._default[name] = version

    async def remove(self, name: str, version: str) -> None:
        """Stop routing to a version, then drain its queued and running requests."""
        async with self._lock:
            served = self.get(name, version)
            versions = self._versions[name]
            if self._default.get(name) == version and len(versions) > 1:
                raise Conflict(f"{name}:{version} is the default version; switch the default first")
            del versions[version]
            if not versions:
                del self._versions[name]
                self._default.pop(name, None)
        await _close(served)
        log.info("unloaded %s:%s", name, version)

    async def close(self) -> None:
        """Drain every batcher and generation engine (shutdown)."""
        for name in list(self._versions):
            for served in list(self._versions[name].values()):
                await _close(served)


async def _close(served: ServedModel) -> None:
    await served.batcher.close()
    if served.engine is not None:
        await lm.stop_engine(served.engine)


__all__ = [
    "MODEL_NAME",
    "V2_TO_NUMPY",
    "InvalidInputError",
    "ModelRepository",
    "ServedModel",
    "Unavailable",
    "check_model_name",
    "v2_datatype",
]
