"""Warm-start data: for each sampled position, a short summary of the text at that point: what it
is about, its last words, and its final token (the feature a mid-layer vector encodes best).

Every claim in a summary must be true of the text. The embedded 135M model, asked what a text is
about, invented most of its topics (measured: an eval's explanations shared 11% of their content
words with their context), and the AV learned to invent too. So the summarizer is one of:

- `text` (default): the topic is the text's own most salient recent content words. No model, no
  invention, and instant, so every warm-start vector can have one.
- `self`, or a model dir / HF id: that model writes a topic line, which is used only if most of its
  content words occur in the text; otherwise the text's own words are.
- an OpenAI-compatible endpoint, `http(s)://HOST[:PORT]/v1?model=NAME` (a local vLLM, llama.cpp
  server or Ollama, or a hosted API; key from $OPENAI_API_KEY): a stronger model writes the whole
  summary, checked the same way; answers are cached by prompt, so a rerun costs nothing.

Wording and the order of the three parts vary from example to example (seeded by the position):
an AR trained on one fixed "Topic / Last words / Final token" layout read slots, not meaning, and
lost most of its score when an explanation was reworded or reordered. Summaries are written to
RUN/warmstart/<split>.summaries.jsonl for a user to read; a local model's topics are cached in
RUN/warmstart/<split>.jsonl, an endpoint's answers in RUN/warmstart/endpoint_cache.jsonl.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from . import lora
from .io import append_jsonl, read_jsonl, write_text
from .metrics import STOPWORDS, TEMPLATE_WORDS, _stem, content_words

PROMPT = 'Text: "...{tail}"\n\nIn one short sentence, what is this text about?'
PREFILL = "The text is about"
ENDPOINT_PROMPT = (
    "Here is the end of a text that a language model is reading:\n\n\"...{tail}\"\n\n"
    "In two or three short sentences, say what the text is about at this point, quote its last few "
    "words, and say that its final token is \"{token}\". Use only what the text itself says; do not "
    "guess at anything it does not state. Plain sentences, no lists, under 60 words.")
TAIL_CHARS = 300
MAX_WORDS = 100
# Claim what a vector can carry: the shipped AV trained on 6-word quotes and 4 topic words got
# the quote's last word right ~60% of the time but each earlier one only ~10%, and its topic
# words ~10% (bench/explanation_parts.py); so it learned to invent. With 3 + 3 the warm start
# scored higher (held-out FVE 0.35 vs 0.27) and the paraphrase probe dropped less (0.09 vs 0.16).
LAST_WORDS = 3
TOPIC_WORDS = 3
RECENT_WORDS = 40  # the window the topic words come from (and eval's faithfulness test reads)
CHECK = 0.6  # a summarizer's claim is used when this share of its content words is in the text
FORMAT = 5  # cached rows of another format are rewritten, not reused

# the three parts of a summary, each in several wordings built from words that are scaffolding
# (metrics.TEMPLATE_WORDS) or stopwords: the wording carries no claim about the text
TOPIC = ["Topic: {}.", "The text is about {}.", "About {}.", "Subject: {}.", "Context: {}."]
LAST = ['Last words: "{}".', 'The last words were "{}".', 'The text\'s last words: "{}".',
        'Words just before: "{}".']
FINAL = ['Final token: "{}".', 'The final token is "{}".', 'The last token is "{}".', 'Token: "{}".']
_WORD = re.compile(r"[^\W\d_]{3,}")


def _tail(prefix: str) -> str:
    return prefix[-TAIL_CHARS:].lstrip()


def _rng(key: str) -> random.Random:
    return random.Random(int(hashlib.sha1(key.encode()).hexdigest()[:12], 16))


def topic_words(prefix: str, quoted: list[str], n: int = TOPIC_WORDS) -> list[str]:
    """The text's own topic: content words of its last RECENT_WORDS words, most frequent in the
    whole prefix first, then most recent; words already in the last-words quote are skipped (the
    quote says them). Surface forms as the text last wrote them."""
    quoted_stems = {_stem(w.lower()) for q in quoted for w in _WORD.findall(q)}
    counts = Counter(_stem(w.lower()) for w in _WORD.findall(prefix))
    recent = _WORD.findall(" ".join(prefix.split()[-RECENT_WORDS:]))
    seen, cands = set(), []
    for age, w in enumerate(reversed(recent)):
        s = _stem(w.lower())
        if s in seen or s in quoted_stems or w.lower() in STOPWORDS or w.lower() in TEMPLATE_WORDS:
            continue
        seen.add(s)
        cands.append((-counts[s], age, w))
    return [w for _, _, w in sorted(cands)[:n]]


def checked(claim: str, prefix: str) -> bool:
    """True when at least CHECK of a claim's content words occur in the text (a claim with no
    content words says nothing checkable, and is not used either)."""
    words = content_words(claim)
    text = {_stem(w) for w in _WORD.findall(prefix.lower())}
    return bool(words) and len(words & text) >= CHECK * len(words)


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def compose(prefix: str, token: str, key: str, fits=None, topic: str | None = None) -> str:
    """One summary: topic, last words, final token, in a wording and order drawn from `key`.
    `topic` is a checked sentence from a summarizer, else the text's own words are used. `fits`
    (text -> bool) is the AV's token budget: the topic shrinks first, then the quote, so the
    final-token part, the one a mid-layer vector encodes best, is never the part cut off."""
    rng = _rng(key)
    said = prefix.split()[-LAST_WORDS:]
    tok = token.strip() or repr(token)
    words = topic_words(prefix, said)
    templates = [rng.choice(TOPIC), rng.choice(LAST), rng.choice(FINAL)]
    order = rng.sample(range(3), 3)
    if topic:
        topic = " ".join(topic.replace("\r", " ").split()).rstrip(" .")
        words = topic.split()

    def text(ws: list[str], quote: list[str]) -> str:
        about = " ".join(ws) if topic else (_join(ws) if ws else "")
        parts = [templates[0].format(about) if about else "", templates[1].format(" ".join(quote)),
                 templates[2].format(tok)]
        out = " ".join(parts[i] for i in order if parts[i])
        return " ".join(out.split()[:MAX_WORDS])

    if fits is not None:
        while not fits(text(words, said)) and (words or len(said) > 2):
            if words and (len(words) > 1 or len(said) <= 2):
                words = words[:-1]
            else:
                said = said[1:]
    return text(words, said)


def fit_summary(summary: str, token: str, fits=None) -> str:
    """An endpoint's whole summary, its final-token sentence kept: leading sentences go first,
    then trailing words, until it fits the AV's budget."""
    summary = " ".join(summary.split())
    quote = f'"{token.strip()}"'
    if token.strip() and quote not in summary:
        summary = f"{summary} The final token is {quote}."
    if fits is None or fits(summary):
        return summary
    sents = re.split(r"(?<=[.!?])\s+", summary)
    while len(sents) > 1 and not fits(" ".join(sents)):
        drop = next((i for i, x in enumerate(sents) if quote not in x), None)
        if drop is None:
            break
        sents.pop(drop)
    words = " ".join(sents).split()
    while len(words) > 4 and not fits(" ".join(words)):
        words = words[1:]
    return " ".join(words)


