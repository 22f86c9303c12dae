"""Durable JSON-lines files: the study journal, the journals of `evaluate` and `confirm`, and the MLflow outbox.

    for record in read_records(path, what="the journal", fix="restore it from a backup"): ...
    with Appender(path) as f:          # cuts a torn last line off first, then appends (fsync on demand)
        f.write({"event": "trial", ...}, sync=True)

One record per line, appended, flushed and fsynced before it is acted on. The rules every reader and writer
here share:

- A torn last line (bytes without a final newline: a crash or a full disk in the middle of a write) never
  happened: readers skip it, and an `Appender` cuts it off (and fsyncs) before it writes anything, so a torn
  line never ends up in the middle of the file.
- Any other line that is not a JSON object is damage (an editor, a disk, another program): `DamagedFile`,
  naming the file, the line and the fix. Nothing is appended to a damaged file, since guessing could run an
  evaluation twice or lose one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


class DamagedFile(RuntimeError):
    """A JSON-lines file holds a line that is not a record: the message names the file, the line and the fix."""


def read_records(path: str | Path, what: str = "the file", fix: str = "restore it from a backup"):
    """The records of a JSON-lines file, in order; a torn last line is skipped, any other bad line raises."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    except IsADirectoryError:
        raise DamagedFile(f"{path} is a folder, not {what}: {fix}") from None
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline; else an unterminated (torn) last line
    del torn
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            record = None
        if not isinstance(record, dict):
            raise DamagedFile(f"{path}:{n} is not a JSON record: {what} is damaged (a line was overwritten or "
                              f"edited); {fix}")
        yield record


def cut_torn_tail(f) -> None:
    """Cut a file opened in 'ab+' (or 'rb+') back to its last complete line, and make that durable."""
    f.seek(0, os.SEEK_END)
    size = f.tell()
    if size == 0:
        return
    f.seek(size - 1)
    if f.read(1) == b"\n":
        f.seek(0, os.SEEK_END)
        return
    keep, chunk, pos = 0, 65536, size
    while pos > 0:  # the last newline, reading backwards
        start = max(0, pos - chunk)
        f.seek(start)
        cut = f.read(pos - start).rfind(b"\n")
        if cut >= 0:
            keep = start + cut + 1
            break
        pos = start
    f.truncate(keep)
    f.flush()
    os.fsync(f.fileno())
    f.seek(0, os.SEEK_END)


class Appender:
    """An open JSON-lines file for appending records (the torn tail cut off first)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "ab+")
        cut_torn_tail(self._f)

    def write(self, record: dict, sync: bool = True) -> None:
        cut_torn_tail(self._f)  # a write cut short since the last one (a full disk) never stays in the middle
        self._f.write((json.dumps(record, default=str) + "\n").encode())
        self._f.flush()
        if sync:
            os.fsync(self._f.fileno())

    def sync(self) -> None:
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "Appender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def append_record(path: str | Path, record: dict) -> None:
    """Append one record durably (open, cut a torn tail, write, fsync, close)."""
    with Appender(path) as f:
        f.write(record)
