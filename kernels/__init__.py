"""Fused kernels of an NLA step, each a Triton kernel beside a plain-torch reference.

    inject_replace / inject_add   activation injection into the AV's embeddings / hidden states
    reward_stats                  per-row MSE, cosine, FVE, reward and GRPO group advantages
    token_logprobs                log p(token) for GRPO without a [tokens, vocab] fp32 tensor
    nf4_linear                    a decode step's matmul with a bitsandbytes nf4 weight, dequantised in registers
                                  (slower than bitsandbytes on an H200: only under NLA_KERNELS=triton)
    sample_next                   the next token of every row from its logits, in one pass (the exponential race)
    decode_attention              one new token per row over a static KV cache, reading only what it may see
    apply_rope                    the rotary position embedding of q and k, one kernel forward and one backward

The unsuffixed names dispatch (Triton on CUDA, torch on CPU, NLA_KERNELS=torch|triton forces);
`*_torch` and `*_triton` are the two implementations, with the same signatures, for tests and
benchmarks. Note: bitsandbytes probes for an unrelated Hugging Face package also called
`kernels` and finds this one; it falls back quietly, which is harmless.
"""
from .attention import decode_attention, decode_attention_torch, decode_attention_triton
from .dispatch import backend
from .inject import (inject_add, inject_add_torch, inject_add_triton, inject_replace,
                     inject_replace_torch, inject_replace_triton)
from .logprobs import token_logprobs, token_logprobs_torch, token_logprobs_triton
from .nf4 import nf4_linear, nf4_linear_torch, nf4_linear_triton
from .nf4 import prepare as nf4_prepare
from .reward import RewardStats, reward_stats, reward_stats_torch, reward_stats_triton
from .rope import apply_rope, apply_rope_torch, apply_rope_triton
from .sample import sample_next, sample_next_torch, sample_next_triton


def check_env() -> None:
    """ValueError (one line) if NLA_KERNELS or NLA_NF4_TABLE holds a value no kernel reads: the CLI
    asks before it starts, so a typo is not a traceback minutes into a run."""
    from . import dispatch, nf4
    dispatch.forced()
    nf4.table()


__all__ = ["backend", "check_env", "decode_attention", "decode_attention_torch", "decode_attention_triton", "inject_add",
           "inject_add_torch", "inject_add_triton", "inject_replace", "inject_replace_torch", "inject_replace_triton",
           "nf4_linear", "nf4_linear_torch", "nf4_linear_triton", "nf4_prepare", "token_logprobs",
           "token_logprobs_torch", "token_logprobs_triton", "RewardStats", "reward_stats", "reward_stats_torch",
           "reward_stats_triton", "apply_rope", "apply_rope_torch", "apply_rope_triton", "sample_next", "sample_next_torch", "sample_next_triton"]
