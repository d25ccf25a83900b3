"""The NLA_* 0|1 overrides: anything but 0, 1 or unset is a one-line NLAError naming the variable,
wherever the switch is read (a typo used to keep the default without a word)."""
import types

import pytest
import torch

from nla import decoding, grpo, lora, models, shared_prefix, switches
from nla.errors import NLAError

CPU = torch.device("cpu")
SDPA = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation="sdpa"))

READERS = {
    "NLA_PACKED_GQA": lambda: decoding.packed_gqa(SDPA),
    "NLA_CUDA_GRAPH": lambda: decoding._graphs_wanted(CPU),
    "NLA_COMPILE_DECODE": lambda: decoding._compile_wanted(torch.nn.Linear(2, 2), CPU, 1, torch.float32),
    "NLA_REF_IN_ROLLOUT": lambda: grpo.ref_in_rollout(None, 4),
    "NLA_COMMON_LEVEL": lambda: shared_prefix.common_level(CPU),
    "NLA_MERGE_SAMPLING": lambda: lora.merge_wanted(torch.nn.Linear(2, 2)),
    "NLA_FUSED_SAMPLING": lambda: lora._fused_wanted(CPU),
    "NLA_FUSED_NORM": lambda: models.fused_norm_wanted(torch.zeros(1), torch.zeros(1)),
    "NLA_AUTOTUNE_DECODE": lambda: decoding._compile_mode(),
}


def test_autotune_asks_inductor_for_max_autotune_without_its_own_graphs(monkeypatch):
    """NLA_AUTOTUNE_DECODE=1 compiles the decode step with max-autotune, leaving the CUDA graph to
    the decoder (Inductor's own graphs inside ours would not capture); unset, the default mode."""
    asked = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: asked.append(kw) or fn)
    monkeypatch.delenv("NLA_AUTOTUNE_DECODE", raising=False)
    decoding._compiled(len)
    monkeypatch.setenv("NLA_AUTOTUNE_DECODE", "1")
    decoding._compiled(len)
    assert asked == [dict(dynamic=False, mode=None), dict(dynamic=False, mode="max-autotune-no-cudagraphs")]


def test_every_switch_has_a_reader_here():
    assert sorted(READERS) == sorted(switches.NAMES)


def test_forced_reads_zero_one_and_unset(monkeypatch):
    monkeypatch.delenv("NLA_X", raising=False)
    assert switches.forced("NLA_X") is None
    for value, want in (("", None), ("0", False), ("1", True), (" 1 ", True)):
        monkeypatch.setenv("NLA_X", value)
        assert switches.forced("NLA_X") is want, value


@pytest.mark.parametrize("name", sorted(READERS))
def test_a_mistyped_switch_is_an_error_where_it_is_read(monkeypatch, name):
    monkeypatch.setenv(name, "yes")
    with pytest.raises(NLAError, match=f"^{name} must be 0 or 1 .*'yes'"):
        READERS[name]()
    monkeypatch.setenv(name, "0")
    READERS[name]()  # a good value reads without complaint
