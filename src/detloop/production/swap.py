"""The served model and its hot swap: a loaded registry version, and the alias watcher that loads a newly
promoted (or rolled back) holder beside the serving one and swaps it in."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from detloop.core.errors import BadInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """One loaded registry version."""

    name: str
    version: str
    model: object  # mlflow.pyfunc.PyFuncModel
    loaded_at: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def runtime(self) -> dict:
        """What runs the version: ``{"runtime": "onnx"|"torch", "providers": [...], "threads": N}`` (threads:
        ONNX Runtime's CPU threads; None for PyTorch or a GPU provider)."""
        inner = self.model.unwrap_python_model()
        return {
            "runtime": getattr(inner, "runtime", "torch"),
            "providers": list(getattr(inner, "providers", ["torch"])),
            "threads": getattr(inner, "threads", None),
        }


def load_version(name: str, version: str, model_config: dict | None = None) -> ServedModel:
    """Load ``models:/name/version`` and warm it up with the model's input example.

    ``model_config`` overrides keys of the config recorded in the model (e.g. ``runtime``, ``threads``)."""
    import mlflow.pyfunc

    from detloop.model.pyfunc import input_example

    started = time.perf_counter()
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}", model_config=model_config or None)
    model.predict(input_example())  # the first prediction pays for lazy set-up; not a user's request
    log.info("loaded %s version %s in %.1f s", name, version, time.perf_counter() - started)
    return ServedModel(name, str(version), model, datetime.now(UTC).isoformat(timespec="seconds"))


@dataclass
class WatchState:
    """What the alias watcher last saw (shown by /health)."""

    checked_at: str | None = None
    error: str | None = None
    failed_version: str | None = None  # a holder that failed to load; retried when the alias moves again
    swaps: list[dict] = field(default_factory=list)


class ModelWatcher:
    """Serves the holder of ``alias``: polls it and swaps a newly promoted (or rolled back) version in."""

    def __init__(
        self,
        name: str,
        alias: str,
        poll_seconds: float,
        loader: Callable[[str, str], ServedModel] = load_version,
        *,
        oversee: Callable[[], object] | None = None,
        may_serve: Callable[[str], tuple[bool, str]] | None = None,
    ):
        """``oversee`` runs after each lookup (records alias moves made outside detloop, applies the policy);
        ``may_serve(version)`` says whether a new holder may be swapped in (``(False, why)``: keep serving)."""
        self.name, self.alias, self.poll_seconds = name, alias, float(poll_seconds)
        self.loader = loader
        self.oversee, self.may_serve = oversee, may_serve
        self.state = WatchState()
        self._current: ServedModel | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> ServedModel:
        """The version serving now (read once per request)."""
        if self._current is None:
            raise RuntimeError("no model loaded: call ModelWatcher.load() first")
        return self._current

    def holder(self) -> str | None:
        from detloop.tracking.registry import alias_holder

        return alias_holder(self.name, self.alias)

    def overseen_holder(self) -> str | None:
        """The alias holder, read before the oversight check: a move made outside detloop is recorded (and the
        policy applied) before its version is served. Read again while the check finds something new (a move
        put back, or one made between the two reads)."""
        version = self.holder()
        for _ in range(3):
            if self.oversee is None or not self.oversee():
                break
            version = self.holder()
        return version

    def servable(self) -> str:
        """The version to serve at start (after the oversight check); BadInput (exit 2) when no version holds
        the alias."""
        version = self.overseen_holder()
        if version is None:
            raise BadInput(
                f"nothing to serve: no version of {self.name} holds '{self.alias}'",
                [
                    "promote one first: detloop promote VERSION --reviewer NAME --reason TEXT",
                    "or serve another alias: serve.alias=staging",
                ],
            )
        return version

    def load(self) -> ServedModel:
        """Load the alias holder at start; BadInput (exit 2) when no version holds the alias."""
        version = self.servable()
        self._current = self.loader(self.name, version)
        self.state.checked_at = now_iso()
        return self._current

    def check(self) -> bool:
        """Look up the alias once; load and swap in a new holder. True when the served version changed."""
        try:
            version = self.overseen_holder()
        except Exception as err:  # registry unreachable: keep serving what is loaded
            self.state.error = f"alias lookup failed: {err}"
            log.warning("%s; still serving v%s", self.state.error, self.current.version)
            return False
        self.state.checked_at = now_iso()
        if version is None:
            self.state.error = f"no version holds '{self.alias}'; still serving v{self.current.version}"
            log.warning("%s", self.state.error)
            return False
        if version == self.state.failed_version:  # its load error stays shown until the alias moves again
            return False
        if version == self.current.version:
            self.state.error, self.state.failed_version = None, None
            return False
        if self.may_serve is not None:
            allowed, why = self.may_serve(version)
            if not allowed:
                self.state.error = f"not swapping to v{version}: {why}; still serving v{self.current.version}"
                log.warning("%s", self.state.error)
                return False
        try:
            loaded = self.loader(self.name, version)
        except Exception as err:  # a broken version must not take the server down
            self.state.error = (
                f"loading v{version} failed ({type(err).__name__}: {err}); still serving v{self.current.version}"
            )
            self.state.failed_version = version
            log.error("%s", self.state.error)
            return False
        previous = self.current.version
        self._current = loaded  # the swap: one reference assignment; requests in flight keep their model
        self.state.error, self.state.failed_version = None, None
        self.state.swaps.append({"from": previous, "to": version, "at": loaded.loaded_at})
        log.info("'%s' moved: now serving %s version %s (was %s)", self.alias, self.name, version, previous)
        return True

    def start(self) -> None:
        """Poll the alias every ``poll_seconds`` in a daemon thread."""
        if self.poll_seconds <= 0:
            log.info(
                "serve.poll_seconds=%s: the alias is not polled; restart to serve a new version", self.poll_seconds
            )
            return
        self._thread = threading.Thread(target=self._poll, name="alias-watcher", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.check()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
