"""One AV + AR interface for explain and eval, whichever layout the checkpoint was written in.

Two layouts exist. Ours ("native"): one directory with LoRA adapters for a shared base
(nla/checkpoint.py). The reference release's (kitft/natural_language_autoencoders: its
`nla_inference.py` and inference README, read for this module): two full Hugging Face model
directories, each with an `nla_meta.yaml`, so a user with those weights can use our tools.

    AV dir   config.json, model*.safetensors, tokenizer files, nla_meta.yaml
    AR dir   the same with the model cut to K+1 blocks (config num_hidden_layers = K+1), plus
             value_head.safetensors: the Linear(d, d, bias=False) head as a state dict ("weight")

    kind: nla_model
    role: av | ar                          (older sidecars: actor | critic)
    d_model: 3584
    extraction: {layer_index: 20, injection_scale: 150.0, mse_scale: 59.87}
    tokens: {injection_char, injection_token_id, injection_left_neighbor_id,
             injection_right_neighbor_id, critic_suffix_ids}
    prompt_templates: {av: "... <concept>{injection_char}</concept> ...", ar: "... {explanation} ..."}
    ar: {num_hidden_layers: 20}            (AR only: K itself; older: critic.num_hidden_layers)

The AV prompt is the chat template around `av` with the generation prompt on (the AV then
writes `<explanation>...</explanation>`; we put the open tag in the prompt, as for our AV).
The AR reads `ar` with the explanation filled in, tokenised as ONE string with special tokens
(BPE merges across the template's edges, so prefix ids + text ids would differ), and the
head's output at the last token is the reconstruction. Assumed where the published schema is
silent: the layer is extraction.layer_index, else the AR's K, else the AR config's block count
minus one; a "sqrt_d_model" scale means sqrt(d); the base model is named by a `base_model` key
if there is one, else the caller must name it; a `mse_mean` key, if present, is the
predict-the-mean MSE (the released sidecars have none, so FVE then needs an activation dataset).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from tqdm import tqdm

from . import checkpoint
from .errors import NLAError
from .models import Base, load_base, resolve, residual
from .reconstructor import ARHead, reconstruct
from .spec import NLASpec, av_prompt_ids
from .verbalizer import Sample, generate

META = "nla_meta.yaml"
KIND = "nla_model"
HEAD_FILE = "value_head.safetensors"
AV_ROLES, AR_ROLES = ("av", "actor"), ("ar", "critic")


def _read_yaml(path: Path) -> dict:
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise NLAError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return d if isinstance(d, dict) else {}


def is_reference_dir(path) -> bool:
    f = Path(path) / META
    return f.exists() and _read_yaml(f).get("kind") == KIND


@dataclass
class Located:
    """Where an NLA's weights are and what they were trained for, before any model is loaded."""
    layout: str            # "native" (adapters on one base) or "reference" (two full models)
    path: Path             # the native checkpoint, or the AV directory
    meta: dict             # its nla_meta.yaml
    base_model: str | None
    layer: int
    d_model: int
    ar_path: Path | None = None
    ar_meta: dict | None = None

    @property
    def stage(self) -> str:
        return str(self.meta.get("stage", "")) if self.layout == "native" else "reference"

    def describe(self) -> str:
        return f"model {self.base_model or '(not named)'!r} layer {self.layer} (d_model {self.d_model})"

    def __str__(self) -> str:
        return str(self.path) if self.ar_path is None else f"{self.path},{self.ar_path}"


def locate(spec: str) -> Located:
    """A --checkpoint value -> Located. Accepts a checkpoint dir (RUN/rl), a run dir (its rl/,
    else its sft/), a reference-layout dir holding av/ and ar/, a reference AV dir whose AR is
    a sibling named like it (...-av / ...-ar), or 'AV_DIR,AR_DIR'."""
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if len(parts) == 2:
        return _reference(Path(parts[0]).expanduser(), Path(parts[1]).expanduser())
    if len(parts) != 1:
        raise NLAError(f"--checkpoint takes one directory, or two as AV_DIR,AR_DIR; got {spec!r}")
    p = Path(parts[0]).expanduser()
    if not p.exists() and not p.with_name(p.name + ".old").exists():
        raise NLAError(f"checkpoint not found: {p}")
    if (p / "av").is_dir() and (p / "ar").is_dir() and is_reference_dir(p / "av"):
        return _reference(p / "av", p / "ar")
    if is_reference_dir(p):
        if _read_yaml(p / META).get("role") in AR_ROLES:
            raise NLAError(f"{p} is a reference-layout AR; pass the AV with it: --checkpoint AV_DIR,{p}")
        sibling = _sibling_ar(p)
        if sibling is None:
            raise NLAError(f"{p} is a reference-layout AV without its AR beside it; pass both: --checkpoint {p},AR_DIR")
        return _reference(p, sibling)
    if checkpoint.exists(p):
        return _native(p)
    for sub in ("rl", "sft"):
        if checkpoint.exists(p / sub):
            return _native(p / sub)
    raise NLAError(f"{p} is not an NLA checkpoint: expected a checkpoint with {META} (e.g. RUN/rl), a run "
                   f"directory with rl/ or sft/, or a reference-layout directory with av/ and ar/")


