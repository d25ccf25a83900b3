"""Warm-start summaries: every claim true of the text, fitted to the AV's budget with the final
token kept, worded and ordered differently from example to example; a local model's or an
endpoint's claims used only where they check out against the text (the endpoint is a real HTTP
server on localhost speaking the chat-completions protocol, driven through `nla-cli train`)."""
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nla.metrics import content_words, context_words
from nla.verbalizer import target_ids
from nla.warmstart import FINAL, LAST, TOPIC, checked, compose, fit_summary, topic_words

PREFIX = ("The harbour master counted the fishing boats twice before dawn. Two boats were missing, "
          "and the radio had been silent since the storm passed over the northern reef. He wrote the "
          "names of the missing crews in the ledger and walked to the end of the pier")


def test_topic_words_come_from_the_recent_text():
    quote = PREFIX.split()[-6:]
    words = topic_words(PREFIX, quote)
    assert 1 <= len(words) <= 4
    recent = context_words(PREFIX, 40)
    for w in words:
        assert w in PREFIX and content_words(w) <= recent, w
        assert w.lower() not in {"the", "and", "end", "pier"}  # stopwords and quoted words are skipped
    assert {w.lower() for w in words[:2]} == {"missing", "boats"}  # the twice-said words come first


def test_compose_is_true_fitted_and_varied(tokenizer):
    summaries = {compose(PREFIX, " pier", f"7:{i}") for i in range(60)}
    assert len(summaries) >= 20  # wording and order vary with the position's key
    assert compose(PREFIX, " pier", "7:3") == compose(PREFIX, " pier", "7:3")  # but each key is stable
    firsts = {re.sub(r'"[^"]*"', "", s.split(". ")[0])[:8] for s in summaries}
    assert len(firsts) >= 6  # no fixed slot order
    for s in summaries:
        assert '"pier"' in s  # the token test's quote, in every wording
        assert content_words(s) <= context_words(PREFIX, 40), s  # nothing the text does not say
    for cap in (16, 24, 28, 44):
        fits = lambda t: len(target_ids(tokenizer, t)) <= cap  # noqa: E731
        for i in range(10):
            s = compose(PREFIX, " pier", f"1:{i}", fits)
            assert "\"pier\"" in s and (fits(s) or cap < 24), (cap, s)  # below ~22 tokens: the minimum
    assert all(t.count("{}") == 1 for t in TOPIC + LAST + FINAL)


def test_claims_are_checked_against_the_text():
    assert checked("the missing fishing boats and their crews", PREFIX)
    assert not checked("a character who needs to prioritize their belongings at work", PREFIX)
    assert not checked("it is about that", PREFIX)  # nothing checkable
    s = compose(PREFIX, " pier", "2:2", topic="missing fishing boats after a storm")
    assert "missing fishing boats after a storm" in s and '"pier"' in s


def test_fit_summary_keeps_the_final_token_sentence(tokenizer):
    long = ("The text describes a harbour master at dawn. He counts the fishing boats and finds two "
            "missing after the storm. He writes the crews' names in a ledger. The final token is \"pier\".")
    for cap in (20, 30, 60):
        fits = lambda t: len(target_ids(tokenizer, t)) <= cap  # noqa: E731
        s = fit_summary(long, " pier", fits)
        assert s.endswith('The final token is "pier".') and (fits(s) or cap < 12), (cap, s)
    assert fit_summary("About boats.", " pier").endswith('The final token is "pier".')


class _Summaries(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat-completions server: summarises the quoted text from its own words
    (true), except for prompts whose final token is "the", which get an invented summary."""
    seen = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        type(self).seen.append(body)
        tail = prompt.split('"...', 1)[1].split('"\n', 1)[0]
        token = re.search(r'final token is "(.*?)"', prompt).group(1)
        words = [w for w in re.findall(r"[A-Za-z]{5,}", tail)][-4:]
        if token == "the":
            content = "A tale of dragons guarding treasure in distant mountains, with wizards."
        else:
            content = f"It is about {' and '.join(words)}. The final token is \"{token}\"."
        data = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                        "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def summary_server(monkeypatch):
    monkeypatch.setenv("no_proxy", "*")
    _Summaries.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Summaries)
    threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1?model=summ-7b"
    httpd.shutdown()
    httpd.server_close()


def _corpus_acts(tiny_path, tmp_path):
    from nla.collect import collect
    from nla.config import CollectConfig
    corpus = tmp_path / "c.jsonl"
    with open(corpus, "w") as f:
        for i in range(20):
            f.write(json.dumps({"text": f"Report {i}: the harbour master counted boats near the northern reef "
                                        f"while crews mended nets and gulls circled the market square {i}."}) + "\n")
    collect(CollectConfig(model=tiny_path, layer=2, corpus=str(corpus), out=str(tmp_path / "acts"), per_doc=3,
                          min_pos=4, device="cpu", heldout_frac=0.2))
    return str(tmp_path / "acts")


def test_train_with_an_endpoint_summarizer(tiny_path, tmp_path, summary_server):
    from typer.testing import CliRunner

    from cli import app
    acts = _corpus_acts(tiny_path, tmp_path)
    out = tmp_path / "run"
    args = ["train", "--acts", acts, "--out", str(out), "--summarizer", summary_server, "--device", "cpu",
            "--sft-ar-steps", "1", "--sft-av-steps", "1", "--sft-batch", "2", "--rank-av", "2", "--rank-ar", "2",
            "--rl-steps", "1", "--rl-batch", "2", "--group", "2", "--max-new", "40", "--eval-n", "2",
            "--eval-max-new", "6"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output[-3000:]
    n = len(_Summaries.seen)
    assert n > 0 and all(b["model"] == "summ-7b" for b in _Summaries.seen)
    rows = [json.loads(x) for x in open(out / "warmstart" / "sft_av.summaries.jsonl")]
    from nla.collect import load_activations
    acts_ = load_activations(acts)
    prefixes = {f"{int(d)}:{int(p)}": acts_.prefixes[i] for i, (d, p) in enumerate(zip(acts_.doc_id, acts_.pos))}
    for row in rows:
        assert f'"{row["token"].strip()}"' in row["summary"] or not row["token"].strip()
        assert "dragons" not in row["summary"]  # the invented answers were replaced by the text's own words
        claims = re.sub(r'"[^"]*"', "", row["summary"])  # quotes are the text's own (sub)words
        assert content_words(claims) <= context_words(prefixes[row["key"]], 10**6), row
    assert any(row["summary"].startswith("It is about") for row in rows)  # the true answers were used
    # a rerun asks the server nothing: every answer is cached by prompt
    (out / "sft_ar").exists()
    import shutil
    for d in ("sft", "sft_ar", "rl"):
        shutil.rmtree(out / d, ignore_errors=True)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output[-3000:]
    assert len(_Summaries.seen) == n


def test_an_unreachable_endpoint_is_one_line(tiny_path, tmp_path, monkeypatch):
    import socket

    from typer.testing import CliRunner

    from cli import app
    from nla import endpoint
    monkeypatch.setattr(endpoint, "_sleep", lambda s: None)
    monkeypatch.setenv("no_proxy", "*")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    acts = _corpus_acts(tiny_path, tmp_path)
    r = CliRunner().invoke(app, ["train", "--acts", acts, "--out", str(tmp_path / "run"), "--device", "cpu",
                                 "--summarizer", f"http://127.0.0.1:{port}/v1?model=m"])
    assert r.exit_code == 2
    errors = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "unreachable" in errors[0] and "--summarizer" in errors[0]
