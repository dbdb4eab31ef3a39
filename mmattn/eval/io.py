"""Small file helpers shared by the evaluators and the evaluation harness.

Two promises matter for evaluation runs:

* An output file is either complete or absent. Results are written to a temporary file in the same
  directory and moved over the target with ``os.replace`` (atomic on POSIX and Windows), so a crash or a
  bad input never leaves a half-written summary that a later step could mistake for a result.
* Bad input is reported with the file and line number, as :class:`EvalInputError`, which the CLI turns
  into a one-line message and exit status 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike[str]


class EvalInputError(ValueError):
    """An evaluator input (file, record, option) is missing or malformed; the message names what and where."""


# ----------------------------------------------------------------------------------------------- reading


def _open_text(path: PathLike):
    path = Path(path)
    if not path.exists():
        raise EvalInputError(f"{path}: no such file")
    if path.is_dir():
        raise EvalInputError(f"{path}: is a directory, expected a file")
    # utf-8-sig: files saved by some editors start with a byte-order mark, which json rejects.
    return open(path, encoding="utf-8-sig")


def read_json(path: PathLike) -> Any:
    """Parse a whole JSON file; a syntax error is reported with its line and column."""
    with _open_text(path) as handle:
        text = handle.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise EvalInputError(f"{path}:{error.lineno}:{error.colno}: invalid JSON: {error.msg}") from None


def iter_jsonl(path: PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSON Lines file.

    Universal-newline reading accepts LF and CRLF files alike (the official POPE files use both).
    Every line must hold one JSON object; the first bad line raises :class:`EvalInputError`.
    """
    with _open_text(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise EvalInputError(f"{path}:{line_number}: invalid JSON: {error.msg}") from None
            if not isinstance(record, dict):
                raise EvalInputError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            yield line_number, record


def read_jsonl(path: PathLike) -> list[dict[str, Any]]:
    """All objects of a JSON Lines file, in order (see :func:`iter_jsonl`)."""
    return [record for _, record in iter_jsonl(path)]


def read_records(path: PathLike) -> list[tuple[int, dict[str, Any]]]:
    """``(line_number, object)`` pairs from either a JSON Lines file or a JSON array of objects.

    Reference tools disagree on the container (POPE's COCO files are JSON Lines, its SEEM files and some
    caption dumps are JSON arrays), so both are accepted; the first non-blank character decides. For an
    array the "line number" is the element's 1-based position.
    """
    with _open_text(path) as handle:
        head = handle.read(4096).lstrip()
    if head.startswith("["):
        data = read_json(path)
        records = []
        for position, record in enumerate(data, start=1):
            if not isinstance(record, dict):
                raise EvalInputError(f"{path}: element {position}: expected a JSON object, got {type(record).__name__}")
            records.append((position, record))
        return records
    return list(iter_jsonl(path))


# ----------------------------------------------------------------------------------------------- writing


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old file, or the whole new one."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file 0600; give the result the permissions a plain open() would have.
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


@contextlib.contextmanager
def directory_replaced_on_success(path: PathLike) -> Iterator[Path]:
    """Yield an empty folder beside ``path`` to write into; when the block succeeds it takes ``path``'s place (the
    old folder, if any, is deleted), when it fails it is deleted and ``path`` is left as it was. An interrupted
    training run thus never leaves a half-written model where a complete one is expected."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield temporary
        os.chmod(temporary, 0o777 & ~_umask())
        if path.exists():
            previous = path.parent / f".{path.name}.previous-{os.getpid()}"
            os.replace(path, previous)
            os.replace(temporary, path)
            shutil.rmtree(previous)
        else:
            os.replace(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_json_atomic(path: PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Atomically write one JSON document (UTF-8, trailing newline)."""
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: PathLike, records: Iterable[Any]) -> None:
    """Atomically write a JSON Lines file, one compact object per line."""
    write_text_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
