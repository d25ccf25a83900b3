"""Run configuration as dataclasses: validated on construction, and also the CLI's options.

Each field's metadata carries its help text; cli.py turns every field into a `--flag` so the
dataclass is the single place an option is defined. Presets are plain dicts of overrides.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, asdict

from .errors import NLAError


def opt(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise NLAError(msg)


@dataclass
class CollectConfig:
    model: str = opt("smollm2", "model: HF id or dir, a .gguf file, or 'smollm2' (embedded default)")
    layer: int = opt(20, "layer L = residual stream after decoder block L (0-indexed) = HF hidden_states[L+1]")
    corpus: str = opt("embedded", "corpus: .txt (blank-line separated), .jsonl (text field), a dir, hf:NAME[:split], or 'embedded'")
    out: str = opt("runs/smollm2-L20/acts", "output directory for shards + nla_acts.json")
    per_doc: int = opt(4, "positions sampled per document")
    min_pos: int = opt(16, "sample positions >= this (position 0 is an attention sink; early positions decode poorly)")
    max_docs: int = opt(0, "use at most this many documents (0 = all)")
    max_tokens: int = opt(512, "truncate documents to this many tokens")
    batch_size: int = opt(8, "documents per forward pass")
    shard_docs: int = opt(64, "documents per shard (the unit of resume)")
    heldout_frac: float = opt(0.1, "fraction of documents held out for evaluation")
    dtype: str = opt("float32", "storage dtype of vectors: float32 or bfloat16")
    device: str = opt("auto", "auto, cpu, cuda, cuda:1, ...")
    load_in_4bit: bool = opt(False, "load the base in 4-bit nf4 (bitsandbytes)")
    seed: int = opt(0, "seed for position sampling and the document split")
    overwrite: bool = opt(False, "replace a dataset of another model/layer/corpus in --out")

    def __post_init__(self):
        _check(self.layer >= 0, f"--layer must be >= 0, got {self.layer}")
        _check(self.per_doc >= 1, "--per-doc must be >= 1")
        _check(self.min_pos >= 1, "--min-pos must be >= 1 (position 0 is the attention sink)")
        _check(self.max_docs >= 0, "--max-docs must be >= 0")
        _check(self.max_tokens > self.min_pos, "--max-tokens must exceed --min-pos")
        _check(self.batch_size >= 1, "--batch-size must be >= 1")
        _check(self.shard_docs >= 1, "--shard-docs must be >= 1")
        _check(0.0 <= self.heldout_frac < 0.9, "--heldout-frac must be in [0, 0.9)")
        _check(self.dtype in ("float32", "bfloat16"), "--dtype must be float32 or bfloat16")


def to_dict(cfg) -> dict:
    return asdict(cfg)


def field_help(cls) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}
