"""The NLA_* overrides that force a default choice one way or the other (0: off, 1: on), read in
one place so that a mistyped value is a one-line error rather than a silently kept default (and
NLA_ROLLOUT_ROWS, a count, beside them)."""
from __future__ import annotations

import os

from .errors import NLAError

NAMES = ("NLA_CUDA_GRAPH", "NLA_COMPILE_DECODE", "NLA_MERGE_SAMPLING", "NLA_PACKED_GQA", "NLA_FUSED_SAMPLING",
         "NLA_REF_IN_ROLLOUT", "NLA_COMMON_LEVEL", "NLA_FUSED_NORM", "NLA_AUTOTUNE_DECODE")


def forced(name: str) -> bool | None:
    """True where the variable is 1, False where 0, None where unset or empty (the default stands).
    Callers read it before any early return, so a bad value fails on every machine, not only on
    the one where the switch would matter."""
    v = os.environ.get(name, "").strip()
    if v == "":
        return None
    if v not in ("0", "1"):
        raise NLAError(f"{name} must be 0 or 1 (or unset for the default), got {v!r}")
    return v == "1"


def rows() -> int | None:
    """NLA_ROLLOUT_ROWS, the rows per rollout pass (grpo.pass_rows; 0: one pass), or None where unset."""
    v = os.environ.get("NLA_ROLLOUT_ROWS", "").strip()
    if v and not v.isdigit():
        raise NLAError(f"NLA_ROLLOUT_ROWS must be a number of rows (0: one pass), got {v!r}")
    return int(v) if v else None


def check() -> None:
    """Every switch, read once: the CLI calls this before any work, so a typo costs no run."""
    for name in NAMES:
        forced(name)
    rows()
