"""`nla-cli eval`: each baseline's arithmetic (mean = FVE 0 by construction, shuffled = a
derangement of the real explanations, sentence shuffle keeps the sentences), the report files
on a tiny run (native and reference layout), one-line CLI errors, and (slow) the report's
consistency on the embedded model with the shipped NLA."""
import json
import math
import shutil

import pytest
from test_explain import LAYER, cli, export_reference, make_tiny_run, one_line_error

from nla import reference
from nla.collect import SPLITS, load_activations
from nla.errors import NLAError
from nla.evaluate import (EvalConfig, derangement, evaluate, paraphrase_split, render_markdown, sentences,
                          shuffle_sentences, tail)
from nla.metrics import content_hit_counts, content_hits, content_words, context_words, score_vectors, token_hits
from nla.models import load_base

ROWS = {"nla", "warm_start", "mean", "shuffled", "prefix", "sentence_shuffle", "paraphrase", "confident"}


@pytest.fixture(scope="module")
def tiny_run(tiny_path, tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("evaluate"), tiny_path)


def test_derangement_moves_every_row():
    for n in (2, 3, 5, 17, 64):
        for seed in range(5):
            p = derangement(n, seed)
            assert sorted(p) == list(range(n)) and all(p[i] != i for i in range(n))
            assert p == derangement(n, seed)
    assert derangement(2, 0) == [1, 0]
    assert derangement(40, 1) != derangement(40, 2)
    with pytest.raises(ValueError):
        derangement(1, 0)


def test_sentence_shuffle_keeps_the_sentences():
    text = "Cooking at home. A grandmother adds salt!  The soup is nearly ready; it smells good.\nNext: bread"
    parts = sentences(text)
    assert parts == ["Cooking at home.", "A grandmother adds salt!", "The soup is nearly ready;", "it smells good.",
                     "Next: bread"]
    for seed in range(6):
        out = shuffle_sentences(text, seed)
        assert sorted(sentences(out)) == sorted(parts)  # the same multiset
        assert all(a != b for a, b in zip(sentences(out), parts))  # every sentence moved
        assert out == shuffle_sentences(text, seed)
    listed = "1. Soup at home with a grandmother. 2. She adds salt in 2020. 3."  # enumerators stay with their item
    assert sentences(listed) == ["1. Soup at home with a grandmother.", "2. She adds salt in 2020. 3."]
    assert sentences(shuffle_sentences(listed, 0)) == sentences(listed)[::-1]
    assert shuffle_sentences("One sentence only, no end", 3) == "One sentence only, no end"
    assert shuffle_sentences("", 0) == ""


def test_score_arithmetic_and_mean_baseline(tiny_run):
    acts = load_activations(tiny_run["acts"])
    meta = acts.meta
    for split in ("heldout", "rl"):
        part = acts.select(split)
        v = part.vectors.float()
        sc = score_vectors(acts.mean_vector.expand(len(part), -1), v, meta["mse_mean"][split])
        assert sc["fve"] == pytest.approx(0.0, abs=1e-4)  # the sidecar's MSE_mean is this baseline's MSE
    v = acts.select("heldout").vectors.float()
    mm = meta["mse_mean"]["heldout"]
    perfect, opposite = score_vectors(3.0 * v, v, mm), score_vectors(-v, v, mm)
    assert perfect["fve"] == pytest.approx(1.0, abs=1e-5) and perfect["cos"] == pytest.approx(1.0, abs=1e-5)
    assert opposite["mse"] == pytest.approx(4.0, abs=1e-4) and opposite["fve"] == pytest.approx(1 - 4.0 / mm, abs=1e-3)
    assert score_vectors(v, v, None)["fve"] is None


def test_token_hits_counts_quoted_tokens_only():
    texts = ['Topic: soup. Final token: "salt".', 'It ends on "the".', "salt without quotes", 'x "\n" y']
    assert token_hits(texts, [" salt", "the", " salt", "\n"]) == 0.5  # quoted, quoted, unquoted, whitespace-only
    assert token_hits(texts, [" pepper", " a", "salt", " "]) == 0.0
    assert token_hits([], []) == 0.0


