"""Where text comes from: user files, a Hugging Face dataset, or the corpus shipped in the package.

A corpus spec is `embedded` (the default: several hundred original passages in nla/data/corpus),
a `.txt` file (documents separated by blank lines), a `.jsonl` file with a `text` field, a
directory of those (read in sorted order), or `hf:NAME[:split]` (needs `datasets` and network).
Documents come back in a fixed order so that document ids are stable across runs and resumes.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from .errors import NLAError

EMBEDDED = "embedded"
EMBEDDED_DIR = Path(__file__).parent / "data" / "corpus"


def _read_txt(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise NLAError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise NLAError(f"{path}:{i}: each line needs a string field \"text\"")
            if row["text"].strip():
                docs.append(row["text"])
    return docs


def _read_file(path: Path) -> list[str]:
    try:
        if path.suffix == ".jsonl":
            return _read_jsonl(path)
        if path.suffix == ".txt":
            return _read_txt(path)
    except (OSError, UnicodeDecodeError) as e:
        raise NLAError(f"cannot read corpus file {path}: {e}") from None
    raise NLAError(f"unsupported corpus file {path}: use .txt (blank-line separated) or .jsonl")


def _read_hf(spec: str, max_docs: int | None) -> list[str]:
    parts = spec[3:].split(":")
    name, split = parts[0], (parts[1] if len(parts) > 1 else "train")
    try:
        import datasets
    except ImportError:
        raise NLAError("hf: corpora need the optional datasets package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # offline, unknown name, ...: one line either way
        raise NLAError(f"could not open dataset {name}[{split}]: {str(e).splitlines()[0][:200]}") from None
    docs = []
    for row in ds:
        if isinstance(row.get("text"), str) and row["text"].strip():
            docs.append(row["text"])
        if max_docs and len(docs) >= max_docs:
            break
    return docs


def read_corpus(spec: str = EMBEDDED, max_docs: int | None = None) -> list[str]:
    """All documents of a corpus spec, in a stable order; never empty."""
    if spec.startswith("hf:"):
        docs = _read_hf(spec, max_docs)
    else:
        path = EMBEDDED_DIR if spec == EMBEDDED else Path(spec).expanduser()
        if not path.exists():
            raise NLAError(f"corpus not found: {spec} (a .txt/.jsonl file, a directory, hf:NAME, or '{EMBEDDED}')")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
            if not files:
                raise NLAError(f"corpus directory {path} holds no .txt or .jsonl files")
            docs = [d for f in files for d in _read_file(f)]
        else:
            docs = _read_file(path)
    if max_docs:
        docs = docs[:max_docs]
    if not docs:
        raise NLAError(f"corpus {spec} is empty: no non-blank documents")
    return docs


def fingerprint(docs: list[str]) -> str:
    """Identifies the exact documents, so a resume on a changed corpus is refused, not mixed."""
    h = hashlib.sha256()
    for d in docs:
        h.update(hashlib.sha256(d.encode()).digest())
    return h.hexdigest()[:16]
