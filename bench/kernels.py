"""Speed of each Triton kernel against its torch reference, and bandwidth against a device copy.

GPU only. For every kernel and size: torch ms, Triton ms, the speed-up, and for the memory-bound
kernels (injection, reward) the achieved GB/s as a fraction of a plain `copy_` measured in the
same run (the practical ceiling). Log-probs is compute-bound: it reports TFLOP/s and the peak
memory of the naive log_softmax against the chunked torch path and the Triton path.

    python bench/kernels.py [--dtype bf16|fp32] [--quick]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse

import torch

import kernels


def bench_ms(fn, reps: int = 50) -> float:
    """Median ms of `fn` with CUDA events, after warm-up (compilation, autotune, caches)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def copy_gbs() -> float:
    x = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() / bench_ms(lambda: y.copy_(x)) / 1e6


def row(name, size, t_ms, k_ms, gb=None, peak=None, flops=None):
    extra = ""
    if gb is not None:
        extra = f"{gb / k_ms / 1e6:8.0f} GB/s {gb / k_ms / 1e6 / PEAK:6.0%} of copy"
    if flops is not None:
        extra = f"{flops / k_ms / 1e9:8.1f} TFLOP/s"
    print(f"{name:15} {size:24} {t_ms:9.3f} {k_ms:9.3f} {t_ms / k_ms:7.2f}x  {extra}")


def main():
    global PEAK
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--quick", action="store_true", help="fewer sizes")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU (the CPU path is the torch reference itself)")
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    el = torch.tensor([], dtype=dt).element_size()
    dev = "cuda"
    PEAK = copy_gbs()
    print(f"device: {torch.cuda.get_device_name()}  dtype: {a.dtype}  copy bandwidth: {PEAK:.0f} GB/s")
    print(f"{'kernel':15} {'size':24} {'torch ms':>9} {'triton ms':>9} {'speedup':>8}")
    ds = [576, 3584] if a.quick else [576, 2048, 3584, 8192]
    ns = [64, 4096] if a.quick else [64, 512, 4096]

    for d in ds:
        for n in ns:  # n prompts of 96 tokens, one placeholder each
            T, V = 96, 32768
            W = torch.randn(V, d, device=dev, dtype=dt)
            ids = torch.randint(0, V, (n, T), device=dev)
            slots = torch.full((n, T), -1, device=dev, dtype=torch.long)
            slots[torch.arange(n), 40] = torch.arange(n, device=dev)
            vec = torch.randn(n, d, device=dev, dtype=dt)
            t = bench_ms(lambda: kernels.inject_replace_torch(W, ids, slots, vec, 250.0))
            k = bench_ms(lambda: kernels.inject_replace_triton(W, ids, slots, vec, 250.0))
            row("inject_replace", f"n={n} T={T} d={d}", t, k, gb=2 * n * T * d * el + n * T * 16)
            h = torch.randn(n, T, d, device=dev, dtype=dt)
            t = bench_ms(lambda: kernels.inject_add_torch(h, slots, vec))
            k = bench_ms(lambda: kernels.inject_add_triton(h, slots, vec))
            row("inject_add", f"n={n} T={T} d={d}", t, k, gb=2 * n * T * d * el + n * T * 8)
            del W, h

    for d in ds:
        for n in ns:
            p = torch.randn(n, d, device=dev, dtype=dt)
            q = torch.randn(n, d, device=dev, dtype=dt)
            ok = torch.rand(n, device=dev) > 0.1
            t = bench_ms(lambda: kernels.reward_stats_torch(p, q, 0.6, 8, valid=ok))
            k = bench_ms(lambda: kernels.reward_stats_triton(p, q, 0.6, 8, valid=ok))
            row("reward_stats", f"N={n} G=8 d={d}", t, k, gb=2 * n * d * el + 21 * n)

    for d, V in ([(576, 49152), (3584, 152064)] if a.quick else [(576, 49152), (2048, 128256), (3584, 152064)]):
        for n in [1200, 9600]:  # 8 x G=8 x 150 response tokens = 9600
            h = torch.randn(n, d, device=dev, dtype=dt) * 0.5
            W = torch.randn(V, d, device=dev, dtype=dt) * 0.05
            tg = torch.randint(0, V, (n,), device=dev)

            def naive():
                return torch.log_softmax((h @ W.T).float(), -1).gather(1, tg[:, None])

            t = bench_ms(lambda: kernels.token_logprobs_torch(h, W, tg), reps=10)
            k = bench_ms(lambda: kernels.token_logprobs_triton(h, W, tg), reps=10)
            row("token_logprobs", f"N={n} d={d} V={V}", t, k, flops=2 * n * d * V)
            peaks = []
            for fn in (naive, lambda: kernels.token_logprobs_torch(h, W, tg),
                       lambda: kernels.token_logprobs_triton(h, W, tg)):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                try:
                    fn()
                    torch.cuda.synchronize()
                    peaks.append(f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} MiB")
                except torch.cuda.OutOfMemoryError:
                    peaks.append("OOM")
            print(f"{'':15} extra memory: naive {peaks[0]}, chunked torch {peaks[1]}, triton {peaks[2]}")
            del h, W
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
