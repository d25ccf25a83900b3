"""Token-by-token decoding for the AV's rollouts, at the speed the hardware allows.

A rollout is ~90% of an RL step, and decoding one token of a batch is bound by reading the
weights once: a few hundred microseconds on a datacenter GPU, which Python and kernel-launch
overhead easily exceed. So:

- a static KV cache for prompt + cap, allocated once per shape and reused across calls;
- on CUDA the one-token step is captured once as a CUDA graph and replayed (one launch per token;
  the adapters it reads are refreshed in place, see lora.inference_weights);
- stop detection on the device: a host sync only every few steps (verbalizer.CHECK_EVERY).

Rows that have stopped keep decoding until all have: dropping them would change the graph's shape
(a recapture) and the random stream (so samples would depend on the batch), and it would not pay:
a step reads every weight once whatever the batch, and at explanation lengths the KV cache is a
small part of what a step reads.

On CPU the same loop runs the step eagerly. `NLA_CUDA_GRAPH=0` turns graphs off (for a
comparison, or if a capture ever misbehaves: a failed capture falls back to eager by itself).
On CUDA the step is also compiled with torch.compile before it is captured: Inductor fuses the
~75 small kernels per block (norms, rotary, LoRA adds) that a graph still launches one by one
(measured on an H200, 1.5B shape, batch 64: 6.1k -> 9.9k tokens/s), at the price of one compile
per (batch, length) shape. A 4-bit base compiles by default when its step reads merged copies
instead of the 4-bit weights (lora.merge_wanted: where they fit in memory), or when every
quantised weight of the step goes through the nf4 decode kernel (kernels.nf4, asked for by NLA_KERNELS=triton);
through bitsandbytes' op the step compiles whole as well (tested on CPU), but whether that pays
for a 7B compile (the nf4 kernel's took ~66 s) is not measured yet (bench/gpu_check.py's
memory-compiled stage); `NLA_COMPILE_DECODE=0|1` overrides. A failed compile falls back to the
graph alone, a failed capture to eager. `NLA_AUTOTUNE_DECODE=1` compiles with Inductor's
max-autotune (no CUDA graphs of its own: the step's graph is ours), which times Triton templates
against cuBLAS for each of the step's GEMMs: at decode sizes the 1.5B's small projections read
~1 TB/s through cuBLAS, and its larger ones 55-70% of the copy bandwidth (bench/RESULTS.md); a
longer compile, so off by default until a GPU shows it paying (bench/gpu_check.py's rl-1.5b
stage times both).

In RL on an unmerged (4-bit) base, each row may have a twin under the KL reference's adapter
(lora.side_by_side, verbalizer.generate's ref_role): the decoder then holds 2n rows, the
policy's first.

The decode step's attention reads the cache once per key/value head (`packed_gqa`): Hugging Face's
SDPA path, when compiled or given a mask, first copies every key/value head once per query head
that shares it (`repeat_kv`), which for a 1.5B-shaped model at batch 64 writes and rereads more
bytes per step than the weights themselves.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from collections import OrderedDict

import torch

import kernels

from . import switches
from .models import attention_as
from .shared_prefix import SharedPrefix

MAX_DECODERS = 3  # cached (shape, role) decoders per model: RL rollouts, evals, explain


def pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of every row: argmax at temperature 0, else a draw from softmax(logits/T)
    by the exponential race (kernels/sample.py: one fused pass over the logits on a GPU; fp64
    uniforms on a CPU, where every loop draws the same tokens for a seed)."""
    if temperature <= 0:
        return logits.argmax(-1)
    return kernels.sample_next(logits, temperature, generator)


class StopDetector:
    """Has every row stopped? A stop id anywhere, or a closing tag as one of the token sequences
    the tokenizer produces for it. Only sequences whose decoding holds the tag, in <= 8 tokens,
    are used: a row this calls closed is closed by the exact rule too (verbalizer._finish), and a
    rare spelling it misses only costs extra steps, never a different sample."""

    _cache: dict = {}

    def __init__(self, stop_ids: set, seqs: list[tuple[int, ...]], device):
        self.stop = torch.tensor(sorted(stop_ids) or [-1], device=device)
        self.seqs = [torch.tensor(s, device=device) for s in seqs]

    @classmethod
    def of(cls, tok, stop_ids: set, close: str, device) -> "StopDetector":
        key = (id(tok), close, str(device), tuple(sorted(stop_ids)))
        if key not in cls._cache:
            seqs = set()
            for before in ("", " ", ".", "!", "?", "\n", "\n\n", ".\n", '"', ")", "a", "1", "…"):
                ids = tok.encode(before + close, add_special_tokens=False)
                for k in range(1, min(8, len(ids)) + 1):  # the shortest tail that still decodes to the tag
                    if close in tok.decode(ids[-k:]):
                        seqs.add(tuple(ids[-k:]))
                        break
            cls._cache[key] = cls(stop_ids, sorted(seqs), device)
        return cls._cache[key]

    def stopped(self, out: torch.Tensor) -> torch.Tensor:
        """[n] bool over the tokens so far, [n, t]."""
        hit = torch.isin(out, self.stop).any(1)
        for s in self.seqs:
            k = len(s)
            if out.shape[1] >= k:
                hit |= (out.unfold(1, k, 1) == s).all(-1).any(1)
        return hit

    def all_stopped(self, out: torch.Tensor) -> bool:
        return bool(self.stopped(out).all())  # the one host sync


