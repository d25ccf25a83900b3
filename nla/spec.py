"""How an NLA must be prompted and scored: the content of a checkpoint's `nla_meta.yaml`.

Fields follow the reference release's sidecar (d_model, layer, injection scale, mse scale,
placeholder and its neighbour ids, both templates, AR suffix ids, AR layer count) plus ours
(base model, adapter ranks, quantisation, injection mode, the predict-the-mean baseline).
A checkpoint carries one, so it always knows how it must be prompted.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import NLAError

PLACEHOLDER_CANDIDATES = ("§", "†", "‡", "¤", "¶", "※", "⁂", "ꙮ", "〓", "÷", "¦")
AV_TEMPLATE = ("You will see one activation vector from inside a language model, written as "
               "<concept>{placeholder}</concept>. Describe what it represents in 2-3 short snippets "
               "inside <explanation></explanation> tags.")
OPEN, CLOSE = "<explanation>", "</explanation>"
AR_PREFIX = "Explanation of a language model's hidden state:\n<explanation>"
AR_SUFFIX = "</explanation>\nThe hidden state it explains:"


@dataclass
class NLASpec:
    base_model: str
    d_model: int
    layer: int
    injection_scale: float
    mse_mean: float
    injection_mode: str = "replace"
    mse_scale: str = "sqrt(d_model): MSE = 2(1 - cos)"
    placeholder: str = "§"
    placeholder_id: int = -1
    placeholder_neighbours: list = field(default_factory=list)
    av_template: str = AV_TEMPLATE
    av_prompt_ids: list = field(default_factory=list)
    ar_prefix: str = AR_PREFIX
    ar_suffix: str = AR_SUFFIX
    ar_prefix_ids: list = field(default_factory=list)
    ar_suffix_ids: list = field(default_factory=list)
    ar_num_layers: int = 0
    lora_rank_av: int = 0
    lora_rank_ar: int = 0
    quant: str = "none"
    convention: str = "layer L = residual after decoder block L = hidden_states[L+1]"

    def __post_init__(self):
        if self.injection_mode not in ("replace", "add"):
            raise NLAError(f"injection mode must be replace or add, got {self.injection_mode!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NLASpec":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def av_prompt_ids(tok, placeholder: str, template: str = AV_TEMPLATE) -> list[int]:
    """Chat-formatted AV prompt ending in the open tag, so the model's first token is content."""
    content = template.format(placeholder=placeholder)
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                       add_generation_prompt=True)
    else:
        text = content + "\n\n"
    return tok.encode(text + OPEN, add_special_tokens=False)


def choose_placeholder(tok, template: str = AV_TEMPLATE) -> tuple[str, int, list[int], list[int]]:
    """A rare string that is exactly one token, alone in the rendered prompt: (char, id,
    [left id, right id], prompt ids). Chosen per tokenizer by checking, not from a fixed list."""
    for c in PLACEHOLDER_CANDIDATES:
        ids = tok.encode(c, add_special_tokens=False)
        if len(ids) != 1:
            continue
        prompt = av_prompt_ids(tok, c, template)
        if prompt.count(ids[0]) == 1:
            i = prompt.index(ids[0])
            return c, ids[0], [prompt[i - 1], prompt[i + 1]], prompt
    raise NLAError("no candidate placeholder is a single token in this tokenizer; extend "
                   "nla.spec.PLACEHOLDER_CANDIDATES")


def build_spec(base, layer: int, acts_meta: dict, mode: str = "replace", rank_av: int = 0, rank_ar: int = 0,
               injection_scale: float | None = None) -> NLASpec:
    tok = base.tokenizer
    ch, pid, nb, prompt = choose_placeholder(tok)
    return NLASpec(
        base_model=base.name, d_model=base.d_model, layer=layer,
        injection_scale=float(injection_scale or acts_meta["injection_scale"]),
        mse_mean=float(acts_meta["mse_mean"]["train"]), injection_mode=mode, placeholder=ch,
        placeholder_id=pid, placeholder_neighbours=nb, av_prompt_ids=prompt,
        ar_prefix_ids=tok.encode(AR_PREFIX, add_special_tokens=False),
        ar_suffix_ids=tok.encode(AR_SUFFIX, add_special_tokens=False), ar_num_layers=layer + 1,
        lora_rank_av=rank_av, lora_rank_ar=rank_ar, quant=base.quant)