def test_paraphrase_split_separates_lost_content_from_wording():
    texts = ['Token: "salt". Soup.', 'The last token is "boat".', 'About rivers.', 'Final token: "the".']
    paras = ["It is about salt and soup.", "A text about rivers.", "Rivers.", 'Token: "the".']
    tokens = [" salt", " boat", " river", "the"]
    nla, para = [0.5, 0.6, 0.4, 0.2], [0.4, 0.0, 0.4, 0.3]
    out = paraphrase_split(texts, paras, tokens, nla, para)
    # rows 0, 1 and 3 quote their token; 0 and 3 kept it (drops 0.1 and -0.1), 1 lost it (drop 0.6)
    assert out["quoted"] == 3 and out["kept"] == 2
    assert out["drop_kept"] == pytest.approx(0.0) and out["drop_lost"] == pytest.approx(0.6)
    none = paraphrase_split(["no quote"], ["x"], ["salt"], [0.1], [0.0])
    assert none == dict(quoted=0, kept=0, drop_kept=None, drop_lost=None)


def test_content_hits_counts_context_words_only():
    ctx = "Grandmother carried the soup to the harbour, where two boats were sailing past the cities"
    # content: soup, harbour, boat (plural stripped), city ("cities" -> "city"), kitchen;
    # the, and, about, with: stopwords; topic, text, last, words, final, token: template
    x = 'Topic: the text is about soup and a harbour with a boat. Last words: "cities". Final token: "kitchens".'
    assert content_words(x) == {"soup", "harbour", "boat", "city", "kitchen"}
    assert content_hit_counts([x], [ctx]) == [(4, 5)]
    assert content_hits([x], [ctx]) == 0.8
    # micro-averaged: (4 + 1) / (5 + 2), not the mean of 4/5 and 1/2
    assert content_hits([x, "glasses of soup"], [ctx, "soup"]) == pytest.approx(5 / 7)
    # a repeated word is one claim; "glass"/"bus" keep their s; words under 3 letters never count
    assert content_words("Glass glass GLASS bus ox") == {"glass", "bus"}
    assert content_words("The topic of the text, about the last words and the final token.") == set()
    # only the last `window` words of the prefix are the context
    assert content_hits(["harbour"], [ctx], window=8) == 0.0 and content_hits(["harbour"], [ctx], window=9) == 1.0
    assert context_words("a b c, d-e", window=2) == {"c", "d", "e"}
    # nothing to score is 0, not a division by zero
    assert content_hits([""], [ctx]) == 0.0 and content_hits(["the and for"], [ctx]) == 0.0
    assert content_hits([], []) == 0.0 and content_hit_counts([""], [ctx]) == [(0, 0)]
    with pytest.raises(ValueError):
        content_hits(["a"], [])


def test_tail_keeps_the_end(tokenizer):
    text = " ".join(f"w{i}" for i in range(300))
    t = tail(tokenizer, text, 20)
    assert text.endswith(t.strip()) and len(tokenizer.encode(t, add_special_tokens=False)) <= 20
    assert tail(tokenizer, "short text", 20) == "short text"


def _prefixes(run) -> list:
    return load_activations(run["acts"]).select("heldout").prefixes