PACKED = "nla_packed_gqa"


def packed_gqa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    """Attention for one query token with grouped key/value heads, without repeat_kv: the query
    heads that share a key/value head read it together (head j reads key/value head j // groups,
    as repeat_kv orders them), so the cache is read as it is stored; on a GPU only up to where it
    is filled (kernels/attention.py). Anything else goes to Hugging Face's SDPA function unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    groups = getattr(module, "num_key_value_groups", 1)
    if (query.shape[2] != 1 or groups == 1 or attention_mask is None or attention_mask.shape[1] != 1 or dropout
            or any(kw.get(k) is not None for k in ("position_bias", "softcap", "s_aux"))):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kw)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return kernels.decode_attention(query, key, value, attention_mask, scale), None


def packed_gqa(model):
    """Decode with packed_gqa_attention where the model runs SDPA (its masks stay SDPA's);
    NLA_PACKED_GQA=0 keeps Hugging Face's path (for a comparison)."""
    off = switches.forced("NLA_PACKED_GQA") is False
    if off or getattr(model.config, "_attn_implementation", None) != "sdpa":
        return contextlib.nullcontext()
    return attention_as(model, PACKED, lambda *a, **k: packed_gqa_attention(*a, **k))


def _cache_kw(model) -> str:
    # transformers 5.2x renamed past_key_values to cache
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _graphs_wanted(device: torch.device) -> bool:
    return switches.forced("NLA_CUDA_GRAPH") is not False and device.type == "cuda"


def _quantised(m) -> bool:
    return "4bit" in type(m).__name__ or "8bit" in type(m).__name__


def _all_nf4_kernel(model, n: int, dtype: torch.dtype) -> bool:
    """Does a decode step of n rows read every quantised weight through the nf4 decode kernel (so
    compiling it is the default: what the kernel was timed as)? So: the kernel is
    asked for (kernels.nf4.enabled: off by default, it loses to bitsandbytes), every
    quantised module is an adapted projection in nf4, the rows fit the kernel, and sampling runs
    in a low-precision dtype (lora.inference_weights: an fp32 base samples through the plain path)
    that the kernel's dots support on this GPU (bf16: sm_80+)."""
    from .lora import LoRALinear
    if not kernels.nf4.enabled():  # the default: no walk over the modules at every rollout
        return False
    served = {id(m.base) for m in model.modules() if isinstance(m, LoRALinear) and kernels.nf4.servable(m.base)}
    emb = model.get_input_embeddings().weight
    return (dtype != torch.float32 and n <= kernels.nf4.MAX_ROWS and kernels.dispatch.dot_supported(emb.device, dtype)
            and kernels.backend(emb) == "triton" and all(id(m) in served for m in model.modules() if _quantised(m)))


def _all_merged(model) -> bool:
    """Does a decode step read no quantised weight: every one is an adapted projection's, and
    sampling reads merged copies instead (lora.merge_wanted: a 4-bit base's, dequantised)?"""
    from .lora import LoRALinear, merge_wanted
    if not merge_wanted(model):
        return False
    bases = {id(m.base) for m in model.modules() if isinstance(m, LoRALinear)}
    return all(id(m) in bases for m in model.modules() if _quantised(m))


def _compile_wanted(model, device: torch.device, n: int, dtype: torch.dtype) -> bool:
    forced = switches.forced("NLA_COMPILE_DECODE")
    if not _graphs_wanted(device):
        return False
    if forced is not None:
        return forced
    return not any(_quantised(m) for m in model.modules()) or _all_merged(model) or _all_nf4_kernel(model, n, dtype)


def _compile_mode() -> str | None:
    """Inductor's mode for the decode step: max-autotune where NLA_AUTOTUNE_DECODE=1 asks (without
    its own CUDA graphs: the step's graph is ours), else the default."""
    return "max-autotune-no-cudagraphs" if switches.forced("NLA_AUTOTUNE_DECODE") else None


def _compiled(fn):
    """fn compiled for one shape, as the decode step is."""
    return torch.compile(fn, dynamic=False, mode=_compile_mode())


def _written_at(layer):
    """A static cache layer's update whose one-token steps write their key and value at the slot
    its fill counter holds (a 0-d tensor, so one graph serves every step) and advance it: three
    kernels a layer, where Hugging Face's builds the slot as arange(1) + counter first (five:
    ~56 more in a 28-block step that is not compiled, a 4-bit base's). Prefill (several tokens)
    goes through Hugging Face's."""
    hf = layer.update

    def update(key_states, value_states, *args, **kwargs):
        if key_states.shape[-2] != 1 or not layer.is_initialized:
            return hf(key_states, value_states, *args, **kwargs)
        slot = layer.cumulative_length.view(1)
        layer.keys.index_copy_(2, slot, key_states)
        layer.values.index_copy_(2, slot, value_states)
        layer.cumulative_length.add_(1)  # the masks read it: the queries' offset
        return layer.keys, layer.values
    return update


class Decoder:
    """Prefill + one-token steps on a static KV cache, for n rows of prompt + cap tokens."""

    def __init__(self, model, n: int, max_len: int, role):
        from transformers import StaticCache
        self.model, self.n, self.max_len, self.role = model, n, max_len, role
        emb = model.get_input_embeddings().weight
        self.device, self.dtype = emb.device, emb.dtype
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.cache = StaticCache(config=cfg, max_cache_len=max_len)
        self.kw = _cache_kw(model)
        self.tok = torch.zeros((n, 1), dtype=torch.long, device=self.device)  # the graph's inputs
        self.pos = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        for layer in getattr(self.cache, "layers", []):
            if type(layer).__name__ == "StaticLayer":  # not the sliding window's ring
                layer.update = _written_at(layer)
        self.graph, self.logits = None, None
        self.use_graph = _graphs_wanted(self.device)
        self.compiled = _compile_wanted(model, self.device, n, self.dtype)
        _compile_mode()  # read here, where a bad value fails on any machine

    @classmethod
    def of(cls, model, n: int, max_len: int, role) -> "Decoder":
        """One decoder per (rows, length, role, dtype) and model, kept for reuse: an RL run
        allocates its cache and captures its graph once."""
        decs = model.__dict__.setdefault("_nla_decoders", OrderedDict())
        dtype = model.get_input_embeddings().weight.dtype
        dev = model.get_input_embeddings().weight.device
        key = (n, max_len, role, dtype, _graphs_wanted(dev),
               *map(switches.forced, ("NLA_COMPILE_DECODE", "NLA_MERGE_SAMPLING", "NLA_PACKED_GQA", "NLA_FUSED_SAMPLING",
                                      "NLA_AUTOTUNE_DECODE")))
        if key in decs:
            decs.move_to_end(key)
        else:
            decs[key] = cls(model, n, max_len, role)
            while len(decs) > MAX_DECODERS:
                decs.popitem(last=False)
        return decs[key]

    def _forward(self, **kw) -> torch.Tensor:
        return self.model(**kw, **{self.kw: self.cache}, use_cache=True, logits_to_keep=1).logits[:, -1]

    def prefill(self, prompts: SharedPrefix | list[SharedPrefix], index: torch.Tensor) -> None:
        """Start every row's cache with its prompt: `prompts` holds the keys and values of the
        distinct ones (each ran once: a GRPO group's G rows share one, and on a CPU the prompts'
        forward was ~30% of a rollout), and row i starts with prompt index[i]. Several levels (one
        per role of lora.side_by_side) fill consecutive blocks of rows. Written through the
        cache's own update."""
        levels = prompts if isinstance(prompts, (list, tuple)) else [prompts]
        self.cache.reset()
        self.pos.fill_(levels[0].P)
        for i in sorted(levels[0].kv):
            self.cache.update(*(torch.cat([lv.kv[i][j].index_select(0, index) for lv in levels]) for j in (0, 1)), i)

    def step(self, nxt: torch.Tensor) -> torch.Tensor:
        """Logits after appending token `nxt` [n] to every row."""
        self.tok.copy_(nxt[:, None])
        if self.use_graph and self.graph is None:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            out = self.logits
        else:
            with packed_gqa(self.model):
                out = self._forward(input_ids=self.tok, position_ids=self.pos)
        self.pos += 1
        return out

    def _lengths(self):
        return [layer.cumulative_length for layer in getattr(self.cache, "layers", [])
                if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]

    def _capture(self) -> None:
        """Record one step. Warm-up steps first (on a side stream, as CUDA graphs require) write
        a junk key/value at the next slot, which the real step overwrites before anything reads
        it; the cache's fill counters are put back afterwards."""
        with packed_gqa(self.model):
            self._record()

    def _record(self) -> None:
        lengths = self._lengths()
        saved = [t.clone() for t in lengths]
        fwd = self._forward
        if self.compiled:
            print(f"[nla] compiling the decode step for {self.n} rows x {self.max_len} tokens (once per shape; "
                  f"NLA_COMPILE_DECODE=0 skips it)", flush=True)
            fwd = _compiled(self._forward)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3 if self.compiled else 2):  # the first compiled call compiles
                    for t, s in zip(lengths, saved):
                        t.copy_(s)
                    fwd(input_ids=self.tok, position_ids=self.pos)
            torch.cuda.current_stream().wait_stream(side)
            for t, s in zip(lengths, saved):
                t.copy_(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = fwd(input_ids=self.tok, position_ids=self.pos)
            self.graph = graph
        except Exception as e:  # anything a graph cannot hold (a host sync, a library op): run eagerly
            what = "compile + capture" if self.compiled else "capture"
            warnings.warn(f"nla: CUDA graph {what} of the decode step failed ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160]}); decoding eagerly")
            self.use_graph, self.compiled, self.graph, self.logits = False, False, None, None
            torch.cuda.synchronize()
        for t, s in zip(lengths, saved):
            t.copy_(s)
