"""Atomic file writes: a reader (or a resumed run) never sees half a file.

Everything we persist goes through here: write to a temp file in the same directory, fsync,
then rename over the target (rename is atomic on POSIX within one filesystem).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) then move tmp_path onto path atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path, text: str) -> None:
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, w)


def write_json(path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def save_tensors(path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def append_jsonl(path, rows: list[dict]) -> None:
    """Append whole lines and fsync; a torn last line is skipped by read_jsonl."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path, repair: bool = False) -> list[dict]:
    """Rows up to the first torn line (a kill mid-write); repair=True rewrites the file without it
    so that later appends do not land after garbage."""
    rows, torn = [], False
    if not os.path.exists(path):
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                torn = True
                break
    if torn and repair:
        write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows
