"""`nla-cli collect`: residual-stream vectors of a model at one layer, from a corpus, to shards.

Layer L is the residual after decoder block L (hidden_states[L+1]); the forward stops there.
Each document gets up to K positions >= min_pos (special tokens skipped), sampled from a seed
keyed by the document id, and documents are split into sft_av / sft_ar / rl / heldout by a
seeded permutation, so the whole dataset is a pure function of (corpus, model, config).
Shards cover fixed document ranges and are written atomically; a killed run resumes at the
first missing shard and ends with the same files an uninterrupted run writes.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from . import LAYER_CONVENTION
from .config import CollectConfig, to_dict
from .corpus import fingerprint, read_corpus
from .errors import NLAError
from .io import save_tensors, write_json
from .models import load_base, residual

SPLITS = ("sft_av", "sft_ar", "rl", "heldout")
SIDECAR = "nla_acts.json"
FORMAT = "nla-activations/1"
# a resumed run must agree on these, or its shards would mix two datasets
IDENTITY_KEYS = ("model", "layer", "corpus_fingerprint", "per_doc", "min_pos", "max_tokens", "seed",
                 "dtype", "shard_docs", "heldout_frac", "n_docs")


def assign_splits(n_docs: int, seed: int, heldout_frac: float) -> np.ndarray:
    """Document -> split code (index into SPLITS): heldout first, then 25/25/50 of the rest."""
    perm = np.random.default_rng(seed).permutation(n_docs)
    n_held = int(round(n_docs * heldout_frac))
    if heldout_frac > 0 and n_docs >= 4:
        n_held = max(1, n_held)
    rest = n_docs - n_held
    cuts = [n_held, n_held + int(round(rest * 0.25)), n_held + int(round(rest * 0.5))]
    code = np.empty(n_docs, dtype=np.int8)
    for rank, doc in enumerate(perm):
        code[doc] = 3 if rank < cuts[0] else 0 if rank < cuts[1] else 1 if rank < cuts[2] else 2
    return code


def sample_positions(ids: list[int], special: set[int], min_pos: int, k: int, seed: int, doc: int) -> list[int]:
    cand = [p for p in range(min_pos, len(ids)) if ids[p] not in special]
    if not cand:
        return []
    rng = np.random.default_rng([seed, doc])
    return sorted(rng.choice(cand, size=min(k, len(cand)), replace=False).tolist())


def injection_scale_for(mean_norm: float) -> float:
    """A round number a little above the mean norm (two significant figures, rounded up)."""
    step = 10 ** max(0, math.floor(math.log10(max(mean_norm, 1.0))) - 1)
    return float(math.ceil(mean_norm * 1.02 / step) * step)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to norm sqrt(d), the scale at which MSE = 2(1 - cos)."""
    x = x.float()
    return x * (math.sqrt(x.shape[-1]) / x.norm(dim=-1, keepdim=True).clamp_min(1e-12))


@dataclass
class Activations:
    """A collected dataset in memory: vectors plus, per vector, where it came from."""
    meta: dict
    vectors: torch.Tensor  # [n, d] as stored
    doc_id: torch.Tensor
    pos: torch.Tensor
    token_id: torch.Tensor
    split: torch.Tensor  # int8 codes into SPLITS
    prefixes: list

    def __len__(self):
        return self.vectors.shape[0]

    def select(self, split: str) -> "Activations":
        if split not in SPLITS:
            raise NLAError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")
        m = self.split == SPLITS.index(split)
        idx = m.nonzero().flatten().tolist()
        return Activations(self.meta, self.vectors[m], self.doc_id[m], self.pos[m], self.token_id[m],
                           self.split[m], [self.prefixes[i] for i in idx])

    def tokens(self, tok) -> list[str]:
        """Each vector's own token as text (what warm-start summaries and the token test quote)."""
        return [tok.decode([int(t)]) for t in self.token_id]

    @property
    def mean_vector(self) -> torch.Tensor:
        return torch.tensor(self.meta["mean_vector_normalised"], dtype=torch.float32)

    def mse_mean(self, split: str | None = None) -> float:
        key = split or "train"
        return float(self.meta["mse_mean"][key])


