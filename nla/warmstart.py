"""Warm-start data: for each sampled position, a short summary of what a language model is
"thinking about" at the end of the text prefix: a topic line written by an instruct model,
then the last words and the final token, read off the prefix (see PROMPT for why).

Without it the AV emits nonsense and RL can degenerate (nla-method.md). The summarizer is the
target itself by default (no adapter live), or any instruct model. Summaries are cached in a
jsonl keyed by (doc, pos) and appended batch by batch, so a killed run loses at most a batch.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from . import lora
from .io import append_jsonl, read_jsonl

# The summarizer writes only the topic line. Measured on SmolLM2-135M: with a worked example in
# the prompt it copied the example's content into most summaries; asked for one sentence about
# the text, it stays on the text. The local facts (the last words, the final token) are what a
# mid-layer residual encodes most, and a small summarizer gets them wrong, so they are read off
# the prefix itself.
PROMPT = 'Text: "...{tail}"\n\nIn one short sentence, what is this text about?'
PREFILL = "The text is about"
TAIL_CHARS = 300
MAX_WORDS = 100
LAST_WORDS = 6
FORMAT = 3  # cached rows of another format are rewritten, not reused


def _tail(prefix: str) -> str:
    return prefix[-TAIL_CHARS:].lstrip()


def compose(topic: str, prefix: str, token: str, fits=None) -> str:
    """Three features, the last about the final token, under MAX_WORDS words. `fits`
    (text -> bool) is the AV's token budget: the topic and then the quoted words shrink until the
    text fits, so the final-token line, the part a mid-layer vector encodes best, is never the part
    cut off. (Measured: at the cpu presets' 36-token cap, cutting from the end dropped it from
    every AV target, and the AR learned to rely on lines the AV never wrote.)"""
    topic = " ".join(topic.replace("\r", " ").split())
    cut = min([i for i in (topic.find(". "), topic.find("\n")) if i > 0] + [len(topic)])
    topic_words = (topic[:cut].rstrip(" .,;:") or "an unclear subject").split()
    said = prefix.split()[-LAST_WORDS:]
    tok = token.strip() or repr(token)

    def text(t: list[str], w: list[str]) -> str:
        out = f'Topic: {" ".join(t)}. Last words: "{" ".join(w)}". Final token: "{tok}".'
        return " ".join(out.split()[:MAX_WORDS])

    if fits is not None:
        while not fits(text(topic_words, said)) and (len(topic_words) > 4 or len(said) > 2):
            if len(topic_words) > 4 and (len(topic_words) > 8 or len(said) <= 2):
                topic_words = topic_words[:-1]
            else:
                said = said[1:]
    return text(topic_words, said)


@torch.no_grad()
def summarise(base, prefixes: list[str], max_new: int = 96, batch_size: int = 16, desc: str = "summaries") -> list[str]:
    """The summarizer's topic line (after PREFILL) for each prefix."""
    tok, model = base.tokenizer, base.model
    out = []
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        for i in tqdm(range(0, len(prefixes), batch_size), desc=desc, leave=False):
            texts = []
            for prefix in prefixes[i:i + batch_size]:
                msg = PROMPT.format(tail=_tail(prefix))
                texts.append((tok.apply_chat_template([{"role": "user", "content": msg}], tokenize=False,
                                                      add_generation_prompt=True) if tok.chat_template else msg + "\n")
                             + PREFILL)
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(base.device)
            with lora.use(model, None):
                gen = model.generate(**enc, max_new_tokens=min(max_new, 32), do_sample=False, repetition_penalty=1.1,
                                     pad_token_id=tok.pad_token_id)
            out += [tok.decode(g, skip_special_tokens=True) for g in gen[:, enc["input_ids"].shape[1]:]]
    finally:
        tok.padding_side = side
    return out


def build(base, acts, path: Path, batch_size: int = 16, max_new: int = 96, fits=None) -> list[str]:
    """Summaries for every row of `acts`, each fitted to `fits` (see compose). The summarizer's
    topic lines are cached in `path` (jsonl), so a killed run resumes and a new token budget
    costs nothing."""
    keys = [f"{int(d)}:{int(p)}" for d, p in zip(acts.doc_id, acts.pos)]
    have = {r["key"]: r["topic"] for r in read_jsonl(path, repair=True) if r.get("v") == FORMAT}
    todo = [i for i, k in enumerate(keys) if k not in have]
    if todo:
        print(f"[nla] warm start: writing {len(todo)} summaries ({len(have)} cached) with {base.name}")
    tokens = acts.tokens(base.tokenizer)
    for s in range(0, len(todo), batch_size * 4):
        idx = todo[s:s + batch_size * 4]
        topics = summarise(base, [acts.prefixes[i] for i in idx], max_new, batch_size,
                           desc=f"summaries {s + len(idx)}/{len(todo)}")
        rows = [{"key": keys[i], "v": FORMAT, "token": tokens[i], "topic": t} for i, t in zip(idx, topics)]
        append_jsonl(path, rows)
        have.update({r["key"]: r["topic"] for r in rows})
    return [compose(have[k], acts.prefixes[i], tokens[i], fits) for i, k in enumerate(keys)]
