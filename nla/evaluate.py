"""`nla-cli eval`: an NLA's FVE and cosine next to the baselines that give them meaning.

All rows score against the same activations with the same denominator, MSE_mean of the split
(the dataset sidecar's MSE of predicting its mean vector), so the mean baseline's FVE is 0 by
construction: it is computed, not written in, and a value far from 0 flags a broken pipeline.

    predict the mean        the sidecar's mean vector for every activation (scale: FVE 0)
    shuffled explanations   each activation scored with another's explanation (a seeded
                            single-cycle permutation, so none keeps its own): what a generic
                            explanation of this corpus is worth
    AR on the raw prefix    the AR reads the document up to the token instead of an explanation:
                            how much the context alone gives
    warm start              the SFT checkpoint beside an RL one (RUN/sft vs RUN/rl)
    steganography probe     the explanation's sentences shuffled, and paraphrased by the base
                            model (adapters off, greedy); a small FVE drop means the information
                            lives in what the text says, not in a private code of word order or
                            token choice. The paraphrase drop is also split by whether the
                            paraphrase kept the token the explanation quotes: a drop where it
                            was lost is the paraphraser's loss of content, not a hidden code

Beside the table, two text tests, each against chance (another activation's token or context
under the same derangement): the token test (does the explanation quote the activation's token?)
and the faithfulness test (are the explanation's content words in the activation's recent text?).

Writes report.md, report.json and report.png (matplotlib) to --out and prints the table.
"""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import lora, reference
from .collect import SPLITS, Activations, load_activations
from .confidence import _SENTENCE_END, keep_confident, scored_sentences, sentences
from .config import _check, opt
from .errors import NLAError
from .io import write_json, write_text
from .metrics import content_hit_counts, content_hits, score_vectors, token_hits
from .models import load_base
from .reconstructor import MAX_EXPLANATION_TOKENS

PARAPHRASE = ("Rewrite the following notes in your own words. Keep every piece of information and add "
              "nothing. Reply with the rewrite only.\n\n{text}")
CONFIDENCE_SWEEP = (0.05, 0.1, 0.2, 0.4)  # the probe's thresholds besides --min-confidence: FVE against faithfulness
# the faithfulness test's context, about two sentences: wider than the three "Last words" the warm
# start quotes, so a topic word can hit as well as a copied quote, and narrow enough that a long
# document's every word does not count as "this activation's context"
CONTENT_WINDOW = 40


