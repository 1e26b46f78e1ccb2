"""argparse pieces for ``fraud-produce``: errors on one line, value types that say what is wrong, ``--version``.

>>> one_line("no\\nsuch file")
'no\\\\nsuch file'
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import NoReturn

from pipeline.errors import ConfigError
from producer.simconfig import start_day


def one_line(text: str) -> str:
    """``text`` with line breaks and other unprintable characters escaped, so it prints as one line."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (no usage block) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.split()[0]
        self.exit(2, f"{command}: error: {one_line(message)} (see {self.prog} --help)\n")


class VersionAction(argparse.Action):
    """``--version``: the installed package's version, looked up only when asked for."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> NoReturn:
        print(f"{parser.prog} {package_version()}")
        parser.exit(0)


def package_version() -> str:
    """The installed ``fraud-pipeline`` version (the source tree's when it is not installed)."""
    from importlib import metadata

    try:
        return metadata.version("fraud-pipeline")
    except metadata.PackageNotFoundError:
        from pipeline import __version__

        return __version__


def number(kind: type, low: float, what: str, *, high: float = math.inf, hint: str = "") -> Callable[[str], float]:
    """An argparse ``type=``: ``kind`` from text, finite and within ``[low, high]``, else a clear error."""

    def convert(text: str) -> float:
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            value = None
        if value is None or not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what}{hint}, got {text!r}")
        return value

    return convert


def iso_day(text: str) -> str:
    """An argparse ``type=`` for ``--start-date``: the date as YYYY-MM-DD, in the range the simulator handles."""
    try:
        return start_day(text).isoformat()
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err).replace("start_date ", "")) from err


def report(message: str, prog: str = "fraud-produce") -> None:
    """Print an error as the one line a user sees."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