def _read_shard(path: Path) -> dict:
    try:
        with safe_open(str(path), "pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
            md = f.metadata() or {}
        t["prefixes"] = json.loads(md["prefixes"])
        t["doc_start"], t["doc_end"] = int(md["doc_start"]), int(md["doc_end"])
        if len(t["prefixes"]) != t["vectors"].shape[0]:
            raise ValueError("prefix count does not match vector count")
        return t
    except Exception as e:
        raise NLAError(f"shard {path} is corrupt or truncated ({str(e).splitlines()[0][:120]}); delete it "
                       f"and rerun to recollect it, or rerun with --overwrite") from None


def load_activations(path: str | Path) -> Activations:
    path = Path(path)
    side = path / SIDECAR
    if not side.exists():
        raise NLAError(f"no activation dataset in {path} (missing {SIDECAR}); run `nla-cli collect` first")
    meta = json.loads(side.read_text())
    if meta.get("status") != "complete":
        raise NLAError(f"the dataset in {path} is incomplete; rerun the same `nla-cli collect` command to finish it")
    shards = [_read_shard(path / name) for name in meta["shards"]]
    cat = lambda k: torch.cat([s[k] for s in shards])  # noqa: E731
    acts = Activations(meta, cat("vectors"), cat("doc_id"), cat("pos"), cat("token_id"), cat("split"),
                       [p for s in shards for p in s["prefixes"]])
    if acts.vectors.shape[1] != meta["d_model"]:
        raise NLAError(f"{path}: vectors have d={acts.vectors.shape[1]} but the sidecar says d_model={meta['d_model']}")
    return acts


def _prepare_out(out: Path, identity: dict, overwrite: bool) -> None:
    side = out / SIDECAR
    if side.exists():
        old = json.loads(side.read_text())
        diff = [k for k in IDENTITY_KEYS if old.get(k) != identity.get(k)]
        if diff and not overwrite:
            k = diff[0]
            raise NLAError(f"{out} holds a dataset with {k}={old.get(k)!r}, not {identity.get(k)!r}; "
                           f"use another --out or pass --overwrite to replace it")
        if diff:
            shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        if not overwrite:
            raise NLAError(f"{out} exists and is not an nla activation dataset; use another --out or --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _finalise(out: Path, meta: dict, shard_names: list[str]) -> dict:
    shards = [_read_shard(out / n) for n in shard_names]
    vec = torch.cat([s["vectors"] for s in shards]).float()
    split = torch.cat([s["split"] for s in shards])
    if vec.shape[0] == 0:
        raise NLAError("no vectors were collected: every document is shorter than --min-pos tokens")
    norms = vec.norm(dim=-1)
    u = normalise(vec)
    train = split != SPLITS.index("heldout")
    mv = u[train].mean(0) if train.any() else u.mean(0)
    mv = normalise(mv[None])[0]
    mse = ((u - mv) ** 2).mean(-1)
    mse_mean = {"train": float(mse[train].mean()) if train.any() else float(mse.mean()), "all": float(mse.mean())}
    for i, name in enumerate(SPLITS):
        if (split == i).any():
            mse_mean[name] = float(mse[split == i].mean())
    meta.update(
        status="complete", shards=shard_names, n_vectors=int(vec.shape[0]),
        split_sizes={n: int((split == i).sum()) for i, n in enumerate(SPLITS)},
        mean_norm=float(norms.mean()), median_norm=float(norms.median()), max_norm=float(norms.max()),
        injection_scale=injection_scale_for(float(norms.mean())),
        mse_scale="normalised to sqrt(d_model): MSE = 2(1 - cos)", mse_mean=mse_mean,
        mean_vector_normalised=[round(float(x), 6) for x in mv])
    write_json(out / SIDECAR, meta)
    return meta


def collect(cfg: CollectConfig) -> dict:
    docs = read_corpus(cfg.corpus, cfg.max_docs or None)
    base = load_base(cfg.model, device=cfg.device, load_in_4bit=cfg.load_in_4bit)
    base.check_layer(cfg.layer)
    tok = base.tokenizer
    out = Path(cfg.out)

    enc = [tok(d, truncation=True, max_length=cfg.max_tokens)["input_ids"] for d in tqdm(docs, desc="tokenize", leave=False, disable=len(docs) < 2000)]
    special = set(tok.all_special_ids)
    positions = [sample_positions(ids, special, cfg.min_pos, cfg.per_doc, cfg.seed, i) for i, ids in enumerate(enc)]
    split_of = assign_splits(len(docs), cfg.seed, cfg.heldout_frac)
    # causal model: a document only needs running up to its last sampled position
    run_len = [(p[-1] + 1 if p else 0) for p in positions]
    n_vec, n_tok = sum(map(len, positions)), sum(run_len)
    n_shards = math.ceil(len(docs) / cfg.shard_docs)
    dbytes = 4 if cfg.dtype == "float32" else 2
    disk = n_vec * (base.d_model * dbytes + 32) + sum(len(docs[i]) for i, p in enumerate(positions) if p) * 2
    skipped = sum(1 for p in positions if not p)
    print(f"[nla] collect: {base.name} ({base.n_layers} blocks, d={base.d_model}), layer {cfg.layer} = "
          f"{LAYER_CONVENTION}; running blocks 0..{cfg.layer} only")
    print(f"[nla] plan: {len(docs):,} docs ({skipped} too short), {n_vec:,} vectors ({cfg.per_doc}/doc, pos >= "
          f"{cfg.min_pos}), {n_tok:,} tokens to run, {n_shards} shards, ~{disk / 2**20:.1f} MiB on disk ({cfg.dtype}); "
          f"docs per split " + "/".join(f"{n}={int((split_of == i).sum())}" for i, n in enumerate(SPLITS)))

    identity = dict(model=base.name, layer=cfg.layer, corpus_fingerprint=fingerprint(docs), per_doc=cfg.per_doc,
                    min_pos=cfg.min_pos, max_tokens=cfg.max_tokens, seed=cfg.seed, dtype=cfg.dtype,
                    shard_docs=cfg.shard_docs, heldout_frac=cfg.heldout_frac, n_docs=len(docs))
    _prepare_out(out, identity, cfg.overwrite)
    meta = dict(format=FORMAT, status="collecting", convention=LAYER_CONVENTION, d_model=base.d_model,
                n_layers=base.n_layers, corpus=cfg.corpus, quant=base.quant, splits=list(SPLITS), **identity)
    side = out / SIDECAR
    if side.exists() and json.loads(side.read_text()).get("status") == "complete":
        print(f"[nla] {out} is already complete; nothing to do")
        return json.loads(side.read_text())
    write_json(side, meta)

    names = [f"shard-{s:05d}.safetensors" for s in range(n_shards)]
    done = [s for s in range(n_shards) if (out / names[s]).exists()]
    for s in done:  # a damaged shard must be reported now, not after an hour of new work
        _read_shard(out / names[s])
    done_set = set(done)
    tok_done = sum(run_len[d] for s in done for d in range(s * cfg.shard_docs, min(len(docs), (s + 1) * cfg.shard_docs)))
    if done:
        print(f"[nla] resuming: {len(done)}/{n_shards} shards already on disk")
    store = torch.float32 if cfg.dtype == "float32" else torch.bfloat16
    pad = tok.pad_token_id
    bar = tqdm(total=n_tok, initial=tok_done, unit="tok", unit_scale=True, desc=f"collect L{cfg.layer}")
    try:
        for s in range(n_shards):
            if s in done_set:
                continue
            lo, hi = s * cfg.shard_docs, min(len(docs), (s + 1) * cfg.shard_docs)
            # longest first within a shard: less padding; the order is fixed, so resumes match
            order = sorted((d for d in range(lo, hi) if positions[d]), key=lambda d: (-run_len[d], d))
            got = {}
            for b in range(0, len(order), cfg.batch_size):
                batch = order[b:b + cfg.batch_size]
                T = max(run_len[d] for d in batch)
                ids = torch.full((len(batch), T), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), T), dtype=torch.long)
                for r, d in enumerate(batch):
                    ids[r, :run_len[d]] = torch.tensor(enc[d][:run_len[d]])
                    mask[r, :run_len[d]] = 1
                with torch.inference_mode():
                    h = residual(base.model, cfg.layer, ids.to(base.device), mask.to(base.device))
                for r, d in enumerate(batch):
                    got[d] = h[r, positions[d]].float().cpu()
                bar.update(int(mask.sum()))
            keep = sorted(got)
            rows = [(d, p) for d in keep for p in positions[d]]
            vec = torch.cat([got[d] for d in keep]) if keep else torch.zeros((0, base.d_model))
            tensors = dict(
                vectors=vec.to(store),
                doc_id=torch.tensor([d for d, _ in rows], dtype=torch.long),
                pos=torch.tensor([p for _, p in rows], dtype=torch.long),
                token_id=torch.tensor([enc[d][p] for d, p in rows], dtype=torch.long),
                split=torch.tensor([int(split_of[d]) for d, _ in rows], dtype=torch.int8))
            prefixes = [tok.decode(enc[d][:p + 1], skip_special_tokens=True) for d, p in rows]
            save_tensors(out / names[s], tensors, metadata=dict(
                prefixes=json.dumps(prefixes, ensure_ascii=False), doc_start=str(lo), doc_end=str(hi)))
    except KeyboardInterrupt:
        bar.close()
        raise NLAError("interrupted; finished shards are on disk: rerun the same command to resume") from None
    bar.close()
    meta = _finalise(out, meta, names)
    print(f"[nla] wrote {meta['n_vectors']:,} vectors to {out}: mean norm {meta['mean_norm']:.1f}, "
          f"suggested injection scale {meta['injection_scale']:g}, predict-the-mean MSE {meta['mse_mean']['train']:.3f}")
    return meta