@dataclass
class EvalConfig:
    checkpoint: str = opt("", "NLA checkpoint: RUN/rl, a run dir, a reference-layout dir (av/ + ar/) or AV_DIR,AR_DIR")
    data: str = opt("", "activation dataset from `nla-cli collect`, of the checkpoint's model and layer")
    split: str = opt("heldout", f"split to evaluate: {', '.join(SPLITS)}")
    max_n: int = opt(0, "evaluate at most this many activations of the split (a seeded subset; 0 = all)")
    greedy: bool = opt(False, "greedy decoding (the default)")
    sample: bool = opt(False, "sample explanations at --temperature instead of greedy decoding")
    temperature: float = opt(1.0, "sampling temperature with --sample")
    max_new: int = opt(64, "length cap of an explanation in tokens")
    out: str = opt("", "report directory (default: <checkpoint>/eval-<split>)")
    model: str = opt("", "plain base model for the paraphrase probe of a reference-layout checkpoint "
                         "(default: the dataset's model)")
    batch_size: int = opt(16, "rows per forward pass")
    seed: int = opt(0, "seed for the subset, the shuffles and sampling")
    device: str = opt("auto", "auto, cpu, cuda, ...")
    load_in_4bit: bool = opt(False, "4-bit nf4 base (bitsandbytes)")
    min_confidence: float = opt(0.1, "the confidence probe: also score the explanations less their sentences whose "
                                     "least sure content word the AV wrote at a probability under this (0 = skip)")

    def __post_init__(self):
        self.split = "heldout" if self.split == "held-out" else self.split
        _check(bool(self.checkpoint), "--checkpoint is required (e.g. runs/smollm2-L20/rl)")
        _check(bool(self.data), "--data is required: an activation dataset from `nla-cli collect`")
        _check(self.split in SPLITS, f"--split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        _check(not (self.greedy and self.sample), "--greedy and --sample exclude each other")
        _check(self.max_n >= 0, "--max-n must be >= 0")
        _check(self.temperature > 0, "--temperature must be > 0")
        _check(self.max_new >= 4, "--max-new must be >= 4")
        _check(self.batch_size >= 1, "--batch-size must be >= 1")
        _check(0 <= self.min_confidence < 1, f"--min-confidence must be in [0, 1), got {self.min_confidence}")

    @property
    def decoding(self) -> dict:
        if self.sample:
            return dict(mode="sample", temperature=self.temperature, seed=self.seed, max_new=self.max_new)
        return dict(mode="greedy", max_new=self.max_new)


def derangement(n: int, seed: int) -> list[int]:
    """A random single n-cycle (Sattolo's shuffle): perm[i] != i for every i."""
    if n < 2:
        raise ValueError("a derangement needs at least 2 items")
    rng = random.Random(seed)
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)  # j < i, never i itself: this is what makes it one cycle
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def shuffle_sentences(text: str, seed: int) -> str:
    """The same sentences in another order (every one moves); a single sentence is left as is."""
    parts = sentences(text)
    if len(parts) < 2:
        return text
    order = [parts[k] for k in derangement(len(parts), seed)]
    # a snippet that does not end like a sentence keeps a line break after it, so it stays its own
    return "".join(p + (" " if _SENTENCE_END.search(p + " ", len(p) - 1) else "\n") for p in order).strip()


def tail(tok, text: str, n_tokens: int = MAX_EXPLANATION_TOKENS) -> str:
    """The last n tokens of a text: the AR keeps the start of long inputs, but what a prefix says
    about its final token is at its end."""
    ids = tok.encode(text, add_special_tokens=False)
    return text if len(ids) <= n_tokens else tok.decode(ids[-n_tokens:])