def test_eval_report_on_tiny_run(tiny_run, tiny_path, tmp_path, capsys):
    out = tmp_path / "report"
    rep = evaluate(EvalConfig(checkpoint=tiny_run["rl"], data=tiny_run["acts"], max_new=6, out=str(out)))
    printed = capsys.readouterr().out
    for f in ("report.md", "report.json", "report.png"):
        assert (out / f).stat().st_size > 0, f
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(rep))
    assert (out / "report.md").read_text() in printed + "\n"
    rows = {r["key"]: r for r in rep["rows"]}
    assert set(rows) == ROWS
    n_held = load_activations(tiny_run["acts"]).meta["split_sizes"]["heldout"]
    assert rep["n"] == rep["n_split"] == n_held and rep["decoding"] == {"mode": "greedy", "max_new": 6}
    assert rep["mse_mean"] == pytest.approx(tiny_run["meta"]["mse_mean"]["heldout"])
    assert rows["mean"]["fve"] == pytest.approx(0.0, abs=1e-4)
    assert rep["warm_start"].endswith("sft") and rows["warm_start"]["fve"] is not None
    for r in rep["rows"]:
        assert math.isfinite(r["fve"]) and -1 <= r["cos"] <= 1, r
        if r["key"] != "nla":
            assert r["fve_drop"] == pytest.approx(rows["nla"]["fve"] - r["fve"])
        assert f"| {r['method']} |" in printed
    assert "greedy" in printed and "FVE drop" in printed

    hits = rep["token_hits"]
    per = rep["per_activation"]
    assert hits["nla"] == token_hits([p["explanation"] for p in per], [p["token"] for p in per])
    assert 0 <= hits["shuffled"] <= 1 and hits["warm_start"] is not None and "Token test:" in printed
    content = rep["content_hits"]
    assert content["window"] == 40 and all(0 <= content[k] <= 1 for k in ("nla", "shuffled", "warm_start"))
    found, words = sum(p["content_found"] for p in per), sum(p["content_words"] for p in per)
    assert content["nla"] == found / max(1, words)
    assert "content words found in the activation's last 40 words of context" in printed
    # the confidence probe scores each explanation less its unsure sentences, which are whole sentences of it
    sure = [p["confident"] for p in per]
    assert content["min_confidence"] == 0.1 and content["confident"] == content_hits(sure, _prefixes(tiny_run))
    assert 0 <= content["confident_shuffled"] <= 1
    assert all(set(sentences(c)) <= set(sentences(p["explanation"])) for c, p in zip(sure, per))
    assert "Confidence probe:" in printed
    sweep = {w["min_p"]: w for w in rep["confidence_sweep"]}
    assert sorted(sweep) == [0.05, 0.1, 0.2, 0.4] and "| sentences left out below p |" in printed
    assert sweep[0.1]["faithful"] == content["confident"] and sweep[0.1]["fve"] == rows["confident"]["fve"]
    kept = [sweep[p]["kept"] for p in sorted(sweep)]
    assert kept == sorted(kept, reverse=True) and all(0 <= k <= 1 for k in kept)
    ps = rep["paraphrase_split"]
    assert 0 <= ps["kept"] <= ps["quoted"] <= rep["n"]
    if ps["quoted"]:
        assert "Paraphrase probe, split:" in printed
    split = dict(quoted=4, kept=3, drop_kept=0.01, drop_lost=0.5)
    assert "kept it in 3 (FVE drop there 0.010) and lost it in 1 (drop 0.500)" in render_markdown(
        dict(rep, paraphrase_split=split))

    # the shuffled row is the real explanations under a derangement, scored against the true vectors
    per = rep["per_activation"]
    assert len(per) == n_held and rows["nla"]["fve"] == pytest.approx(sum(p["fve"] for p in per) / n_held)
    base = load_base(tiny_path, device="cpu")
    nla = reference.load(reference.locate(tiny_run["rl"]), base)
    vec = load_activations(tiny_run["acts"]).select("heldout").vectors.float()
    preds = nla.reconstruct([p["explanation"] for p in per])
    want = score_vectors(preds[derangement(n_held, 0)], vec, rep["mse_mean"])
    assert rows["shuffled"]["fve"] == pytest.approx(want["fve"], abs=1e-5)

    # the same weights in the reference release's layout give the same NLA row
    ref = tmp_path / "ref"
    export_reference(tiny_run["rl"], tiny_path, ref)
    rep2 = evaluate(EvalConfig(checkpoint=str(ref), data=tiny_run["acts"], max_new=6, out=str(tmp_path / "r2")))
    rows2 = {r["key"]: r for r in rep2["rows"]}
    assert set(rows2) == ROWS - {"warm_start"} and rep2["layout"] == "reference"
    # the reference tokenises its AR template as one string, we join prefix, explanation and suffix
    # ids: the same tokens unless the explanation is empty ("<explanation></explanation>" merges)
    same = [(a["fve"], b["fve"]) for a, b in zip(per, rep2["per_activation"]) if a["explanation"]]
    assert same and all(a == pytest.approx(b, abs=1e-3) for a, b in same), same
    assert [a["explanation"] for a in per] == [b["explanation"] for b in rep2["per_activation"]]
    assert rows2["mean"]["fve"] == pytest.approx(0.0, abs=1e-4)


