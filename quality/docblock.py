"""Generated blocks in markdown files: a benchmark rewrites its own block and leaves the rest alone."""

from __future__ import annotations

from pathlib import Path


def replace_block(path: Path, name: str, block: str, heading: str | None = None) -> None:
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path``; when the
    markers are missing, append them (under ``heading`` when given) to the file, created if needed."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Model quality\n"
    if begin not in text:
        title = f"## {heading}\n\n" if heading else ""
        text = f"{text.rstrip()}\n\n{title}{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    path.write_text(f"{head}{begin}\n{block}\n{end}{rest.split(end, 1)[1]}")
