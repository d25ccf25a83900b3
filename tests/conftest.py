"""Shared fixtures: tiny random models built in-process (no downloads), and the Triton interpreter on CPU.

TRITON_INTERPRET must be set before any module decorates a kernel with @triton.jit, so it is
set here, first, unless a GPU run asks for real kernels (NLA_TEST_GPU=1).
"""
import os

if os.environ.get("NLA_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