@torch.no_grad()
def paraphrase(base, texts: list[str], batch_size: int = 16, max_new: int | None = None) -> list[str]:
    """Greedy paraphrases by the plain base model (adapters off)."""
    tok = base.tokenizer
    chat = bool(getattr(tok, "chat_template", None))
    prompts = [tok.apply_chat_template([{"role": "user", "content": PARAPHRASE.format(text=t)}], tokenize=False,
                                       add_generation_prompt=True) if chat else PARAPHRASE.format(text=t) + "\n\n"
               for t in texts]
    longest = max((len(tok.encode(t, add_special_tokens=False)) for t in texts), default=0)
    max_new = max_new or min(256, int(1.5 * longest) + 16)
    side, out = tok.padding_side, []
    tok.padding_side = "left"  # generation continues from the right end of every row
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=not chat)
            enc = enc.to(base.device)
            with lora.use(base.model, None):
                gen = base.model.generate(**enc, max_new_tokens=max_new, do_sample=False, temperature=None, top_p=None,
                                          top_k=None, pad_token_id=tok.pad_token_id)
            out += [tok.decode(g[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for g in gen]
    finally:
        tok.padding_side = side
    return out


def paraphrase_split(texts: list[str], paras: list[str], tokens: list[str], nla_fve: list[float],
                     para_fve: list[float]) -> dict:
    """The paraphrase probe's drop, split over the explanations that quote their activation's token:
    those whose paraphrase still contains it and those whose paraphrase lost it. The 135M
    paraphraser often drops a whole sentence; only a drop where the content survived points to a
    code in the wording."""
    def drop(idx):
        return sum(nla_fve[i] - para_fve[i] for i in idx) / len(idx) if idx else None

    quoted = [i for i, (x, t) in enumerate(zip(texts, tokens)) if t.strip() and f'"{t.strip()}"' in x]
    kept = [i for i in quoted if tokens[i].strip() in paras[i]]
    lost = sorted(set(quoted) - set(kept))
    return dict(quoted=len(quoted), kept=len(kept), drop_kept=drop(kept), drop_lost=drop(lost))


def _take(acts: Activations, n: int, seed: int) -> Activations:
    if not n or n >= len(acts):
        return acts
    idx = torch.randperm(len(acts), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return Activations(acts.meta, acts.vectors[idx], acts.doc_id[idx], acts.pos[idx], acts.token_id[idx],
                       acts.split[idx], [acts.prefixes[i] for i in idx.tolist()])


def _row(key: str, method: str, sc: dict | None, what: str, nla: dict | None = None) -> dict:
    """A report row; fve_drop = the NLA's FVE minus this row's (for the warm start: what RL added)."""
    row = dict(key=key, method=method, fve=None, cos=None, mse=None, fve_drop=None, what=what)
    if sc is not None:
        row.update(fve=sc["fve"], cos=sc["cos"], mse=sc["mse"])
        if nla is not None and sc["fve"] is not None and nla["fve"] is not None:
            row["fve_drop"] = nla["fve"] - sc["fve"]
    return row


def evaluate(cfg: EvalConfig) -> dict:
    acts = load_activations(cfg.data)
    n_split = int((acts.split == SPLITS.index(cfg.split)).sum())
    if n_split == 0:
        raise NLAError(f"{cfg.data} has no {cfg.split!r} activations; pick another --split")
    acts = _take(acts.select(cfg.split), cfg.max_n, cfg.seed)
    loc = reference.locate(cfg.checkpoint)
    m = acts.meta
    reference.check_match(loc, f"the dataset {cfg.data}", model=m["model"], layer=m["layer"], d_model=m["d_model"])
    native = loc.layout == "native"
    plain = load_base(m["model"] if native else (cfg.model or m["model"]), device=cfg.device,
                      load_in_4bit=cfg.load_in_4bit)
    nla = reference.load(loc, plain if native else None, cfg.device, cfg.load_in_4bit)
    mse_mean = float(m["mse_mean"].get(cfg.split, m["mse_mean"]["train"]))
    mse_src = f"split {cfg.split}" if cfg.split in m["mse_mean"] else "train (the split has none in the sidecar)"
    vec, n, bs = acts.vectors.float(), len(acts), cfg.batch_size
    temp = cfg.temperature if cfg.sample else 0.0
    print(f"[nla] eval: {loc} ({loc.layout}, {loc.stage}) on {n} {cfg.split} activations of {cfg.data}, "
          f"{cfg.decoding['mode']} decoding", file=sys.stderr)

    score = lambda preds: score_vectors(preds, vec, mse_mean)  # noqa: E731
    read = lambda texts: score(nla.reconstruct(texts, bs))  # noqa: E731  (the AR reads texts)
    samples = nla.explain_all(vec, cfg.max_new, temp, cfg.seed, bs, desc="explain")
    texts = [s.text for s in samples]
    preds = nla.reconstruct(texts, bs)
    real = score(preds)
    step = f", step {loc.meta['step']}" if "step" in loc.meta else ""
    rows = [_row("nla", f"NLA ({loc.stage}{step})", real, "explain, then reconstruct from the explanation")]
    rows.append(_row("mean", "predict the mean", score(acts.mean_vector.expand(n, -1)),
                     "the dataset's mean vector for every activation; FVE 0 on the whole split by definition (near 0 on a --max-n subset)", real))
    perm = derangement(n, cfg.seed) if n >= 2 else None  # the AR read each text already: permute its outputs
    rows.append(_row("shuffled", "shuffled explanations", score(preds[perm]) if perm else None,
                     "each activation scored with another's explanation" if perm else "needs >= 2 activations", real))
    tok = nla.ar.tokenizer
    rows.append(_row("prefix", "AR on the raw text prefix", read([tail(tok, p) for p in acts.prefixes]),
                     f"the AR reads the document up to the token (its last {MAX_EXPLANATION_TOKENS} tokens)", real))
    reordered = [shuffle_sentences(t, cfg.seed + i) for i, t in enumerate(texts)]
    n_multi = sum(len(sentences(t)) >= 2 for t in texts)
    rows.append(_row("sentence_shuffle", "probe: sentences shuffled", read(reordered),
                     f"same sentences, another order ({n_multi}/{n} explanations have >= 2 sentences)", real))
    para = paraphrase(plain, texts, bs)
    para_sc = read(para)
    rows.append(_row("paraphrase", "probe: paraphrased by the base", para_sc,
                     "the base model (adapters off, greedy) rewrites the explanation", real))

    # the confidence probe: one log-prob pass, then the explanations gated at each threshold
    sure, sweep = None, []
    if cfg.min_confidence > 0:
        scored = scored_sentences(nla, vec, samples, bs)
        n_all = sum(len(sc) for sc in scored)
        for p in sorted({*CONFIDENCE_SWEEP, cfg.min_confidence}):
            gated = [keep_confident(sc, p) for sc in scored]
            n_kept = sum(c >= p for sc in scored for _, c in sc)
            sc_p = read(gated)
            sweep.append(dict(min_p=p, fve=sc_p["fve"], faithful=content_hits(gated, acts.prefixes, CONTENT_WINDOW),
                              kept=n_kept / max(1, n_all)))
            if p == cfg.min_confidence:
                sure, sure_sc, sure_kept = gated, sc_p, n_kept
        rows.append(_row("confident", f"probe: unsure sentences dropped (p < {cfg.min_confidence:g})", sure_sc,
                         f"the sentences whose least sure content word the AV wrote at p < {cfg.min_confidence:g} "
                         f"left out ({sure_kept} of {n_all} sentences kept)", real))

    tokens = acts.tokens(tok)
    para_split = (paraphrase_split(texts, para, tokens, real["row_fve"], para_sc["row_fve"])
                  if real["row_fve"] is not None and para_sc["row_fve"] is not None else None)
    hits = dict(nla=token_hits(texts, tokens), shuffled=token_hits(texts, [tokens[j] for j in perm]) if perm else None,
                warm_start=None)
    # the faithfulness test: are the explanation's words about this activation's text? Chance pairs
    # each explanation with another's context under the same derangement as the token test
    ctx = acts.prefixes
    content = dict(window=CONTENT_WINDOW, nla=content_hits(texts, ctx, CONTENT_WINDOW),
                   shuffled=content_hits(texts, [ctx[j] for j in perm], CONTENT_WINDOW) if perm else None,
                   warm_start=None, confident=content_hits(sure, ctx, CONTENT_WINDOW) if sure is not None else None,
                   confident_shuffled=content_hits(sure, [ctx[j] for j in perm], CONTENT_WINDOW)
                   if sure is not None and perm else None, min_confidence=cfg.min_confidence)
    row_content = content_hit_counts(texts, ctx, CONTENT_WINDOW)
    ws = reference.warm_start_of(loc)
    if ws is not None:  # last: loading it replaces the RL adapters in the shared base
        same_ranks = all(ws.meta.get(k) == loc.meta.get(k) for k in ("lora_rank_av", "lora_rank_ar"))
        into = plain if same_ranks else load_base(m["model"], device=cfg.device, load_in_4bit=cfg.load_in_4bit)
        ws_nla = reference.load(ws, into)
        ws_texts = [s.text for s in ws_nla.explain_all(vec, cfg.max_new, temp, cfg.seed, bs, desc="warm start")]
        hits["warm_start"] = token_hits(ws_texts, tokens)
        content["warm_start"] = content_hits(ws_texts, ctx, CONTENT_WINDOW)
        rows.insert(1, _row("warm_start", f"warm start ({ws.path.name})", score(ws_nla.reconstruct(ws_texts, bs)),
                            "the SFT checkpoint before RL, same decoding (drop = what RL added)", real))

    report = dict(
        checkpoint=str(loc), layout=loc.layout, stage=loc.stage, step=loc.meta.get("step"), model=m["model"],
        layer=m["layer"], d_model=m["d_model"], data=str(cfg.data), split=cfg.split, n=n, n_split=n_split,
        seed=cfg.seed, decoding=cfg.decoding, mse_mean=mse_mean, mse_mean_source=mse_src,
        ok_frac=sum(s.ok for s in samples) / n, rows=rows, token_hits=hits, content_hits=content,
        paraphrase_split=para_split, confidence_sweep=sweep,
        warm_start=str(ws.path) if ws else "no warm-start checkpoint beside this one",
        examples=[dict(prefix_tail=acts.prefixes[i][-160:], explanation=texts[i], sentences_shuffled=reordered[i],
                       paraphrase=para[i], fve=real["row_fve"][i]) for i in range(min(3, n))],
        per_activation=[dict(doc_id=int(acts.doc_id[i]), pos=int(acts.pos[i]),
                             token=tokens[i], explanation=texts[i], ok=samples[i].ok,
                             **(dict(confident=sure[i]) if sure is not None else {}),
                             fve=real["row_fve"][i], cos=real["row_cos"][i],
                             content_found=row_content[i][0], content_words=row_content[i][1]) for i in range(n)])
    out = Path(cfg.out) if cfg.out else default_out(loc, cfg.split)
    out.mkdir(parents=True, exist_ok=True)
    report["png"] = _plot(out / "report.png", report)
    write_json(out / "report.json", report)
    md = render_markdown(report)
    write_text(out / "report.md", md)
    print(md)
    files = "report.md, report.json" + (", report.png" if report["png"] else "")
    print(f"[nla] wrote {files} to {out}", file=sys.stderr)
    return report


def default_out(loc: reference.Located, split: str) -> Path:
    """<checkpoint>/eval-<split>; for the NLA shipped inside the package, runs/ here instead."""
    from .explain import SHIPPED
    if SHIPPED.resolve() in Path(loc.path).resolve().parents:
        return Path("runs") / f"eval-{loc.path.name}-{split}"
    return Path(loc.path) / f"eval-{split}"


def _f(x, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def _pct(x) -> str:
    return "–" if x is None else f"{x:.0%}"


def render_markdown(r: dict) -> str:
    d = r["decoding"]
    dec = f"sampled at temperature {d['temperature']:g} (seed {d['seed']})" if d["mode"] == "sample" else "greedy"
    lines = [f"# NLA evaluation: `{r['checkpoint']}`", "",
             f"- {r['layout']} checkpoint, stage {r['stage']}; model `{r['model']}`, layer {r['layer']}, "
             f"d_model {r['d_model']}",
             f"- data `{r['data']}`, split {r['split']}: {r['n']} of {r['n_split']} activations (seed {r['seed']})",
             f"- decoding: {dec}, at most {d['max_new']} new tokens; {r['ok_frac']:.0%} of explanations closed "
             f"their tag",
             f"- FVE = 1 - MSE / MSE_mean with MSE_mean = {r['mse_mean']:.4f} ({r['mse_mean_source']}); "
             f"MSE on vectors normalised to sqrt(d), = 2(1 - cos)",
             f"- warm start: {r['warm_start']}", "",
             "| method | FVE | cos | FVE drop (NLA - row) | what it measures |", "|---|---:|---:|---:|---|"]
    lines += [f"| {w['method']} | {_f(w['fve'])} | {_f(w['cos'])} | {_f(w['fve_drop'])} | {w['what']} |"
              for w in r["rows"]]
    drop = {w["key"]: w["fve_drop"] for w in r["rows"]}
    if drop.get("sentence_shuffle") is not None:
        lines += ["", f"Steganography probe: shuffling sentences drops FVE by {_f(drop['sentence_shuffle'])}, "
                      f"paraphrasing by {_f(drop.get('paraphrase'))}. A small drop means the information lives in "
                      f"what the explanation says, not in a private code of order or wording."]
    ps = r.get("paraphrase_split")
    if ps and ps["quoted"]:
        lines += ["", f"Paraphrase probe, split: of the {ps['quoted']} explanations that quote their token, the "
                      f"paraphrase kept it in {ps['kept']} (FVE drop there {_f(ps['drop_kept'])}) and lost it in "
                      f"{ps['quoted'] - ps['kept']} (drop {_f(ps['drop_lost'])}). A drop where the token was lost "
                      f"is the paraphraser's loss of content, not a hidden code."]
    h = r["token_hits"]
    lines += ["", f"Token test: the explanation quotes the activation's own token in {_pct(h['nla'])} of cases, "
                  f"another activation's token in {_pct(h['shuffled'])} (chance)"
                  + (f"; the warm start quotes its own in {_pct(h['warm_start'])}" if h["warm_start"] is not None else "")
                  + ". A mid-layer vector encodes its token well: a gap over chance shows the AV reads the vector."]
    c = r["content_hits"]
    lines += ["", f"Faithfulness test: explanations' content words found in the activation's last {c['window']} words "
                  f"of context: {_pct(c['nla'])} (chance {_pct(c['shuffled'])})"
                  + (f"; warm start {_pct(c['warm_start'])}" if c["warm_start"] is not None else "")
                  + ". Content words leave out stopwords and the explanation format's own words (topic, token, ...)."]
    if c.get("confident") is not None:
        drop = {w["key"]: w for w in r["rows"]}.get("confident", {}).get("fve_drop")
        lines += ["", f"Confidence probe: without the sentences the AV was unsure of (a content word written at "
                      f"p < {c['min_confidence']:g}), {_pct(c['confident'])} of the content words are found in the "
                      f"context (chance {_pct(c.get('confident_shuffled'))}), at an FVE cost of {_f(drop)}. A "
                      f"higher share than the test above means the AV's wrong words are the ones it was unsure of."]
    if r.get("confidence_sweep"):
        lines += ["", "| sentences left out below p | FVE | content words found | sentences kept |", "|---:|---:|---:|---:|"]
        lines += [f"| {w['min_p']:g} | {_f(w['fve'])} | {_pct(w['faithful'])} | {_pct(w['kept'])} |"
                  for w in r["confidence_sweep"]]
    if not r["png"]:
        lines += ["", "(no chart: matplotlib is not installed; pip install matplotlib)"]
    lines += ["", "## Examples"]
    flat = lambda t: " ".join(t.split())  # noqa: E731  (a line break would end the list item)
    for e in r["examples"]:
        lines += ["", f"- context: …{e['prefix_tail']!r}",
                  f"  - explanation (FVE {_f(e['fve'])}): {flat(e['explanation'])}",
                  f"  - sentences shuffled: {flat(e['sentences_shuffled'])}",
                  f"  - paraphrase: {flat(e['paraphrase'])}"]
    return "\n".join(lines) + "\n"


def _plot(path: Path, r: dict) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [w for w in r["rows"] if w["cos"] is not None]
    names = [w["method"] for w in rows][::-1]
    fig, ax = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.6), sharey=True)
    for a, key, title in ((ax[0], "fve", "FVE"), (ax[1], "cos", "cosine")):
        vals = [w[key] if w[key] is not None else 0.0 for w in rows][::-1]
        a.barh(names, vals, color=["tab:blue" if n.startswith("NLA") else "tab:grey" for n in names])
        a.axvline(0, color="black", lw=0.8)
        a.set(title=f"{title} ({r['split']}, n={r['n']}, {r['decoding']['mode']})")
        for y, v in enumerate(vals):
            a.annotate(f"{v:.3f}", (v, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(".report.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return str(path)
