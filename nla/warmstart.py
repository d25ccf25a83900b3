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
FORMAT = 2  # cached summaries of another format are rewritten, not reused


def _tail(prefix: str) -> str:
    return prefix[-TAIL_CHARS:].lstrip()


def compose(topic: str, prefix: str, token: str) -> str:
    """Three numbered features, the last about the final token, under MAX_WORDS words."""
    topic = " ".join(topic.replace("\r", " ").split())
    cut = min([i for i in (topic.find(". "), topic.find("\n")) if i > 0] + [len(topic)])
    topic = topic[:cut].rstrip(" .,;:") or "an unclear subject"
    words = " ".join(prefix.split()[-LAST_WORDS:])
    tok = token.strip() or repr(token)
    text = f'1. The text is about {topic}. 2. It has just said "{words}". 3. The final token is "{tok}".'
    return " ".join(text.split()[:MAX_WORDS])


@torch.no_grad()
def summarise(base, prefixes: list[str], tokens: list[str], max_new: int = 96, batch_size: int = 16,
              desc: str = "summaries") -> list[str]:
    tok, model = base.tokenizer, base.model
    out = []
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        for i in tqdm(range(0, len(prefixes), batch_size), desc=desc, leave=False):
            chunk = list(zip(prefixes[i:i + batch_size], tokens[i:i + batch_size]))
            texts = []
            for prefix, token in chunk:
                msg = PROMPT.format(tail=_tail(prefix))
                texts.append((tok.apply_chat_template([{"role": "user", "content": msg}], tokenize=False,
                                                      add_generation_prompt=True) if tok.chat_template else msg + "\n")
                             + PREFILL)
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(base.device)
            with lora.use(model, None):
                gen = model.generate(**enc, max_new_tokens=min(max_new, 32), do_sample=False, repetition_penalty=1.1,
                                     pad_token_id=tok.pad_token_id)
            for (prefix, token), g in zip(chunk, gen[:, enc["input_ids"].shape[1]:]):
                out.append(compose(tok.decode(g, skip_special_tokens=True), prefix, token))
    finally:
        tok.padding_side = side
    return out


def build(base, acts, path: Path, batch_size: int = 16, max_new: int = 96) -> list[str]:
    """Summaries for every row of `acts`, cached in `path` (jsonl); resumes where it stopped."""
    keys = [f"{int(d)}:{int(p)}" for d, p in zip(acts.doc_id, acts.pos)]
    have = {r["key"]: r["summary"] for r in read_jsonl(path, repair=True) if r.get("v") == FORMAT}
    todo = [i for i, k in enumerate(keys) if k not in have]
    if todo:
        print(f"[nla] warm start: writing {len(todo)} summaries ({len(have)} cached) with {base.name}")
    tokens = [base.tokenizer.decode([int(t)]) for t in acts.token_id]
    for s in range(0, len(todo), batch_size * 4):
        idx = todo[s:s + batch_size * 4]
        texts = summarise(base, [acts.prefixes[i] for i in idx], [tokens[i] for i in idx], max_new, batch_size,
                          desc=f"summaries {s + len(idx)}/{len(todo)}")
        rows = [{"key": keys[i], "v": FORMAT, "token": tokens[i], "summary": t} for i, t in zip(idx, texts)]
        append_jsonl(path, rows)
        have.update({r["key"]: r["summary"] for r in rows})
    return [have[k] for k in keys]