def _sibling_ar(av: Path) -> Path | None:
    for a, b in (("-av", "-ar"), ("_av", "_ar"), ("av", "ar"), ("actor", "critic")):
        if av.name.endswith(a):
            cand = av.with_name(av.name[: -len(a)] + b)
            if is_reference_dir(cand):
                return cand
    return None


def _native(p: Path) -> Located:
    meta = checkpoint.read_meta(p)
    if not (p / "av.safetensors").exists():
        raise NLAError(f"{p} holds no AV (av.safetensors): it is the AR-only warm-start stage; use RUN/sft or RUN/rl")
    try:
        return Located("native", p, meta, meta.get("base_model"), int(meta["layer"]), int(meta["d_model"]))
    except (KeyError, TypeError, ValueError) as e:
        raise NLAError(f"{p / META} lacks a valid {e} field") from None


def _reference(av: Path, ar: Path) -> Located:
    for d in (av, ar):
        if not is_reference_dir(d):
            raise NLAError(f"{d} is not a reference-layout NLA directory ({META} with kind: {KIND})")
    av_meta, ar_meta = _read_yaml(av / META), _read_yaml(ar / META)
    if av_meta.get("role") in AR_ROLES and ar_meta.get("role") in AV_ROLES:  # given the other way round
        av, ar, av_meta, ar_meta = ar, av, ar_meta, av_meta
    for d, m, roles in ((av, av_meta, AV_ROLES), (ar, ar_meta, AR_ROLES)):
        if m.get("role") is not None and m["role"] not in roles:
            raise NLAError(f"{d / META} says role {m['role']!r}; expected one of {', '.join(roles)}")
    if not (ar / HEAD_FILE).exists():
        raise NLAError(f"{ar} has no {HEAD_FILE}: the AR's head is not derivable from the backbone")
    d_av, d_ar = _d_model(av_meta), _d_model(ar_meta)
    if d_av is None or (d_ar is not None and d_ar != d_av):
        raise NLAError(f"the AV ({av}) and AR ({ar}) sidecars disagree on, or lack, d_model: {d_av} vs {d_ar}")
    base = av_meta.get("base_model") or ar_meta.get("base_model")
    return Located("reference", av, av_meta, base, _reference_layer(av_meta, ar_meta, ar), d_av, ar, ar_meta)


def _d_model(meta: dict) -> int | None:
    d = meta.get("d_model") or (meta.get("extraction") or {}).get("d_model")
    return int(d) if d is not None else None


def _reference_layer(av_meta: dict, ar_meta: dict, ar: Path) -> int:
    for m in (av_meta, ar_meta):
        if (m.get("extraction") or {}).get("layer_index") is not None:
            return int(m["extraction"]["layer_index"])
    for key in ("ar", "critic"):
        if (ar_meta.get(key) or {}).get("num_hidden_layers") is not None:
            return int(ar_meta[key]["num_hidden_layers"])
    cfg = json.loads((ar / "config.json").read_text()) if (ar / "config.json").exists() else {}
    n = cfg.get("num_hidden_layers") or (cfg.get("text_config") or {}).get("num_hidden_layers")
    if not n:
        raise NLAError(f"cannot tell the layer of the reference NLA in {ar}: no extraction.layer_index, "
                       f"ar.num_hidden_layers or config.json num_hidden_layers")
    return int(n) - 1  # the AR keeps blocks 0..K


def same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    try:  # the alias and its cache directory, or two spellings of one directory
        return resolve(a)[0] == resolve(b)[0]
    except NLAError:
        return False


