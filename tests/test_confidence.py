"""Which sentences the AV was sure of: a sentence is as sure as its least sure content word, a
word as its first token with a letter in it; `confident` applies that to an NLA's own samples, in
batches; explain's --min-confidence shows only those sentences and scores what it shows. And the
two bench tools behind it: the context probe reads words that vectors carry (and only those), the
confidence curve files each word under its part of the explanation."""
import json
import math

import pytest
import torch
from test_explain import PROMPT, cli, make_tiny_run, one_line_error

from nla import reference
from nla.collect import load_activations
from nla.confidence import confident, keep_confident, sentence_confidence, sentences, word_probs
from nla.models import load_base
from nla.spec import CLOSE
from nla.verbalizer import response_logprobs


@pytest.fixture(scope="module")
def tiny_run(tiny_path, tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("confidence"), tiny_path)


TEXT = 'The last words were "capital city". Topic: river and mill. The final token is "is".'


def _ids_and_logprobs(tok, low: dict):
    """TEXT as the AV would write it, every token at p=0.9 but the first occurrence of each
    token text in `low`, at the given p."""
    ids = tok.encode(" " + TEXT + CLOSE, add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    lp = [math.log(0.9)] * len(ids)
    for piece, p in low.items():
        lp[pieces.index(piece)] = math.log(p)
    return ids, lp


def test_a_sentence_is_as_sure_as_its_least_sure_content_word(tokenizer):
    # the opening quote is format: its probability is not the choice of "capital"
    ids, lp = _ids_and_logprobs(tokenizer, {' "': 0.01, " river": 0.05})
    scored = sentence_confidence(tokenizer, ids, lp, TEXT)
    assert [s for s, _ in scored] == sentences(TEXT)
    assert [p for _, p in scored] == pytest.approx([0.9, 0.05, 1.0])  # the last claims nothing: "is" is a stopword
    assert keep_confident(scored, 0.1) == 'The last words were "capital city". The final token is "is".'
    assert keep_confident(scored, 0.0) == TEXT
    assert keep_confident(scored, 0.95) == 'The final token is "is".'

    ids, lp = _ids_and_logprobs(tokenizer, {" city": 0.2})  # a quoted word after the first
    assert [p for _, p in sentence_confidence(tokenizer, ids, lp, TEXT)] == pytest.approx([0.2, 0.9, 1.0])
    text, words = word_probs(tokenizer, ids, lp)
    assert [text[a:b] for a, b, _ in words][:6] == ["The", "last", "words", "were", '"capital', 'city".']


def test_confident_keeps_whole_sentences_of_each_sample(tiny_run, tiny_path, monkeypatch):
    base = load_base(tiny_path, device="cpu")
    nla = reference.load(reference.locate(tiny_run["rl"]), base)
    vec = load_activations(tiny_run["acts"]).select("heldout").vectors.float()[:6]
    samples = nla.explain_all(vec, 24)
    texts = [s.text for s in samples]
    assert confident(nla, vec, samples, 0.0) == texts
    lp, _ = response_logprobs(nla.av, nla.spec, vec, [s.ids for s in samples])
    seen = []

    def spy(base_, spec, vectors, responses, role="av"):
        seen.append((vectors.clone(), responses))
        return response_logprobs(base_, spec, vectors, responses, role)
    monkeypatch.setattr("nla.verbalizer.response_logprobs", spy)
    confident(nla, vec, samples, 0.5, batch_size=4)  # each sample is scored with its own vector
    assert torch.equal(torch.cat([v for v, _ in seen]), vec) and sum((r for _, r in seen), []) == [s.ids for s in samples]
    dropped = 0
    for p in (1e-6, 1e-4, 0.5):
        got = confident(nla, vec, samples, p, batch_size=4)  # 4 + 2: each sample meets its own log-probs
        for s, g, row in zip(samples, got, lp):
            want = keep_confident(sentence_confidence(base.tokenizer, s.ids, row[:len(s.ids)].tolist(), s.text), p)
            assert g == want
            kept = sentences(g)
            assert kept == [x for x in sentences(s.text) if x in kept]
            dropped += len(sentences(s.text)) - len(kept)
    assert dropped > 0  # a random tiny AV is unsure of nearly everything


def test_explain_min_confidence(tiny_run):
    args = ("explain", PROMPT, "--checkpoint", tiny_run["rl"], "--tokens", "1..4", "--max-new", "24", "--json",
            "--device", "cpu")
    full = json.loads(cli(*args).stdout)
    r = cli(*args, "--min-confidence", "0.5")
    assert r.exit_code == 0, r.output[-3000:]
    sure = json.loads(r.stdout)
    assert "left out" in sure["decoding"] and "left out" not in full["decoding"]
    for a, b in zip(full["tokens"], sure["tokens"]):
        kept = sentences(b["explanation"])
        assert kept == [x for x in sentences(a["explanation"]) if x in kept] and b["written"] == a["explanation"]
        assert math.isfinite(b["fve"])
    assert any(a["explanation"] != b["explanation"] for a, b in zip(full["tokens"], sure["tokens"]))
    one_line_error(cli(*args, "--min-confidence", "1.5"), "--min-confidence must be in [0, 1)")


def _synthetic_acts(informative: bool, n_docs: int = 300, d: int = 32):
    """One activation per document; each document names one of 20 words 5 words before its end.
    Informative vectors point along that word's direction, the others are noise."""
    from nla.collect import SPLITS, Activations
    words = [f"{w}" for w in ("apple", "river", "engine", "violin", "glacier", "harbor", "saddle", "lantern",
                               "meadow", "copper", "falcon", "pepper", "canyon", "tunnel", "walnut", "marble",
                               "orchid", "anchor", "basket", "cactus")]
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(len(words), d, generator=g)
    pick = torch.randint(len(words), (n_docs,), generator=g)
    noise = torch.randn(n_docs, d, generator=g)
    vectors = (dirs[pick] * 3 + noise) if informative else noise
    prefixes = [f"Some text about the {words[k]} and then it was over" for k in pick.tolist()]
    split = torch.tensor([SPLITS.index("heldout") if i % 5 == 0 else SPLITS.index("rl") for i in range(n_docs)])
    ids = torch.arange(n_docs)
    return Activations({"layer": 0}, vectors, ids, ids, ids, split, prefixes)


def test_context_probe_reads_words_a_vector_carries_and_no_others():
    from bench.context_probe import probe, topic_targets
    assert topic_targets("the apple fell in the river and then it was over") == {"apple", "fell", "river"}
    told = probe(_synthetic_acts(True), "told", epochs=150, min_count=2, seed=0)
    blind = probe(_synthetic_acts(False), "blind", epochs=150, min_count=2, seed=0)
    assert told["p1"] > 0.8 and told["prior1"] < 0.2  # the word is there to read, and guessing is poor
    assert blind["p1"] < 0.3  # noise vectors: no better than guessing the common words


def test_confidence_curve_parts(tokenizer):
    from bench.confidence_curve import explanation_words
    ids, lp = _ids_and_logprobs(tokenizer, {})
    parts = {w: part for w, part, _ in explanation_words(tokenizer, ids, lp, TEXT)}
    assert parts['"capital'] == parts['city".'] == "last words"
    assert parts["river"] == parts["mill."] == "topic" and parts['"is".'] == "token" and parts["The"] == "other"
