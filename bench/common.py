"""Shared bits of the benchmarks: random-weight models of real shapes, a synthetic NLA set-up on
any base, timing helpers, the memory roofline of a decode step, and a count of dispatched ops.

Random weights because no real weights reach the GPU machine (no network, 64 MiB per call):
speed and memory depend on shapes, not on values.
"""
import collections
import os
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nla import lora
from nla.models import fused_ops
from nla.reconstructor import ARHead
from nla.spec import build_spec

SHAPES = {  # name: (HF config class, fields, the layer we read)
    "tiny": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True), 2),  # CPU checks of a bench's logic
    # Qwen2.5-7B's depth with widths of 64: a CPU runs its update in ~1 s of almost pure host
    # cost (ops dispatched, Python), what a GPU's host pays for the real 7B before any arithmetic
    "thin-7b": ("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=28, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=False), 20),
    "smollm2": ("LlamaConfig", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True), 20),
    "qwen2.5-1.5b": ("Qwen2Config", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                         tie_word_embeddings=True, rope_theta=1e6), 16),
    "qwen2.5-7b": ("Qwen2Config", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                       tie_word_embeddings=False, rope_theta=1e6), 20),
}


def tokenizer_dir() -> str:
    """NLA_TOKENIZER (a carried folder on the GPU machine), else the embedded SmolLM2's cache."""
    if os.environ.get("NLA_TOKENIZER"):
        return os.environ["NLA_TOKENIZER"]
    from nla.models import resolve
    return resolve("smollm2")[0]


def quantise_(model, compute_dtype=torch.bfloat16):
    """nf4 with double quantisation for every adapted projection, as --load-in-4bit does."""
    import bitsandbytes as bnb
    from nla.lora import TARGETS
    for mod in list(model.modules()):
        for name, lin in list(mod.named_children()):
            if name in TARGETS and isinstance(lin, torch.nn.Linear):
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                if lin.bias is not None:
                    q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
                setattr(mod, name, q.to(lin.weight.device))
                del lin
    import kernels
    kernels.nf4.keep_standard_layout(model)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def random_model(shape: str, device, dtype=torch.bfloat16, nf4: bool = False, tokenizer=None):
    """A random-weight *ForCausalLM of a named shape, built directly on `device`."""
    import transformers
    cls_name, fields, _ = SHAPES[shape]
    tok = tokenizer
    cfg = getattr(transformers, cls_name)(**fields, max_position_embeddings=4096,
                                          bos_token_id=getattr(tok, "bos_token_id", None),
                                          eos_token_id=getattr(tok, "eos_token_id", None))
    model_cls = getattr(transformers, cls_name.replace("Config", "ForCausalLM"))
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(cfg)
    finally:
        torch.set_default_dtype(prev)
    if nf4:
        quantise_(model, dtype)
    fused_ops(model)
    model.requires_grad_(False)
    model.eval()
    return model


def random_base(shape: str, device="cuda", dtype=torch.bfloat16, nf4: bool = False):
    from transformers import AutoTokenizer

    from nla.models import Base
    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = random_model(shape, device, dtype, nf4, tok)
    cfg = model.config
    return Base(model, tok, f"random {shape}-shaped" + (" nf4" if nf4 else ""), cfg.num_hidden_layers,
                cfg.hidden_size, quant="nf4" if nf4 else "none")


def nla_on(base, layer: int, rank: int = 16, scale: float = 100.0, foreach: bool | None = None):
    """Adapters, head and spec for `base` without a dataset (a made-up mean-MSE baseline);
    foreach: the optimizers' (None: torch's choice for the device)."""
    lora.attach(base.model, {"av": rank, "ref": rank, "ar": rank})
    for p in lora.params(base.model, "ref"):
        p.requires_grad_(False)
    spec = build_spec(base, layer, {"injection_scale": scale, "mse_mean": {"train": 1.0}}, "replace", rank, rank)
    head = ARHead(base.d_model).to(base.device)
    opt_av = torch.optim.AdamW(lora.params(base.model, "av"), lr=1e-5, foreach=foreach)
    opt_ar = torch.optim.AdamW(lora.params(base.model, "ar") + list(head.parameters()), lr=1e-5, foreach=foreach)
    return spec, head, opt_av, opt_ar


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


class Timer:
    """Wall seconds of a block, synchronised with the device; on CUDA also how many segments the
    caching allocator took from the driver meanwhile (`mallocs`: in a steady loop there should be
    none; each costs a cudaMalloc and, when the cache is full, a flush of it) and `allocs`, a
    summary for printing."""

    def __init__(self, dev):
        self.dev = dev
        self.mallocs, self.allocs = 0, ""

    def _segments(self) -> tuple[int, int]:
        st = torch.cuda.memory_stats(self.dev)
        return st.get("segment.all.allocated", 0), st.get("num_alloc_retries", 0)

    def __enter__(self):
        sync(self.dev)
        self.seg = self._segments() if self.dev.type == "cuda" else (0, 0)
        self.t = time.perf_counter()
        return self

    def __exit__(self, *a):
        sync(self.dev)
        self.s = time.perf_counter() - self.t
        if self.dev.type == "cuda":
            seg, retries = (b - a for a, b in zip(self.seg, self._segments()))
            self.mallocs, self.allocs = seg, f"{seg} cudaMalloc" + (f", {retries} cache flushes" if retries else "")


