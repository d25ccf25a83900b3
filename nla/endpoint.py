"""A client for an OpenAI-compatible chat-completions endpoint (a local vLLM, llama.cpp server,
Ollama, or a hosted API).

Why it exists: warm-start summaries (warmstart.py) are written by the embedded 135M SmolLM2 by
default, which often gets the topic of a text wrong, and the AV then learns wrong targets. A
bigger instruct model behind an HTTP endpoint writes summaries of reference quality without
loading it into this process or onto this GPU. Standard library only, so it costs no dependency.

Answers are cached in a jsonl keyed by the request, not the URL, and appended as they arrive: a
killed run keeps what finished, and a rerun (or the same model served elsewhere) costs nothing.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .errors import NLAError
from .io import append_jsonl, read_jsonl

BACKOFF_BASE = 0.5
BACKOFF_CAP = 8.0
RETRY_AFTER_CAP = 60.0  # a server asking for an hour would look like a hang
_sleep = time.sleep  # tests replace this to keep retries instant


@dataclass
class Endpoint:
    url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    retries: int = 4
    timeout: float = 60.0

    @property
    def chat_url(self) -> str:
        """{url}/chat/completions, keeping any query string (e.g. Azure's api-version)."""
        u = urllib.parse.urlsplit(self.url)
        path = u.path.rstrip("/")
        if not path.endswith("/chat/completions"):
            path += "/chat/completions"
        return urllib.parse.urlunsplit(u._replace(path=path))


def parse_summarizer(spec: str) -> Endpoint | None:
    """`http(s)://HOST[:PORT]/PATH?model=NAME` -> an Endpoint (model "default" when the query
    names none); anything else, i.e. a local model name or path, -> None."""
    u = urllib.parse.urlsplit(spec.strip())
    if u.scheme not in ("http", "https") or not u.netloc:
        return None
    query = urllib.parse.parse_qsl(u.query, keep_blank_values=True)
    model = next((v for k, v in query if k == "model"), "") or "default"
    rest = urllib.parse.urlencode([(k, v) for k, v in query if k != "model"])
    return Endpoint(url=urllib.parse.urlunsplit(u._replace(query=rest, fragment="")), model=model)


def _one_line(text, n: int = 200) -> str:
    return " ".join(str(text).split())[:n]


def _server_message(e: urllib.error.HTTPError) -> str:
    try:
        raw = e.read().decode("utf-8", "replace")
    except OSError:
        return _one_line(e.reason)
    try:  # OpenAI/vLLM: {"error": {"message": ...}}; Ollama, llama.cpp: {"error": "..."}
        err = json.loads(raw).get("error", raw)
        raw = err.get("message", err) if isinstance(err, dict) else err
    except (ValueError, AttributeError):
        pass
    return _one_line(raw)


def _retry_after(e: urllib.error.HTTPError) -> float | None:
    try:
        return min(max(float(e.headers.get("Retry-After")), 0.0), RETRY_AFTER_CAP)
    except (TypeError, ValueError):  # absent, or an HTTP date: use the backoff
        return None


def _backoff(attempt: int) -> float:
    # Jitter keeps N threads that failed together from retrying together.
    return min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt) * random.uniform(0.5, 1.0)


def _complete(ep: Endpoint, api_key: str | None, messages: list[dict], max_tokens: int, temperature: float) -> str:
    body = json.dumps({"model": ep.model, "messages": messages, "max_tokens": max_tokens,
                       "temperature": temperature, "stream": False}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    failure, reachable = "", False
    for attempt in range(ep.retries + 1):
        wait = None
        try:
            req = urllib.request.Request(ep.chat_url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=ep.timeout) as r:
                raw = r.read()
            break
        except urllib.error.HTTPError as e:
            msg = _server_message(e)
            if e.code in (401, 403):
                if not api_key:
                    raise NLAError(f"summarizer endpoint {ep.url} needs an API key (HTTP {e.code}: {msg}); "
                                   f"set the {ep.api_key_env} environment variable") from None
                raise NLAError(f"summarizer endpoint {ep.url} rejected the API key in {ep.api_key_env} "
                               f"(HTTP {e.code}: {msg})") from None
            if e.code != 429 and e.code < 500:
                raise NLAError(f"summarizer endpoint {ep.url} answered HTTP {e.code}: {msg}") from None
            failure, reachable, wait = f"HTTP {e.code}: {msg}", True, _retry_after(e)
        except (OSError, http.client.HTTPException) as e:  # refused, DNS, timeout, reset (URLError is an OSError)
            reason, reachable = getattr(e, "reason", e), False
            if isinstance(reason, TimeoutError):
                failure = f"no answer within {ep.timeout:g} s"
            else:
                failure = _one_line(getattr(reason, "strerror", None) or str(reason) or type(reason).__name__)
        if attempt < ep.retries:
            _sleep(wait if wait is not None else _backoff(attempt))
    else:
        if not reachable:
            raise NLAError(f"summarizer endpoint {ep.url} is unreachable ({failure}); "
                           "start the server or check --summarizer")
        raise NLAError(f"summarizer endpoint {ep.url} kept failing ({failure}) after {ep.retries + 1} tries; "
                       "check the server's log")
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        content = None
    if not isinstance(content, str):
        raise NLAError(f"summarizer endpoint {ep.url} sent no choices[0].message.content: "
                       f"{_one_line(raw.decode('utf-8', 'replace'))}")
    return content


def _key(model: str, messages: list[dict], max_tokens: int, temperature: float) -> str:
    blob = json.dumps([model, messages, int(max_tokens), float(temperature)], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def complete_all(ep: Endpoint, prompts: list[list[dict]], max_tokens: int, temperature: float = 0.0,
                 cache_path: str | Path | None = None, desc: str = "summaries") -> list[str]:
    """The assistant's answer to each chat (a list of {"role", "content"} messages), in order."""
    keys = [_key(ep.model, m, max_tokens, temperature) for m in prompts]
    have = {r["key"]: r["content"] for r in read_jsonl(cache_path, repair=True)} if cache_path else {}
    todo: dict[str, list[dict]] = {}  # one request per distinct uncached chat
    for k, m in zip(keys, prompts):
        if k not in have:
            todo.setdefault(k, m)
    if not todo:
        return [have[k] for k in keys]

    api_key = os.environ.get(ep.api_key_env) or None
    bar = tqdm(total=len(todo), desc=desc, leave=False)

    def save(k: str, text: str) -> None:  # main thread only: appends are not thread-safe
        have[k] = text
        if cache_path:
            append_jsonl(cache_path, [{"key": k, "model": ep.model, "content": text}])
        bar.update()

    items = iter(todo.items())
    pool = ThreadPoolExecutor(max_workers=max(1, ep.concurrency))
    try:
        # One request alone first: a dead server or a bad key fails in seconds with one line,
        # not after N timeouts in parallel.
        k, m = next(items)
        save(k, _complete(ep, api_key, m, max_tokens, temperature))
        futures = {pool.submit(_complete, ep, api_key, m, max_tokens, temperature): k for k, m in items}
        for f in as_completed(futures):
            save(futures[f], f.result())
    finally:
        # On an error or Ctrl-C, drop the queue instead of waiting for it; finished answers are on disk.
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
    return [have[k] for k in keys]
