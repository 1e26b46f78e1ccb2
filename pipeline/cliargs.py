"""Command-line pieces every ``fraud-*`` command shares: one-line errors, ``--version``.

Every error a command stops on is one line on stderr shaped as argparse's own, ``PROG: error: MESSAGE``
(:class:`OneLineParser` for the flags, :func:`print_error` for what is found after them).

>>> one_line("no\\nsuch file")
'no\\\\nsuch file'
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


def one_line(text: str) -> str:
    """``text`` with line breaks and other unprintable characters escaped, so it prints as one line."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def print_error(prog: str, message: str) -> None:
    """Print ``prog: error: message`` as one line on stderr."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)


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
