"""The activation verbalizer (AV): base + "av" adapter, reading an injected vector, writing text.

Every AV prompt has the same token ids (only the injected vector differs), so a batch needs no
padding: prefill once per distinct vector (a GRPO group's G rows share one; nla/shared_prefix.py),
then decode one token per step from a static KV cache sized for prompt + cap (nla/decoding.py; on
CUDA each step is a replayed CUDA graph).
An explanation ends at `</explanation>`; one that hits EOS or the length cap first is a failure
(reward -2.0 in RL). Log-probs for GRPO go through kernels.token_logprobs, which never holds
the [tokens, vocab] fp32 log-softmax.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass

import torch
from torch.profiler import record_function  # named phases in a profile (bench/common.profile_ops)

import kernels

from . import lora
from .decoding import Decoder, StopDetector, pick
from .inject import injected, locate
from .models import decoder_of
from .shared_prefix import Held, SharedPrefix, common_level, distinct_rows
from .spec import CLOSE, NLASpec

CHECK_EVERY = 8  # decode steps between host syncs asking "has every row stopped?"


@dataclass
class Sample:
    ids: list          # response token ids (including the closing tag when ok)
    text: str          # the explanation, without tags
    ok: bool           # closed within the cap
    ref_lp: torch.Tensor | None = None  # [len(ids)] log-probs under generate's ref_role, if asked


def _prompt(spec: NLASpec, n: int, device) -> torch.Tensor:
    return torch.tensor(spec.av_prompt_ids, device=device).expand(n, -1).contiguous()


def _prompts(model, module, spec: NLASpec, vectors: torch.Tensor, **kw):
    """The AV prompts of distinct `vectors` [u, d] through `module` (the model or its decoder):
    (the level holding their keys and values, the module's output for them). The tokens before
    the placeholder are the same for every row, so in `replace` mode they run once, as a level of
    their own, where that pays (common_level; nla/shared_prefix.py)."""
    ids = _prompt(spec, len(vectors), vectors.device)
    split = (int(locate(ids[:1], spec, 1)[0].argmax())
             if spec.injection_mode == "replace" and common_level(vectors.device) else 0)
    with injected(model, ids, vectors, spec) as emb:
        common = None
        if split > 0:
            common = SharedPrefix(model)
            common.forward(module, inputs_embeds=emb[:1, :split], **kw)
        level = SharedPrefix(model, common, torch.zeros(len(vectors), dtype=torch.long, device=ids.device)
                             if common is not None else None)
        return level, level.forward(module, inputs_embeds=emb[:, split:], **kw)


def _stop_ids(tok) -> set:
    return {i for i in (tok.eos_token_id, tok.pad_token_id) if i is not None}


@torch.no_grad()
def generate(base, spec: NLASpec, vectors: torch.Tensor, max_new: int = 64, temperature: float = 1.0,
             role: str = "av", generator: torch.Generator | None = None, ref_role: str | None = None) -> list[Sample]:
    """Explanations of `vectors` (greedy when temperature is 0). Every row samples at every step
    until all have stopped, so the random stream, and hence each row, is the same whatever the
    others do: the samples equal generate_reference's for the same seed (tested).

    With `ref_role`, each row has a twin under that adapter, fed the same tokens in the same
    forward (lora.side_by_side), and each sample carries its tokens' log-probs under it (`ref_lp`):
    GRPO's KL reference without a forward of its own, where weights are read per step anyway."""
    model, tok = base.model, base.tokenizer
    n = vectors.shape[0]
    ids = _prompt(spec, n, base.device)
    P = ids.shape[1]
    stops = StopDetector.of(tok, _stop_ids(tok), CLOSE, base.device)
    out = torch.empty((n, max_new), dtype=torch.long, device=base.device)
    ref_lp = None if ref_role is None else torch.zeros((n, max_new), device=base.device)
    was_training = model.training
    model.eval()  # HF turns the KV cache off under gradient checkpointing in train mode
    try:
        roles = (role,) if ref_role is None else (role, ref_role)
        dec = Decoder.of(model, n * len(roles), P + max_new, role if ref_role is None else roles)
        with contextlib.ExitStack() as ctx:
            with record_function("nla.rollout.prefill"):
                uniq, index = distinct_rows(vectors.to(base.device))
                if ref_role is None:  # sampling weights for the prompts and every step
                    ctx.enter_context(lora.inference_weights(model, role, dec.dtype))
                levels, logits = [], []
                for r in roles:
                    with lora.use(model, r):
                        level, first = _prompts(model, model, spec, uniq, logits_to_keep=1)
                    levels.append(level)
                    logits.append(first.logits[:, -1].index_select(0, index))
                dec.prefill(levels, index)
                logits = torch.cat(logits)
                ctx.enter_context(lora.use(model, role))
                if ref_role is not None:
                    ctx.enter_context(lora.side_by_side(model, roles, dec.dtype))
            with record_function("nla.rollout.decode"):
                for step in range(max_new):
                    out[:, step] = nxt = pick(logits[:n], temperature, generator)
                    if ref_lp is not None:  # the twin's log-prob of the token its policy row drew
                        lp = torch.log_softmax(logits[n:], -1, dtype=torch.float32)
                        ref_lp[:, step] = lp.gather(1, nxt[:, None])[:, 0]
                    if step + 1 == max_new or ((step + 1) % CHECK_EVERY == 0 and stops.all_stopped(out[:, :step + 1])):
                        break
                    logits = dec.step(nxt.repeat(len(roles)))
    finally:
        model.train(was_training)
    with record_function("nla.rollout.finish"):
        samples = [_finish(tok, r) for r in out[:, :step + 1].tolist()]
    if ref_lp is not None:
        for s, lp in zip(samples, ref_lp):
            s.ref_lp = lp[:len(s.ids)]
    return samples


def _finish(tok, row: list[int]) -> Sample:
    """Cut a row at its first stop: a stop id (failure) or the closing tag (success), found
    exactly as the reference loop does, on the last 8 tokens decoded after each new one. Not by
    decoding every window up to the tag, though (~70 decodes a row, 0.15 s for the gpu preset's 256
    rows on this project's CPU, every RL step: now 0.05 s, bench/RESULTS.md): a tag in a window's text is in the text of any run of tokens
    that holds the window (decoding concatenates the tokens' bytes or pieces, for byte-level BPE
    and SentencePiece alike, and the tag is ASCII), so one decode of 16 tokens says whether any
    of the 9 windows ending in its last 9 tokens can hold it, and only then are they read."""
    stop_ids = _stop_ids(tok)
    end = next((j for j, t in enumerate(row) if t in stop_ids), len(row) - 1)
    closed = False
    if CLOSE in tok.decode(row[:end + 1]):  # necessary for a hit in any 8-token window
        for first in range(0, end + 1, 9):  # the windows ending at first .. last
            last = min(end, first + 8)
            if CLOSE not in tok.decode(row[max(0, first - 7):last + 1]):
                continue
            j = next((j for j in range(first, last + 1)
                      if row[j] not in stop_ids and CLOSE in tok.decode(row[max(0, j - 7):j + 1])), None)
            if j is not None:
                end, closed = j, True
                break
    r = row[:end + 1]
    return Sample(r, tok.decode(r, skip_special_tokens=True).split(CLOSE)[0].strip(), closed)


@torch.no_grad()
def generate_reference(base, spec: NLASpec, vectors: torch.Tensor, max_new: int = 64, temperature: float = 1.0,
                       role: str = "av", generator: torch.Generator | None = None) -> list[Sample]:
    """The plain loop `generate` is tested against and benchmarked beside (not used in training):
    an eager forward per token on a dynamic cache, a host decision per row per step."""
    model, tok = base.model, base.tokenizer
    n = vectors.shape[0]
    ids = _prompt(spec, n, base.device)
    stop_ids = _stop_ids(tok)
    was_training = model.training
    model.eval()
    try:
        with lora.use(model, role):
            with injected(model, ids, vectors, spec) as emb:
                out = model(inputs_embeds=emb, use_cache=True, logits_to_keep=1)
            past, logits = _cache_of(out), out.logits[:, -1]
            resp = [[] for _ in range(n)]
            done = [False] * n
            closed = [False] * n
            for _step in range(max_new):
                nxt = pick(logits, temperature, generator)
                for i, t in enumerate(nxt.tolist()):
                    if done[i]:
                        continue
                    resp[i].append(t)
                    if t in stop_ids:
                        done[i] = True
                    elif CLOSE in tok.decode(resp[i][-8:]):
                        done[i] = closed[i] = True
                if all(done):
                    break
                out = model(input_ids=nxt[:, None], use_cache=True, **{_cache_arg(model): past})
                past, logits = _cache_of(out), out.logits[:, -1]
    finally:
        model.train(was_training)
    return [Sample(r, tok.decode(r, skip_special_tokens=True).split(CLOSE)[0].strip(), ok) for r, ok in zip(resp, closed)]


def _cache_arg(model) -> str:
    # transformers 5.2x renamed past_key_values to cache (the old name warns, then goes in 5.40)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    return out.cache if "cache" in out else out.past_key_values


def target_ids(tok, text: str, max_len: int | None = None) -> list[int]:
    """Response ids the AV is trained to write for an explanation text (SFT): the text cut at a
    word boundary so that it AND the closing tag fit in max_len (an AV that learns targets
    longer than its RL cap would be cut, and scored -2, on every sample)."""
    close = tok.encode(CLOSE, add_special_tokens=False)
    words = text.strip().split()
    while True:
        ids = tok.encode(" " + " ".join(words), add_special_tokens=False)
        if max_len is None or len(ids) + len(close) <= max_len or len(words) <= 1:
            return (ids + close)[:max_len] if max_len else ids + close
        words = words[:max(1, len(words) - max(1, (len(ids) + len(close) - max_len) // 2))]


class Prompts:
    """The AV prompts of a batch's rows under one role, each distinct vector's once
    (nla/shared_prefix.py): each row's index among them, the level holding their keys and values,
    and the hidden state that predicts their first response token. `held`: run once for all of an
    update's micro-batches (`rows` picks each one's rows; call `backward()` after theirs)."""

    def __init__(self, base, spec: NLASpec, vectors: torch.Tensor, role: str = "av", held: bool = False):
        model = base.model
        uniq, self.index = distinct_rows(vectors.to(base.device))
        self.role = role
        with lora.use(model, role):
            level, out = _prompts(model, decoder_of(model), spec, uniq)
        self.run = Held(level, (out.last_hidden_state[:, -1:],), leaves=held)

    def rows(self, rows: list[int]) -> "Prompts":
        sub = copy.copy(self)
        sub.index = self.index[torch.as_tensor(rows, device=self.index.device)]
        return sub

    def backward(self) -> None:
        self.run.backward()


def response_logprobs(base, spec: NLASpec, vectors: "torch.Tensor | Prompts", responses: list[list[int]],
                      role: str = "av") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob [N, R] of each response under adapter `role`, and the mask [N, R].
    Rows with the same vector (a GRPO group) run their prompt once (nla/shared_prefix.py); a
    `Prompts` in place of the vectors has run them already (its role is used)."""
    prompts = vectors if isinstance(vectors, Prompts) else Prompts(base, spec, vectors, role)
    model, tok = base.model, base.tokenizer
    n, dev = len(responses), base.device
    R = max(1, max(len(r) for r in responses))
    resp = torch.full((n, R), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, R), dtype=torch.bool)
    for i, r in enumerate(responses):
        resp[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = True
    resp, mask = resp.to(dev), mask.to(dev)  # one copy each to a GPU, not one per row
    index = prompts.index
    with lora.use(model, prompts.role):
        h = prompts.run.outputs[0].index_select(0, index)  # predicts token 0; token t predicts t + 1
        if R > 1:
            rows = SharedPrefix(model, prompts.run.level, index, record=False)
            h = torch.cat([h, rows.forward(decoder_of(model), input_ids=resp[:, :-1]).last_hidden_state], 1)
    head = model.get_output_embeddings().weight
    lp = kernels.token_logprobs(h.reshape(n * R, -1), head, resp.reshape(-1)).view(n, R)
    return lp, mask
