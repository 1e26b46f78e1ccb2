"""A blocking client call the caller can stop waiting for (both drivers and the transactional producer use it)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Call(Generic[T]):
    """A blocking call run on a helper thread, so that the caller can stop waiting for it.

    For client calls that take no timeout (kafka-python's transactional calls) or ignore the one
    they take (a librdkafka commit on a wedged connection): ``wait`` returns whether it finished,
    ``result`` returns its value or raises its exception.
    """

    def __init__(self, call: Callable[[], T], name: str) -> None:
        self._box: dict[str, Any] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(call,), name=name, daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], T]) -> None:
        try:
            self._box["value"] = call()
        except BaseException as err:
            self._box["error"] = err
        finally:
            self._done.set()

    def wait(self, timeout_s: float) -> bool:
        return self._done.wait(max(0.0, timeout_s))

    def result(self) -> T:
        assert self._done.is_set(), "Call.result before the call finished"
        if "error" in self._box:
            raise self._box["error"]
        return self._box["value"]

    def within(self, timeout_s: float, on_timeout: Callable[[], BaseException]) -> T:
        """The result, or ``on_timeout()`` raised when the call takes longer than ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        if not self.wait(deadline - time.monotonic()):
            raise on_timeout()
        return self.result()
