"""`nla-cli explain`: what an NLA says about chosen tokens of a prompt, and how much of each
activation its own AR can rebuild from that text.

The target runs only as far as the NLA's layer (early exit); each chosen token's residual goes
into the AV, and the AR scores the explanation: FVE = 1 - MSE / MSE_mean (the checkpoint's
predict-the-mean MSE) and cosine. Greedy by default; with --samples K, K explanations are
sampled per token and the best by FVE is kept, with the spread as a sign of how sure the AV is.
--min-confidence P shows only the sentences the AV was sure of (nla/confidence.py).
Without --checkpoint, the NLA shipped inside the package for the model and layer is used.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import statistics
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import LAYER_CONVENTION, lora, reference
from .confidence import confident
from .config import _check, opt
from .errors import NLAError
from .metrics import score_vectors
from .models import EMBEDDED_ALIAS, load_base, residual

SHIPPED = Path(__file__).parent / "data" / "checkpoints"
DEFAULT_LAYER = 20  # the layer of the NLA shipped for the embedded model
_TOKENS = re.compile(r"(\d+)(?:\.\.(\d+))?")


@dataclass
class ExplainConfig:
    prompt: str = field(default=None, metadata={"help": "the text whose token activations to explain", "argument": True})
    layer: int = opt(-1, f"layer L = {LAYER_CONVENTION} (default: the checkpoint's; {DEFAULT_LAYER} for the shipped NLA)")
    model: str = opt("", f"target model (default: the checkpoint's base model, else '{EMBEDDED_ALIAS}')")
    checkpoint: str = opt("", "NLA checkpoint: RUN/rl, a run dir, a reference-layout dir (av/ + ar/) or AV_DIR,AR_DIR "
                              "(default: the one shipped for the model and layer)")
    tokens: str = opt("last", "which prompt tokens: last, all, I..J (0-indexed, inclusive) or I")
    samples: int = opt(1, "K > 1: sample K explanations per token at --temperature, keep the best by FVE, show the spread")
    temperature: float = opt(1.0, "sampling temperature when --samples > 1 (one sample is greedy)")
    chat: bool = opt(False, "wrap the prompt in the model's chat template (a user turn, generation prompt on)")
    json: bool = opt(False, "print JSON with a stable schema instead of a table")
    max_new: int = opt(64, "length cap of an explanation in tokens")
    acts: str = opt("", "activation dataset whose predict-the-mean MSE scales FVE (only for reference-layout "
                        "checkpoints, whose sidecar has none)")
    batch_size: int = opt(16, "explanations generated per forward pass")
    device: str = opt("auto", "auto, cpu, cuda, ...")
    load_in_4bit: bool = opt(False, "4-bit nf4 base (bitsandbytes)")
    seed: int = opt(0, "seed for sampling")
    min_confidence: float = opt(0.0, "leave out the sentences whose least sure content word the AV wrote at a "
                                     "probability under this (e.g. 0.1: mostly its guesses); 0 = as written")

    def __post_init__(self):
        _check(bool(self.prompt and self.prompt.strip()), 'a prompt is required: nla-cli explain "some text" ...')
        parse_tokens(self.tokens)
        _check(self.layer >= -1, f"--layer must be >= 0, got {self.layer}")
        _check(self.samples >= 1, "--samples must be >= 1")
        _check(self.temperature > 0, "--temperature must be > 0")
        _check(self.max_new >= 4, "--max-new must be >= 4")
        _check(self.batch_size >= 1, "--batch-size must be >= 1")
        _check(0 <= self.min_confidence < 1, f"--min-confidence must be in [0, 1), got {self.min_confidence}")


def parse_tokens(spec: str, n: int | None = None) -> list[int]:
    """--tokens -> sorted prompt indices; with n=None only the syntax is checked."""
    s = spec.strip()
    if s in ("last", "all"):
        return [] if n is None else [n - 1] if s == "last" else list(range(n))
    m = _TOKENS.fullmatch(s)
    if not m:
        raise NLAError(f"--tokens must be last, all, I..J or I (0-indexed, inclusive), got {spec!r}")
    i, j = int(m[1]), int(m[2] if m[2] is not None else m[1])
    if i > j:
        raise NLAError(f"--tokens {s} is an empty range ({i} > {j}); write I..J with I <= J")
    if n is not None and j >= n:
        raise NLAError(f"--tokens {s} is out of range: the prompt has {n} tokens (indices 0..{n - 1})")
    return list(range(i, j + 1))


def model_slug(model: str) -> str:
    if model == EMBEDDED_ALIAS:
        return EMBEDDED_ALIAS
    name = Path(model.rstrip("/")).name
    return (name[:-5] if name.endswith(".gguf") else name).lower()


def shipped_checkpoint(model: str, layer: int) -> Path:
    return SHIPPED / f"{model_slug(model)}-L{layer}"


def _how_to_train(model: str, layer: int) -> str:
    slug = model_slug(model)
    other = sorted(p.name for p in SHIPPED.glob(f"{slug}-L*")) if SHIPPED.exists() else []
    shipped = f" (shipped for it: {', '.join(other)})" if other else ""
    run = f"runs/{slug}-L{layer}"
    return (f"no NLA checkpoint for {model} layer {layer}{shipped}; train one: nla-cli collect --model {model} "
            f"--layer {layer} --out {run}/acts && nla-cli train --acts {run}/acts --out {run} "
            f"(add --preset cpu-smoke for a quick one), then pass --checkpoint {run}/rl")


def choose_checkpoint(cfg: ExplainConfig) -> tuple[reference.Located, str, int]:
    """(checkpoint, model, layer) for a request, refusing a mismatch before any model loads."""
    if cfg.checkpoint:
        loc = reference.locate(cfg.checkpoint)
        model = cfg.model or loc.base_model
        if not model:
            raise NLAError(f"checkpoint {loc} does not name its base model (reference sidecars do not); pass --model "
                           f"with the model it was trained on (a local Hugging Face directory or hub id)")
        layer = cfg.layer if cfg.layer >= 0 else loc.layer
    else:
        model = cfg.model or EMBEDDED_ALIAS
        layer = cfg.layer if cfg.layer >= 0 else DEFAULT_LAYER
        path = shipped_checkpoint(model, layer)
        if not path.exists():
            raise NLAError(_how_to_train(model, layer))
        loc = reference.locate(str(path))
    reference.check_match(loc, "the request", model=model, layer=layer)
    return loc, model, layer


def prompt_ids(tok, prompt: str, chat: bool) -> list[int]:
    if not chat:
        return tok(prompt)["input_ids"]  # as collect tokenises documents
    if not getattr(tok, "chat_template", None):
        raise NLAError("--chat: this model's tokenizer has no chat template")
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def mse_mean_for(nla: reference.NLA, acts: str) -> float | None:
    if math.isfinite(nla.spec.mse_mean):
        return float(nla.spec.mse_mean)
    if acts:
        from .collect import SIDECAR
        side = Path(acts) / SIDECAR
        if not side.exists():
            raise NLAError(f"--acts {acts}: no activation dataset there (missing {SIDECAR})")
        return float(json.loads(side.read_text())["mse_mean"]["train"])
    print("[nla] this checkpoint carries no predict-the-mean MSE, so FVE is left out (cosine only); pass "
          "--acts DIR with an activation dataset of this model and layer to get it", file=sys.stderr)
    return None


def explain_vectors(nla: reference.NLA, vectors: torch.Tensor, mse_mean: float | None, samples: int = 1,
                    temperature: float = 1.0, max_new: int = 64, seed: int = 0, batch_size: int = 16,
                    min_confidence: float = 0.0) -> list[dict]:
    """Per vector: the explanation (best of `samples` by FVE; greedy when samples == 1) and its scores,
    less its unsure sentences when min_confidence > 0 (scored as shown; `written` keeps the whole)."""
    k = samples
    reps = vectors.float().repeat_interleave(k, 0)
    out = nla.explain_all(reps, max_new, temperature if k > 1 else 0.0, seed, batch_size, desc="explain",
                          disable=len(vectors) <= 3)
    texts = confident(nla, reps, out, min_confidence, batch_size)
    sc = score_vectors(nla.reconstruct(texts, batch_size), reps, mse_mean)
    rows = []
    for t in range(len(vectors)):
        group = [dict(explanation=texts[r], fve=sc["row_fve"][r] if sc["row_fve"] else None, cos=sc["row_cos"][r],
                      ok=out[r].ok, **(dict(written=out[r].text) if min_confidence > 0 else {}))
                 for r in range(t * k, (t + 1) * k)]
        best = max(group, key=lambda g: g["cos"])  # same order as FVE: MSE = 2(1 - cos)
        row = dict(best)
        if k > 1:
            fves, coss = [g["fve"] for g in group], [g["cos"] for g in group]
            row.update(samples=group, cos_spread=max(coss) - min(coss),
                       fve_spread=max(fves) - min(fves) if mse_mean is not None else None,
                       fve_std=statistics.pstdev(fves) if mse_mean is not None else None)
        rows.append(row)
    return rows


def explain(cfg: ExplainConfig) -> dict:
    loc, model, layer = choose_checkpoint(cfg)
    base = load_base(model, device=cfg.device, load_in_4bit=cfg.load_in_4bit)
    base.check_layer(layer)
    reference.check_match(loc, f"model {base.name}", d_model=base.d_model)
    nla = reference.load(loc, base, cfg.device, cfg.load_in_4bit)
    mse_mean = mse_mean_for(nla, cfg.acts)
    tok = base.tokenizer
    ids = prompt_ids(tok, cfg.prompt, cfg.chat)
    idx = parse_tokens(cfg.tokens, len(ids))
    with torch.no_grad(), lora.use(base.model, None):  # the plain target, whatever adapters are attached
        h = residual(base.model, layer, torch.tensor([ids], device=base.device))[0].float()
    rows = explain_vectors(nla, h[idx].cpu(), mse_mean, cfg.samples, cfg.temperature, cfg.max_new, cfg.seed,
                           cfg.batch_size, cfg.min_confidence)
    decoding = "greedy" if cfg.samples == 1 else f"best of {cfg.samples} sampled at temperature {cfg.temperature:g}"
    if cfg.min_confidence > 0:
        decoding += f", sentences written at p < {cfg.min_confidence:g} left out"
    result = dict(model=base.name, layer=layer, checkpoint=str(loc), prompt=cfg.prompt, chat=cfg.chat,
                  decoding=decoding, mse_mean=mse_mean,
                  tokens=[dict(index=i, token=tok.decode([ids[i]]), **r) for i, r in zip(idx, rows)])
    print(json.dumps(result, ensure_ascii=False, indent=1) if cfg.json else render_table(result))
    return result


def _num(x, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def render_table(result: dict, width: int | None = None) -> str:
    """An aligned table; the explanation column takes what the terminal has left and wraps."""
    width = width or shutil.get_terminal_size((100, 24)).columns
    rows = result["tokens"]
    spread = any("samples" in r for r in rows)
    toks = [repr(r["token"]) if len(repr(r["token"])) <= 16 else repr(r["token"])[:15] + "…" for r in rows]
    cols = [("#", max(1, *(len(str(r["index"])) for r in rows)), [str(r["index"]) for r in rows], ">"),
            ("token", max(5, *map(len, toks)), toks, "<"),
            ("FVE", 6, [_num(r["fve"], ".3f") for r in rows], ">"),
            ("cos", 6, [_num(r["cos"], ".3f") for r in rows], ">")]
    if spread:  # of FVE, or of cosine where FVE is unknown
        sp = [r.get("fve_spread") if r.get("fve_spread") is not None else r.get("cos_spread") for r in rows]
        cols.append(("spread", 6, [_num(x, ".3f") for x in sp], ">"))
    left = sum(w + 2 for _, w, _, _ in cols)
    text_w = max(24, width - left - 1)
    lines = [f"{result['model']} layer {result['layer']}, checkpoint {result['checkpoint']}, {result['decoding']}"
             + ("" if not spread else " (spread = max - min FVE over the samples)"),
             "  ".join(f"{name:{al}{w}}" for name, w, _, al in cols) + "  explanation"]
    for k, r in enumerate(rows):
        text = r["explanation"] or "(empty)"
        wrapped = textwrap.wrap(text + ("" if r["ok"] else " [no closing tag]"), text_w) or [""]
        lines.append("  ".join(f"{vals[k]:{al}{w}}" for _, w, vals, al in cols) + "  " + wrapped[0])
        lines += [" " * left + cont for cont in wrapped[1:]]
    return "\n".join(lines)
