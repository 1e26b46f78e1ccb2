"""Hot reload: notice a new model version, load and validate it off the scoring path.

The trainer publishes a version by switching the ``current`` link in the model root
atomically. The watcher looks every few seconds; a new version is loaded and validated
on the watcher's thread and handed over with ``take()``, which the worker calls between
batches. A version that fails validation is refused, logged and counted once, and the
model in service keeps serving.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from pipeline.artifact import CURRENT
from pipeline.errors import ModelArtifactError
from pipeline.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)


REMOVED = object()  # what ``take`` returns once a watched challenger link is gone


def model_fingerprint(model_dir: Path, link: str = CURRENT) -> tuple[str, int, int] | None:
    """What identifies the version a model directory points at: real path and manifest stamp. ``link``
    ``challenger``: the root's challenger link only (None without one)."""
    if link != CURRENT and not (model_dir / link).exists():
        return None
    real = Path(os.path.realpath(model_dir / link if (model_dir / link).exists() else model_dir))
    try:
        stat = (real / "manifest.json").stat()
    except OSError:
        return None
    return str(real), stat.st_mtime_ns, stat.st_size


class ModelWatcher:
    """Polls a model directory on a daemon thread; ``take()`` returns a newly loaded model once."""

    def __init__(self, model_dir: Path | str, load: Callable[[Path], object], metrics: WorkerMetrics,
                 interval_s: float = 5.0, link: str = CURRENT) -> None:
        """``link``: the model root's link to follow (``current``, or ``challenger``: ``take`` then returns
        ``REMOVED`` once when the link goes)."""
        self.model_dir = Path(model_dir)
        self.load = load
        self.metrics = metrics
        self.interval_s = interval_s
        self.link = link
        self._seen = model_fingerprint(self.model_dir, link)
        self._ready: object | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.interval_s > 0:
            self._thread = threading.Thread(target=self._loop, name="model-watcher", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def take(self) -> object | None:
        """The model loaded since the last call, if any."""
        with self._lock:
            ready, self._ready = self._ready, None
        return ready

    def check(self) -> bool:
        """Look once; True when a new version was loaded and is ready to take."""
        current = model_fingerprint(self.model_dir, self.link)
        if current is None and self.link != CURRENT and self._seen is not None:
            self._seen = None
            with self._lock:
                self._ready = REMOVED
            log.info("the model root's %s link is gone", self.link)
            return True
        if current is None or current == self._seen:
            return False
        self._seen = current
        try:
            loaded = self.load(Path(current[0]))
        except ModelArtifactError as err:
            self.metrics.reloads.labels("refused").inc()
            log.error("refused new model at %s: %s; the current model keeps serving", current[0], err)
            return False
        with self._lock:
            self._ready = loaded
        self.metrics.reloads.labels("ok").inc()
        log.info("new model at %s loaded; it serves from the next batch%s", current[0],
                 "" if self.link == CURRENT else f" (as the {self.link})")
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # the watcher must never die; the error is logged and counted
                self.metrics.errors.labels("model_watch").inc()
                log.exception("model watcher failed; will look again")
