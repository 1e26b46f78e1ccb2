"""Free local TCP ports, for the local broker, the demo, the benchmarks and the tests.

A port is free when binding it works; it is closed again at once, so nothing listens on it
(a client is refused) until someone binds it. Another process may take it in between, which
the callers accept: each binds it within moments.

>>> port = free_port()
>>> 1024 <= port <= 65535
True
>>> base = free_port(consecutive=3)
>>> all(is_free(p) for p in range(base, base + 3))
True
"""

from __future__ import annotations

import socket

HOST = "127.0.0.1"


def is_free(port: int, host: str = HOST) -> bool:
    """Whether ``port`` can be bound on ``host`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(consecutive: int = 1, host: str = HOST) -> int:
    """A port nothing listens on; with ``consecutive`` > 1, the first of that many free ports in a row."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port + consecutive <= 65536 and all(is_free(p, host) for p in range(port + 1, port + consecutive)):
            return port
    raise OSError(f"found no {consecutive} consecutive free ports on {host}")