def check_match(loc: Located, asked: str, model: str | None = None, layer: int | None = None,
                d_model: int | None = None) -> None:
    """One error naming both sides when the checkpoint was trained for another model/layer/width."""
    bad = []
    if model and loc.base_model and not same_model(model, loc.base_model):
        bad.append("model")
    if layer is not None and layer != loc.layer:
        bad.append("layer")
    if d_model is not None and d_model != loc.d_model:
        bad.append("d_model")
    if bad:
        want = " ".join(f"{k} {v!r}" if k == "model" else f"{k} {v}" for k, v in
                        (("model", model), ("layer", layer), ("d_model", d_model)) if v is not None)
        raise NLAError(f"{' and '.join(bad)} mismatch: checkpoint {loc} is an NLA for {loc.describe()}, but "
                       f"{asked} is {want}; use a checkpoint trained for that, or match the model and layer to it")


@dataclass
class NLA:
    """An AV and an AR ready to use. Native: one base, roles switched by adapter name;
    reference: two full models (roles None) and a whole-string AR template."""
    spec: NLASpec
    av: Base
    ar: Base
    head: ARHead
    located: Located
    av_role: str | None = "av"
    ar_role: str | None = "ar"
    ar_template: str | None = None

    def explain(self, vectors: torch.Tensor, max_new: int, temperature: float = 0.0,
                generator: torch.Generator | None = None) -> list[Sample]:
        return generate(self.av, self.spec, vectors.float().to(self.av.device), max_new, temperature,
                        role=self.av_role, generator=generator)

    def explain_all(self, vectors: torch.Tensor, max_new: int, temperature: float = 0.0, seed: int = 0,
                    batch_size: int = 16, desc: str = "explain", disable: bool | None = None) -> list[Sample]:
        gen = torch.Generator(device=self.av.device).manual_seed(seed) if temperature > 0 else None
        out = []
        with tqdm(total=len(vectors), desc=desc, unit="act", disable=disable, leave=False) as bar:
            for i in range(0, len(vectors), batch_size):
                out += self.explain(vectors[i:i + batch_size], max_new, temperature, gen)
                bar.update(min(batch_size, len(vectors) - i))
        return out

    @torch.no_grad()
    def reconstruct(self, texts: list[str], batch_size: int = 16) -> torch.Tensor:
        """[N, d] fp32 on the CPU."""
        out = [torch.zeros(0, self.spec.d_model)]
        for i in range(0, len(texts), batch_size):
            chunk = texts[i:i + batch_size]
            if self.ar_template is None:
                out.append(reconstruct(self.ar, self.spec, self.head, chunk, role=self.ar_role).float().cpu())
            else:
                out.append(self._reconstruct_whole(chunk))
        return torch.cat(out)

    def _reconstruct_whole(self, texts: list[str]) -> torch.Tensor:
        tok, dev = self.ar.tokenizer, self.ar.device
        rows = [tok(self.ar_template.format(explanation=t), add_special_tokens=True)["input_ids"] for t in texts]
        ids = torch.full((len(rows), max(map(len, rows))), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        h = residual(self.ar.model, self.spec.layer, ids.to(dev), mask.to(dev))
        last = h[torch.arange(len(rows), device=h.device), torch.tensor([len(r) - 1 for r in rows], device=h.device)]
        return self.head(last.float().to(self.head.weight.dtype)).float().cpu()


def load(loc: Located, base: Base | None = None, device: str | None = None, load_in_4bit: bool = False) -> NLA:
    """Native: adapters go into `base` (the target model itself). Reference: the AV and AR
    directories are loaded as two more models; `base` is not touched."""
    if loc.layout == "native":
        if base is None:
            raise ValueError("a native checkpoint loads into its base model: pass base")
        spec, head, _ = checkpoint.load(loc.path, base, ("av", "ar"))
        return NLA(spec, base, base, head, loc)
    av = load_base(str(loc.path), device=device, load_in_4bit=load_in_4bit)
    ar = load_base(str(loc.ar_path), device=device, load_in_4bit=load_in_4bit)
    for name, m in (("AV", av), ("AR", ar)):
        if m.d_model != loc.d_model:
            raise NLAError(f"the reference {name} model has d_model={m.d_model} but its sidecar says {loc.d_model}")
    if ar.n_layers <= loc.layer:
        raise NLAError(f"the reference AR in {loc.ar_path} has {ar.n_layers} blocks; layer {loc.layer} needs "
                       f"{loc.layer + 1}")
    spec, template = reference_spec(loc, av, ar)
    sd = load_file(str(loc.ar_path / HEAD_FILE))
    w = sd.get("weight", next(iter(sd.values())) if len(sd) == 1 else None)
    if w is None or tuple(w.shape) != (loc.d_model, loc.d_model):
        raise NLAError(f"{loc.ar_path / HEAD_FILE} holds no [{loc.d_model}, {loc.d_model}] 'weight'")
    head = ARHead(loc.d_model).to(ar.device)
    head.weight.data.copy_(w.float())
    return NLA(spec, av, ar, head, loc, None, None, template)


def _scale(raw, d: int, what: str, where: Path) -> float:
    if raw is None or raw in ("raw", "none"):
        raise NLAError(f"{where}: {what} is null (raw vectors); only a fixed norm is supported")
    return math.sqrt(d) if raw == "sqrt_d_model" else float(raw)


def reference_spec(loc: Located, av: Base, ar: Base) -> tuple[NLASpec, str]:
    """The reference sidecars as our NLASpec (+ the AR template), checked against the live
    tokenizers: a drifted token id or neighbour would inject at the wrong place, silently."""
    m, am = loc.meta, loc.ar_meta or {}
    ex, toks = m.get("extraction") or {}, {**(am.get("tokens") or {}), **(m.get("tokens") or {})}
    av_tpl = (m.get("prompt_templates") or {}).get("av") or (m.get("prompt_templates") or {}).get("actor")
    ar_tpls = {**(m.get("prompt_templates") or {}), **(am.get("prompt_templates") or {})}
    ar_tpl = ar_tpls.get("ar") or ar_tpls.get("critic")
    keys = ("injection_char", "injection_token_id", "injection_left_neighbor_id", "injection_right_neighbor_id")
    missing = [f"tokens.{k}" for k in keys if toks.get(k) is None]
    missing += [k for k, v in (("prompt_templates.av", av_tpl), ("prompt_templates.ar", ar_tpl)) if not v]
    if missing:
        raise NLAError(f"the reference sidecars in {loc} lack {', '.join(missing)}")
    char, pid = toks["injection_char"], int(toks["injection_token_id"])
    left, right = int(toks["injection_left_neighbor_id"]), int(toks["injection_right_neighbor_id"])
    if av.tokenizer.encode(char, add_special_tokens=False) != [pid]:
        raise NLAError(f"tokenizer drift in {loc.path}: {char!r} does not encode to the sidecar's id {pid}")
    prompt = av_prompt_ids(av.tokenizer, char, av_tpl.replace("{injection_char}", "{placeholder}"))
    sites = [i for i in range(1, len(prompt) - 1) if prompt[i - 1:i + 2] == [left, pid, right]]
    if len(sites) != 1:
        raise NLAError(f"tokenizer or template drift in {loc.path}: the AV prompt has {len(sites)} injection sites "
                       f"with the sidecar's neighbour ids {left}/{right} (needs exactly 1)")
    prefix, hole, suffix = ar_tpl.partition("{explanation}")
    if not hole:
        raise NLAError(f"the AR template in {loc.ar_path / META} has no {{explanation}} slot")
    suffix_ids = [int(i) for i in toks.get("critic_suffix_ids") or []]
    probe = ar.tokenizer(ar_tpl.format(explanation="probe"), add_special_tokens=True)["input_ids"]
    if suffix_ids and probe[-len(suffix_ids):] != suffix_ids:
        raise NLAError(f"tokenizer drift in {loc.ar_path}: the AR prompt no longer ends with critic_suffix_ids "
                       f"{suffix_ids}")
    mse_mean = m.get("mse_mean", am.get("mse_mean"))
    scale = _scale(ex.get("injection_scale", "sqrt_d_model"), loc.d_model, "extraction.injection_scale", loc.path)
    spec = NLASpec(
        base_model=loc.base_model or "", d_model=loc.d_model, layer=loc.layer, injection_scale=scale,
        mse_mean=float(mse_mean) if mse_mean is not None else float("nan"),
        mse_scale=str((am.get("extraction") or ex).get("mse_scale", "sqrt_d_model")),
        placeholder=char, placeholder_id=pid, placeholder_neighbours=[left, right], av_template=av_tpl,
        av_prompt_ids=prompt, ar_prefix=prefix, ar_suffix=suffix,
        ar_prefix_ids=ar.tokenizer(prefix, add_special_tokens=True)["input_ids"],
        ar_suffix_ids=suffix_ids or ar.tokenizer.encode(suffix, add_special_tokens=False),
        ar_num_layers=loc.layer + 1, quant=av.quant)
    return spec, ar_tpl


def warm_start_of(loc: Located) -> Located | None:
    """The warm-start checkpoint (RUN/sft) beside an RL checkpoint (RUN/rl), if there is one."""
    if loc.layout != "native" or loc.stage != "rl":
        return None
    cand = loc.path.parent / "sft"
    if checkpoint.exists(cand) and (cand / "av.safetensors").exists():
        return _native(cand)
    return None