@torch.no_grad()
def summarise(base, prefixes: list[str], max_new: int = 96, batch_size: int = 16, desc: str = "summaries") -> list[str]:
    """A local model's topic line (after PREFILL) for each prefix."""
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


def _first_sentence(text: str) -> str:
    text = " ".join(text.replace("\r", " ").split())
    cut = min([i for i in (text.find(". "), text.find("\n")) if i > 0] + [len(text)])
    return text[:cut].rstrip(" .,;:")


def build(summarizer, acts, path: Path, batch_size: int = 16, max_new: int = 96, fits=None,
          tokenizer=None) -> list[str]:
    """Summaries for every row of `acts`, each fitted to `fits`. `summarizer` is "text", a loaded
    Base (a local model), or an endpoint.Endpoint. What a model says is cached (a local model's in
    `path`, an endpoint's in its sibling endpoint_cache.jsonl), so a killed run resumes and a new
    token budget costs nothing; the composed summaries go to <path stem>.summaries.jsonl."""
    from .endpoint import Endpoint, complete_all
    keys = [f"{int(d)}:{int(p)}" for d, p in zip(acts.doc_id, acts.pos)]
    tok = tokenizer if tokenizer is not None else getattr(summarizer, "tokenizer", None)
    tokens = acts.tokens(tok)
    prefixes = acts.prefixes
    said: dict[str, str] = {}  # key -> what the summarizer said (a topic line or a whole summary)
    if isinstance(summarizer, Endpoint):
        prompts = [[{"role": "user", "content": ENDPOINT_PROMPT.format(tail=_tail(p), token=t.strip())}]
                   for p, t in zip(prefixes, tokens)]
        print(f"[nla] warm start: {len(prompts)} summaries from {summarizer.model} at {summarizer.url}")
        said = dict(zip(keys, complete_all(summarizer, prompts, max_new, 0.0, path.with_name("endpoint_cache.jsonl"))))
    elif summarizer != "text":
        have = {r["key"]: r["topic"] for r in read_jsonl(path, repair=True) if r.get("v") == FORMAT and "topic" in r}
        todo = [i for i, k in enumerate(keys) if k not in have]
        if todo:
            print(f"[nla] warm start: {len(todo)} topic lines ({len(have)} cached) from {summarizer.name}, "
                  f"each checked against its text")
        for s in range(0, len(todo), batch_size * 4):
            idx = todo[s:s + batch_size * 4]
            topics = summarise(summarizer, [prefixes[i] for i in idx], max_new, batch_size,
                               desc=f"summaries {s + len(idx)}/{len(todo)}")
            rows = [{"key": keys[i], "v": FORMAT, "token": tokens[i], "topic": t} for i, t in zip(idx, topics)]
            append_jsonl(path, rows)
            have.update({r["key"]: r["topic"] for r in rows})
        said = have
    out, used = [], 0
    for i, k in enumerate(keys):
        claim = said.get(k)
        if isinstance(summarizer, Endpoint) and claim and checked(claim, prefixes[i]):
            out.append(fit_summary(claim, tokens[i], fits))
            used += 1
            continue
        topic = _first_sentence(claim) if claim and not isinstance(summarizer, Endpoint) else None
        ok = bool(topic) and checked(topic, prefixes[i])
        used += ok
        out.append(compose(prefixes[i], tokens[i], k, fits, topic=topic if ok else None))
    if summarizer != "text":
        print(f"[nla] warm start: {used}/{len(keys)} summarizer claims passed the check against their text; "
              f"the rest use the text's own words")
    rows = [{"key": k, "token": t, "summary": s} for k, t, s in zip(keys, tokens, out)]
    write_text(path.with_name(path.stem + ".summaries.jsonl"), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return out