def test_eval_cli_sampling_and_errors(tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "cli"
    r = cli("eval", "--checkpoint", tiny_run["run"], "--data", tiny_run["acts"], "--split", "held-out", "--sample",
            "--max-n", 5, "--max-new", 6, "--out", out)
    assert r.exit_code == 0, r.output[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["decoding"] == {"mode": "sample", "temperature": 1.0, "seed": 0, "max_new": 6}
    assert rep["n"] == 5 and rep["checkpoint"].endswith("rl") and "sampled at temperature 1" in r.stdout

    one_line_error(cli("eval", "--data", tiny_run["acts"]), "--checkpoint is required")
    one_line_error(cli("eval", "--checkpoint", tiny_run["rl"]), "--data is required")
    one_line_error(cli("eval", "--checkpoint", tiny_run["rl"], "--data", tiny_run["acts"], "--greedy", "--sample"),
                   "exclude each other")
    one_line_error(cli("eval", "--checkpoint", tiny_run["rl"], "--data", tiny_run["acts"], "--split", "test"), "--split")
    other = tmp_path / "acts-L1"  # the same vectors, labelled as another layer
    shutil.copytree(tiny_run["acts"], other)
    side = json.loads((other / "nla_acts.json").read_text())
    side["layer"] = LAYER - 1
    (other / "nla_acts.json").write_text(json.dumps(side))
    one_line_error(cli("eval", "--checkpoint", tiny_run["rl"], "--data", other), "layer mismatch", f"layer {LAYER}",
                   f"layer {LAYER - 1}", str(other))

    acts = load_activations(tiny_run["acts"])
    acts.split[:] = SPLITS.index("rl")
    monkeypatch.setattr("nla.evaluate.load_activations", lambda _path: acts)
    with pytest.raises(NLAError, match="no 'heldout' activations"):
        evaluate(EvalConfig(checkpoint=tiny_run["rl"], data=tiny_run["acts"]))


@pytest.mark.slow
def test_eval_report_is_consistent_on_the_shipped_nla(tmp_path):
    """The embedded model with the NLA shipped in the package: the mean baseline is 0, a trained
    NLA beats shuffled explanations, and explain runs with the default checkpoint lookup."""
    from nla.collect import collect
    from nla.config import CollectConfig
    from nla.explain import DEFAULT_LAYER, ExplainConfig, explain, shipped_checkpoint
    ck = shipped_checkpoint("smollm2", DEFAULT_LAYER)
    if not ck.exists():
        pytest.skip(f"no shipped NLA at {ck} (train one: nla-cli train --preset cpu-demo, then copy RUN/rl there)")
    res = explain(ExplainConfig(prompt="The capital of France is Paris", tokens="all", json=True, device="cpu"))
    assert res["checkpoint"] == str(ck) and all(math.isfinite(t["fve"]) for t in res["tokens"])
    acts = tmp_path / "acts"
    collect(CollectConfig(model="smollm2", layer=DEFAULT_LAYER, corpus="embedded", out=str(acts), max_docs=100,
                          device="cpu"))
    rep = evaluate(EvalConfig(checkpoint=str(ck), data=str(acts), max_new=48, out=str(tmp_path / "eval"), device="cpu"))
    rows = {r["key"]: r for r in rep["rows"]}
    assert rep["n"] >= 8
    assert rows["mean"]["fve"] == pytest.approx(0.0, abs=1e-3)
    assert rows["shuffled"]["fve"] < rows["nla"]["fve"]
    assert rep["token_hits"]["shuffled"] < rep["token_hits"]["nla"]
    assert all(math.isfinite(r["fve"]) for r in rep["rows"])


def test_confidence_sweep_scores_each_threshold(tiny_run, tmp_path, monkeypatch):
    """With confidences spread over the thresholds (a random tiny AV is unsure of everything), each
    threshold gates different sentences, and the probe row is the --min-confidence one."""
    import itertools

    import nla.evaluate as ev
    real = ev.scored_sentences
    cycle = itertools.cycle([0.03, 0.07, 0.15, 0.3, 0.9])
    monkeypatch.setattr(ev, "scored_sentences", lambda *a: [[(s, next(cycle)) for s, _ in sc] for sc in real(*a)])
    rep = evaluate(EvalConfig(checkpoint=tiny_run["rl"], data=tiny_run["acts"], max_new=12, out=str(tmp_path / "r"),
                              min_confidence=0.2))
    sweep = {w["min_p"]: w for w in rep["confidence_sweep"]}
    rows = {r["key"]: r for r in rep["rows"]}
    assert sorted(sweep) == [0.05, 0.1, 0.2, 0.4] and rep["content_hits"]["min_confidence"] == 0.2
    assert rows["confident"]["fve"] == sweep[0.2]["fve"] and "p < 0.2" in rows["confident"]["method"]
    kept = [sweep[p]["kept"] for p in sorted(sweep)]
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1] > 0
    assert len({sweep[p]["fve"] for p in sweep}) == 4