def copy_bandwidth(dev) -> float | None:
    """Bytes/s of a large device-to-device copy (read + write): the practical ceiling."""
    if dev.type != "cuda":
        return None
    x = torch.empty(512 << 20, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    with Timer(dev) as t:
        for _ in range(10):
            y.copy_(x)
    del x, y
    return 2 * 10 * (512 << 20) / t.s


def weight_bytes(model, role: str | None = None) -> int:
    """Bytes one decode step must read: every weight of the base (packed, for nf4) plus the live
    role's adapters in the compute dtype. The input embedding table is not read (a gather)."""
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb
    total = 0
    for n, p in model.named_parameters():
        if "adapters." in n:
            if role is not None and f"adapters.{role}." in n:
                total += p.numel() * emb.element_size()
            continue
        if p is emb and not tied:
            continue
        total += p.numel() * p.element_size()
    for n, b in model.named_buffers():
        if "absmax" in n or "quant" in n:
            total += b.numel() * b.element_size()
    return total


def _add(table: dict, key, us: float) -> None:
    t = table.setdefault(key, [0.0, 0])
    t[0] += us
    t[1] += 1


def trace_tables(events: list[dict]) -> tuple[dict, dict, dict]:
    """A Chrome trace's events (torch.profiler's export) summed by name: device time per (kernel,
    the op that launched it) and self host time per op, each {key: [us, count]}, and per `nla.`
    phase (record_function) {name: [host wall us, device us, count]}: a phase whose kernels ran
    for far less than its wall time was bound by the host. Why not `key_averages()`: on the ~10^5
    ops of a 7B update it takes minutes of Python (23 s for 1.5e5 small ops on this CPU, against
    3 s to export and read back), so a GPU stage's cap can cut the profile before it prints."""
    device, host, phases, launch, by_thread = {}, {}, {}, {}, {}
    for e in events:
        if e.get("ph") != "X":
            continue
        cat, name = e.get("cat", ""), e.get("name", "")
        mark = cat == "user_annotation" and name.startswith("nla.")
        if mark:
            t = phases.setdefault(name[4:], [0.0, 0.0, 0])
            t[0], t[2] = t[0] + e["dur"], t[2] + 1
        if mark or cat == "cpu_op" or (cat in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})):
            by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    for evs in by_thread.values():  # one sweep a thread: open ops give self times and launchers
        ops, marks = [], []  # open ops [end, name, self us]; open phases [end, name]
        for e in sorted(evs, key=lambda e: (e["ts"], -e.get("dur", 0))):
            while ops and ops[-1][0] <= e["ts"]:
                _add(host, ops[-1][1], ops.pop()[2])
            while marks and marks[-1][0] <= e["ts"]:
                marks.pop()
            if e["cat"] == "user_annotation":
                marks.append([e["ts"] + e["dur"], e["name"][4:]])
            elif e["cat"] == "cpu_op":
                if ops:
                    ops[-1][2] -= e["dur"]
                ops.append([e["ts"] + e["dur"], e["name"], e["dur"]])
            else:
                launch[e["args"]["correlation"]] = (ops[-1][1] if ops else "-", marks[-1][1] if marks else None)
        for _, name, self_us in ops:
            _add(host, name, self_us)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            op, phase = launch.get(e.get("args", {}).get("correlation"), ("-", None))
            _add(device, (e["name"], op), e["dur"])
            if phase is not None:
                phases[phase][1] += e["dur"]
    return device, host, phases


def profile_ops(what, fn, dev, rows, extra=lambda: ""):
    """fn() under torch.profiler; its top kernels by device time, each with the op that launched
    it (kernels replayed from a CUDA graph are traced one by one, launched by the graph), or on a
    CPU its top ops by self time; then the library's phases (record_function) by host wall time."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile
    cuda = dev.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(dev)
    with tempfile.TemporaryDirectory() as d:
        prof.export_chrome_trace(f"{d}/trace.json")
        with open(f"{d}/trace.json") as f:
            events = json.load(f)["traceEvents"]
    device, host, phases = trace_tables(events)
    table = device if cuda else host
    if not table:  # a trace laid out otherwise than trace_tables expects: say what it holds
        cats = sorted({e.get("cat", "") for e in events if e.get("ph") == "X"})
        print(f"\nprofile of {what}: no {'kernel' if cuda else 'cpu_op'} events in the trace (categories: {cats})")
    total = sum(us for us, _ in table.values()) or 1.0
    note = extra()
    print(f"\nprofile of {what}{' (' + note + ')' if note else ''}, top {'kernels' if cuda else 'ops'} by "
          f"{'device' if cuda else 'self CPU'} time (total {total / 1e6:.3f} s):", flush=True)
    print(f"{'kernel [the op that launched it]' if cuda else 'op':72} {'ms':>9} {'share':>6} {'calls':>6}")
    for key, (us, n) in sorted(table.items(), key=lambda kv: -kv[1][0])[:rows]:
        name = f"{key[0][:50]} [{key[1][:18]}]" if cuda else key[:70]
        print(f"prof {name:67} {us / 1e3:9.1f} {us / total:6.1%} {n:6d}")
    if phases:  # where the host's wall time far exceeds the device's, the host was the bound
        cells = [f"{k} {wall / 1e3:.1f}{f' / {busy / 1e3:.1f}' if cuda else ''} ({n})"
                 for k, (wall, busy, n) in sorted(phases.items())]
        print(f"phase (host wall ms{' / device ms' if cuda else ''}, calls): " + ", ".join(cells))
    print(flush=True)


# ops a dispatch mode sees that launch no kernel: views, and the host's read of a scalar
VIEWS = {"view", "_unsafe_view", "detach", "t", "transpose", "unsqueeze", "squeeze", "expand", "slice", "select",
         "alias", "as_strided", "permute", "reshape", "_local_scalar_dense"}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def kernels(self) -> int:
        return sum(n for op, n in self.ops.items() if op not in VIEWS)


def counted(fn):
    c = Count()
    with c:
        out = fn()
    return c, out
