"""The activation verbalizer (AV): base + "av" adapter, reading an injected vector, writing text.

Every AV prompt has the same token ids (only the injected vector differs), so a batch needs no
padding for the prompt: prefill once with the vectors injected, then sample with a KV cache.
An explanation ends at `</explanation>`; one that hits EOS or the length cap first is a failure
(reward -2.0 in RL). Log-probs for GRPO go through kernels.token_logprobs, which never holds
the [tokens, vocab] fp32 log-softmax.
"""
from __future__ import annotations

import inspect

from dataclasses import dataclass

import torch

import kernels

from . import lora
from .inject import injected
from .models import decoder_of
from .spec import CLOSE, NLASpec


@dataclass
class Sample:
    ids: list          # response token ids (including the closing tag when ok)
    text: str          # the explanation, without tags
    ok: bool           # closed within the cap


def _prompt(spec: NLASpec, n: int, device) -> torch.Tensor:
    return torch.tensor(spec.av_prompt_ids, device=device).expand(n, -1).contiguous()


@torch.no_grad()
def generate(base, spec: NLASpec, vectors: torch.Tensor, max_new: int = 64, temperature: float = 1.0,
             role: str = "av", generator: torch.Generator | None = None) -> list[Sample]:
    model, tok = base.model, base.tokenizer
    n = vectors.shape[0]
    ids = _prompt(spec, n, base.device)
    stop_ids = {i for i in (tok.eos_token_id, tok.pad_token_id) if i is not None}
    was_training = model.training
    model.eval()  # HF turns the KV cache off under gradient checkpointing in train mode
    try:
        return _sample(base, spec, vectors, ids, max_new, temperature, role, generator, stop_ids)
    finally:
        model.train(was_training)


def _cache_arg(model) -> str:
    # transformers 5.2x renamed past_key_values to cache (the old name warns, then goes in 5.40)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    return out.cache if "cache" in out else out.past_key_values


def _sample(base, spec, vectors, ids, max_new, temperature, role, generator, stop_ids) -> list[Sample]:
    model, tok = base.model, base.tokenizer
    n = vectors.shape[0]
    with lora.use(model, role):
        with injected(model, ids, vectors, spec) as emb:
            out = model(inputs_embeds=emb, use_cache=True, logits_to_keep=1)
        past, logits = _cache_of(out), out.logits[:, -1]
        resp = [[] for _ in range(n)]
        done = [False] * n
        closed = [False] * n
        for _step in range(max_new):
            logits = logits.float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).flatten()
            else:
                nxt = logits.argmax(-1)
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
    samples = []
    for r, ok in zip(resp, closed):
        text = tok.decode(r, skip_special_tokens=True)
        samples.append(Sample(r, text.split(CLOSE)[0].strip(), ok))
    return samples


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


def response_logprobs(base, spec: NLASpec, vectors: torch.Tensor, responses: list[list[int]],
                      role: str = "av") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob [N, R] of each response under adapter `role`, and the mask [N, R]."""
    model, tok = base.model, base.tokenizer
    n, dev = len(responses), base.device
    R = max(1, max(len(r) for r in responses))
    P = len(spec.av_prompt_ids)
    resp = torch.full((n, R), tok.pad_token_id, dtype=torch.long, device=dev)
    mask = torch.zeros((n, R), dtype=torch.bool, device=dev)
    for i, r in enumerate(responses):
        resp[i, :len(r)] = torch.tensor(r, device=dev)
        mask[i, :len(r)] = True
    ids = torch.cat([_prompt(spec, n, dev), resp], 1)
    attn = torch.cat([torch.ones((n, P), dtype=torch.long, device=dev), mask.long()], 1)
    with lora.use(model, role), injected(model, ids, vectors, spec) as emb:
        hidden = decoder_of(model)(inputs_embeds=emb, attention_mask=attn, use_cache=False).last_hidden_state
    h = hidden[:, P - 1:P - 1 + R]  # position t predicts token t+1
    head = model.get_output_embeddings().weight
    lp = kernels.token_logprobs(h.reshape(n * R, -1), head, resp.reshape(-1)).view(n, R)
    return lp, mask
