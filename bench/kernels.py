"""Speed of each Triton kernel against its torch reference, and bandwidth against a device copy.

GPU only (on a machine without CUDA it says so and exits). For every kernel and size: torch ms,
Triton ms, the speed-up, and for the memory-bound kernels (injection, reward) the achieved GB/s as
a fraction of a plain `copy_` measured in the same run (the practical ceiling). Log-probs is
GEMM-bound: forward and forward+backward (gradient wrt hidden, as in GRPO with a frozen head; add
--weight-grad for the head's too), their TFLOP/s, and the peak extra memory of the naive
log_softmax, the chunked torch path and the Triton path. It ends by checking the log-prob targets:
Triton >= 1.0x the chunked torch path at every size, >= 1.5x at N=9600 with V=152k, and no more
peak memory than the chunked torch path.

    python bench/kernels.py [--dtype bf16|fp32] [--quick] [--only inject,reward,logprobs,nf4,sample,attention,rope,nf4-sweep]
                            [--weight-grad]

nf4: a decode step's projections with a 4-bit base, bitsandbytes against kernels.nf4 (the nf4 bytes
read per ms against the copy bandwidth), beside a bf16 GEMM of the same shape. nf4-sweep (on
request): the kernel's tiles, stages and register caps with each code table by device time, the best
against bitsandbytes.
nf4, sample and attention are timed as a decode step runs them, replayed in a CUDA graph (device
time; the last column says "eager" where a call could not be captured).
sample: a decode step's draw of the next token of every row (torch.multinomial's softmax,
exponentials, divide and argmax against one fused pass), and the logits read per ms.
attention: a decode step's attention over a static cache filled to 150 of 226 slots (SDPA with the
mask, which reads every slot, against the kernel that reads the filled ones), per layer.
rope: the rotary embedding of q and k (Hugging Face's ops against one kernel), a decode step's in a
graph and a training chunk's forward and backward.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import contextlib

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


def graph_ms(fn, reps: int = 20, inner: int = 10, generators=()) -> tuple[float, bool]:
    """(median device ms per call, captured?) of `fn` replayed in a CUDA graph of `inner` calls: how
    a decode step runs its kernels, with no host time between them (one eager call of a custom op
    and a Triton launch costs ~0.2 ms of host time, more than these kernels take). The generators
    `fn` draws from are registered with the graph (without that, capture fails). A call that
    cannot be captured is timed eagerly instead (False)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        for gen in generators:
            g.register_generator_state(gen)
        with torch.cuda.graph(g):
            for _ in range(inner):
                fn()
    except Exception:
        torch.cuda.synchronize()
        return bench_ms(fn), False
    return bench_ms(g.replay, reps) / inner, True


def _how(*captured: bool) -> str:
    return "graph" if all(captured) else "/".join("graph" if c else "eager" for c in captured)


def peak_mib(fn):
    """Peak memory `fn` allocates beyond what was live before it, in MiB (None on OOM)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        fn()
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        return None
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_gbs() -> float:
    x = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() / bench_ms(lambda: y.copy_(x)) / 1e6


def row(name, size, t_ms, k_ms, gb=None, flops=None):
    extra = ""
    if gb is not None:
        extra = f"{gb / k_ms / 1e6:8.0f} GB/s {gb / k_ms / 1e6 / PEAK:6.0%} of copy"
    if flops is not None:
        extra = f"{flops / t_ms / 1e9:8.1f} / {flops / k_ms / 1e9:.1f} TFLOP/s (torch / triton)"
    print(f"{name:16} {size:28} {t_ms:9.3f} {k_ms:9.3f} {t_ms / k_ms:7.2f}x  {extra}")


def bench_inject(ds, ns, dt, el, dev):
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
            torch.cuda.empty_cache()


def bench_reward(ds, ns, dt, el, dev):
    for d in ds:
        for n in ns:
            p = torch.randn(n, d, device=dev, dtype=dt)
            q = torch.randn(n, d, device=dev, dtype=dt)
            ok = torch.rand(n, device=dev) > 0.1
            t = bench_ms(lambda: kernels.reward_stats_torch(p, q, 0.6, 8, valid=ok))
            k = bench_ms(lambda: kernels.reward_stats_triton(p, q, 0.6, 8, valid=ok))
            row("reward_stats", f"N={n} G=8 d={d}", t, k, gb=2 * n * d * el + 21 * n)


def bench_logprobs(shapes, dt, dev, weight_grad):
    """Returns one record per size: the speed-ups and peak memories the targets are about."""
    records = []
    for d, V in shapes:
        for n in [1200, 9600]:  # 8 x G=8 x 150 response tokens = 9600
            h = torch.randn(n, d, device=dev, dtype=dt)
            W = torch.randn(V, d, device=dev, dtype=dt) * 0.02
            tg = torch.randint(0, V, (n, ), device=dev)
            gout = torch.randn(n, device=dev)
            hg = h.clone().requires_grad_()
            Wg = W.clone().requires_grad_(weight_grad)
            impls = {"torch": kernels.token_logprobs_torch, "triton": kernels.token_logprobs_triton}

            def fwd(impl):
                return lambda: impls[impl](h, W, tg)

            def fwd_bwd(impl):
                def run():
                    hg.grad = Wg.grad = None
                    impls[impl](hg, Wg, tg).backward(gout)
                return run

            size = f"N={n} d={d} V={V}"
            f_t, f_k = (bench_ms(fwd(i), reps=10) for i in impls)
            row("logprobs fwd", size, f_t, f_k, flops=2 * n * d * V)
            b_t, b_k = (bench_ms(fwd_bwd(i), reps=10) for i in impls)
            gemms = 4 if weight_grad else 3  # forward, recomputed logits, gh (and gw)
            row("logprobs fwd+bwd", size, b_t, b_k, flops=gemms * 2 * n * d * V)
            mem = {"naive fwd": peak_mib(lambda: torch.log_softmax((h @ W.T).float(), -1).gather(1, tg[:, None]))}
            for i in impls:
                mem[f"{i} fwd"] = peak_mib(fwd(i))
                mem[f"{i} fwd+bwd"] = peak_mib(fwd_bwd(i))
            print(f"{'':16} peak extra MiB: " + ", ".join(
                f"{k} {'OOM' if v is None else f'{v:.0f}'}" for k, v in mem.items()))
            records.append(dict(n=n, d=d, V=V, fwd=f_t / f_k, fwd_bwd=b_t / b_k, mem=mem))
            del h, W, hg, Wg
            torch.cuda.empty_cache()
    return records


def _nf4_layer(N: int, K: int, dev):
    """A random bitsandbytes nf4 Linear4bit [N, K] (double quantisation) on `dev`, the kernel's view
    of it, and the nf4 bytes the kernel must read (weight + fp32 scales)."""
    import bitsandbytes as bnb
    q = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(torch.randn(N, K) * 0.02, requires_grad=False, compress_statistics=True,
                                 quant_type="nf4")
    q = q.to(dev)
    p = kernels.nf4_prepare(q)
    return q, p, N * K / 2 + N * K / p[5] * 4


@contextlib.contextmanager
def _nf4_table(table: str):
    """kernels.nf4 reads NLA_NF4_TABLE when its op launches, i.e. at a graph's capture: set it
    around one, then put back what was there."""
    saved = os.environ.get("NLA_NF4_TABLE")
    os.environ["NLA_NF4_TABLE"] = table
    try:
        yield
    finally:
        os.environ.pop("NLA_NF4_TABLE")
        if saved is not None:
            os.environ["NLA_NF4_TABLE"] = saved


def bench_nf4(rows, dev):
    """A decode step's projections of a Qwen2.5-7B-shaped nf4 base: a Linear4bit (bitsandbytes' path:
    a bf16 copy of the weight, then a GEMM, at these sizes on an H100/H200), our kernel, a plain bf16
    GEMM (what a full-precision base reads), and bitsandbytes' op with the scales undone once
    (kernels.nf4.bnb_linear: what a 4-bit rollout now runs without the kernel). GB/s counts the
    nf4 bytes the kernel must read (weight + fp32 scales). Ours includes reordering the activations
    (kernels.nf4.evens_then_odds: a small copy here, which a compiled decode step fuses into the op
    that makes them)."""
    print("\nnf4 decode matmul (Qwen2.5-7B shapes): bitsandbytes vs kernels.nf4, and a bf16 GEMM for scale")
    print(f"{'projection':16} {'rows x N x K':28} {'bnb ms':>9} {'triton ms':>9} {'speedup':>8}  nf4 GB/s, bf16 GEMM ms, "
          f"codes-table ms (NLA_NF4_TABLE=codes), bitsandbytes' op with the scales undone once ms (the default)")
    for name, N, K in (("q/o", 3584, 3584), ("k/v", 512, 3584), ("gate/up", 18944, 3584), ("down", 3584, 18944)):
        q, p, gb = _nf4_layer(N, K, dev)
        w = kernels.nf4.dequantize_torch(*p, torch.bfloat16)
        for m in rows:
            x = torch.randn(m, K, device=dev, dtype=torch.bfloat16)
            with torch.no_grad():
                t_ms, tg = graph_ms(lambda: q(x))
                k_ms, kg = graph_ms(lambda: kernels.nf4_linear_triton(x, *p))
                g_ms, gg = graph_ms(lambda: torch.nn.functional.linear(x, w))
                with _nf4_table("codes"):
                    c_ms, cg = graph_ms(lambda: kernels.nf4_linear_triton(x, *p))
                o_ms, og = graph_ms(lambda: kernels.nf4.bnb_linear(x, p))
            print(f"{name:16} {f'{m} x {N} x {K}':28} {t_ms:9.3f} {k_ms:9.3f} {t_ms / k_ms:7.2f}x  "
                  f"{gb / k_ms / 1e6:6.0f} GB/s ({gb / k_ms / 1e6 / PEAK:.0%} of copy), {g_ms:.3f}, {c_ms:.3f} "
                  f"({t_ms / c_ms:.2f}x bnb), {o_ms:.3f} ({t_ms / o_ms:.2f}x)  {_how(tg, kg, gg, cg, og)}")
        del q, p, w
        torch.cuda.empty_cache()


# nf4 tiles to time (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, maxnreg) at 64 rows (a rollout's)
# and 128 (with its reference's twins), each first with the default plan. With the weight bytes
# loaded an iteration ahead (the ninth session), the open questions: whether the pipeliner's next
# stage (s3: the table lookups and scales two iterations ahead) pays; whether more programs an SM
# do (registers capped at 128, or 4-warp tiles: two or three programs; 128 x 64 on 4 warps also
# issues the fewest instructions per weight as launched); whether wider tiles do
# (256 x 64 reads each row's activations from L2 half as often per weight byte; 128 x 128 has
# twice the bytes in flight); and at 128 rows, one 128-row tile (the default) against two 64-row
# ones (every weight dequantised twice, the second read from L2). What each compiles to for sm_90
# under Triton 3.6: bench/RESULTS.md, ninth session (bench/sass.py --nf4-sweep)
NF4_SWEEP = {64: [(64, 128, 64, 8, 2, None), (64, 128, 64, 8, 3, None), (64, 128, 64, 8, 2, 128),
                  (64, 128, 64, 4, 2, None), (64, 64, 64, 4, 2, None), (64, 256, 64, 8, 2, None),
                  (64, 128, 128, 8, 2, None)],
             128: [(128, 128, 64, 8, 2, None), (128, 128, 64, 8, 3, None), (64, 128, 64, 8, 2, None)]}
NF4_TABLES = ("pairs", "codes")  # kernels.nf4.table: the gathers are the first suspect for its slowness, so
# each tile runs with both (rather than with a second split-K target, a smaller question)


def use_tile(bm: int, tile: tuple, tiles: dict) -> None:
    """kernels.nf4.TILES with `tile` for `bm` rows and no larger row tile: the plan takes the largest
    tile a row count fits, so with a 64-row tile 128 rows run as two."""
    import kernels.nf4 as nf4
    nf4.TILES.clear()
    nf4.TILES.update({m: t for m, t in tiles.items() if m < bm})
    nf4.TILES[bm] = tile


def bench_nf4_sweep(dev):
    """The nf4 kernel's tile and pipeline stages with each code table by device time (each beside
    bitsandbytes), for the two largest 7B projections at a rollout's 64 rows and 128 with twins."""
    import kernels.nf4 as nf4
    print("\nnf4 tile sweep (Qwen2.5-7B, device time in a CUDA graph): tile, stages, code table")
    saved = (dict(nf4.TILES), nf4.STAGES, nf4.MAXNREG)
    try:
        for name, N, K in (("gate/up", 18944, 3584), ("down", 3584, 18944)):
            q, p, gb = _nf4_layer(N, K, dev)
            for m, tiles in NF4_SWEEP.items():
                x = torch.randn(m, K, device=dev, dtype=torch.bfloat16)
                with torch.no_grad():
                    t_ms, _ = graph_ms(lambda: q(x))
                    best = None
                    for bm, bn, bk, warps, stages, regs in tiles:
                        tile = f"{bm}x{bn}x{bk} w{warps} s{stages}" + (f" r{regs}" if regs else "")
                        for table in NF4_TABLES:
                            use_tile(bm, (bn, bk, warps), saved[0])
                            nf4.STAGES, nf4.MAXNREG = stages, regs
                            try:
                                with _nf4_table(table):
                                    k_ms, kg = graph_ms(lambda: kernels.nf4_linear_triton(x, *p))
                            except Exception as e:  # a tile this GPU cannot run (shared memory): say so, go on
                                print(f"{name:8} {m:4d} rows  {tile} {table}: {type(e).__name__}")
                                continue
                            if best is None or k_ms < best[0]:
                                best = (k_ms, f"{tile} {table}")
                            print(f"{name:8} {m:4d} rows  {tile} {table}: {k_ms:.3f} ms "
                                  f"({t_ms / k_ms:.2f}x bnb {t_ms:.3f}), {gb / k_ms / 1e6:.0f} GB/s  {_how(kg)}", flush=True)
                if best:
                    print(f"{name:8} {m:4d} rows  best {best[1]}: {t_ms / best[0]:.2f}x bitsandbytes", flush=True)
            del q, p
            torch.cuda.empty_cache()
    finally:
        nf4.TILES.clear()
        nf4.TILES.update(saved[0])
        nf4.STAGES, nf4.MAXNREG = saved[1:]


def bench_sample(shapes, dev):
    """The next token of every row from [rows, V] bf16 logits at T = 1: what a rollout's step ends with."""
    print("\nnext-token draw (exponential race): torch.multinomial path vs one fused pass")
    print(f"{'logits':16} {'rows x V':28} {'torch ms':>9} {'triton ms':>9} {'speedup':>8}  logits GB/s")
    g = torch.Generator(device=dev).manual_seed(0)
    for rows, V in shapes:
        x = torch.randn(rows, V, device=dev, dtype=torch.bfloat16)
        t_ms, tg = graph_ms(lambda: kernels.sample_next_torch(x, 1.0, g), generators=(g,))
        k_ms, kg = graph_ms(lambda: kernels.sample_next(x, 1.0, g), generators=(g,))  # with its seed draw, as a rollout calls it
        gb = x.numel() * x.element_size()
        print(f"{'bf16':16} {f'{rows} x {V}':28} {t_ms:9.3f} {k_ms:9.3f} {t_ms / k_ms:7.2f}x  "
              f"{gb / k_ms / 1e6:6.0f} GB/s ({gb / k_ms / 1e6 / PEAK:.0%} of copy)  {_how(tg, kg)}")


def bench_attention(shapes, dev):
    """One layer's attention of a decode step, halfway through a rollout: [b, h, 1, d] queries over
    a [b, kvh, 226, d] bf16 cache filled to 150 slots."""
    import kernels.attention as att
    print("\ndecode attention over a static cache filled to 150 of 226 slots (one layer)")
    print(f"{'shape':16} {'rows x heads/kv x d':28} {'torch ms':>9} {'triton ms':>9} {'speedup':>8}  filled KV GB/s, "
          f"splits; unsplit ms (one program per row and head)")
    for name, b, h, kvh, d in shapes:
        S, filled = 226, 150
        q = torch.randn(b, h, 1, d, device=dev, dtype=torch.bfloat16)
        k, v = (torch.randn(b, kvh, S, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
        mask = (torch.arange(S, device=dev) < filled)[None, None, None, :].expand(b, 1, 1, S)
        t_ms, tg = graph_ms(lambda: kernels.decode_attention_torch(q, k, v, mask, d ** -0.5))
        k_ms, kg = graph_ms(lambda: kernels.decode_attention_triton(q, k, v, mask, d ** -0.5))
        programs, att.PROGRAMS = att.PROGRAMS, 1  # read at launch, i.e. at capture
        u_ms, ug = graph_ms(lambda: kernels.decode_attention_triton(q, k, v, mask, d ** -0.5))
        att.PROGRAMS = programs
        gb, splits = 2 * b * kvh * filled * d * 2, att._split(b * kvh, S, att._target(q.device))[0]
        print(f"{name:16} {f'{b} x {h}/{kvh} x {d}':28} {t_ms:9.3f} {k_ms:9.3f} {t_ms / k_ms:7.2f}x  "
              f"{gb / k_ms / 1e6:6.0f} GB/s ({gb / k_ms / 1e6 / PEAK:.0%} of copy), {splits} splits; "
              f"{u_ms:.3f} ({t_ms / u_ms:.2f}x torch)  {_how(tg, kg, ug)}")


def bench_rope(shapes, dev):
    """The rotary embedding of q and k as a block applies it: Hugging Face's ten ops against one
    kernel, forward (a decode step's, replayed in a graph) and forward + backward (a training chunk's)."""
    print("\nrotary embedding of q and k (Hugging Face's apply_rotary_pos_emb against kernels.apply_rope)")
    print(f"{'shape':16} {'rows x tokens x heads':28} {'torch ms':>9} {'triton ms':>9} {'speedup':>8}  q+k GB/s")
    for name, b, t, h, kvh, d in shapes:
        q = torch.randn(b, t, h * d, device=dev, dtype=torch.bfloat16).view(b, t, h, d).transpose(1, 2)
        k = torch.randn(b, t, kvh * d, device=dev, dtype=torch.bfloat16).view(b, t, kvh, d).transpose(1, 2)
        cos, sin = (torch.randn(1, t, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
        gb = 2 * 2 * (q.numel() + k.numel())  # read and write, bf16
        if t == 1:  # a decode step: forward only, in a graph
            t_ms, tg = graph_ms(lambda: kernels.apply_rope_torch(q, k, cos, sin))
            k_ms, kg = graph_ms(lambda: kernels.apply_rope_triton(q, k, cos, sin))
            how = _how(tg, kg)
        else:
            qi, ki = q.detach().requires_grad_(), k.detach().requires_grad_()
            grads = [torch.randn(b, x, t, d, device=dev, dtype=torch.bfloat16) for x in (h, kvh)]

            def step(fn):
                torch.autograd.backward(list(fn(qi, ki, cos, sin)), grads)
            t_ms, k_ms = bench_ms(lambda: step(kernels.apply_rope_torch)), bench_ms(lambda: step(kernels.apply_rope_triton))
            how = "fwd+bwd, eager"
            gb *= 2
        print(f"{name:16} {f'{b} x {t} x {h}/{kvh}':28} {t_ms:9.3f} {k_ms:9.3f} {t_ms / k_ms:7.2f}x  "
              f"{gb / k_ms / 1e6:6.0f} GB/s ({gb / k_ms / 1e6 / PEAK:.0%} of copy)  {how}")


def check_targets(records):
    print("\nlog-prob targets (triton against the chunked torch path):")
    worst_f = min(records, key=lambda r: r["fwd"])
    worst_b = min(records, key=lambda r: r["fwd_bwd"])
    print(f"  >= 1.0x at every size: fwd min {worst_f['fwd']:.2f}x (N={worst_f['n']} V={worst_f['V']}), "
          f"fwd+bwd min {worst_b['fwd_bwd']:.2f}x (N={worst_b['n']} V={worst_b['V']}) -> "
          f"{'met' if min(worst_f['fwd'], worst_b['fwd_bwd']) >= 1.0 else 'MISSED'}")
    big = [r for r in records if r["n"] == 9600 and r["V"] == 152064]
    for r in big:
        print(f"  >= 1.5x at N=9600 d={r['d']} V=152064: fwd {r['fwd']:.2f}x, fwd+bwd {r['fwd_bwd']:.2f}x -> "
              f"{'met' if min(r['fwd'], r['fwd_bwd']) >= 1.5 else 'MISSED'}")
    ok = True
    for r in records:
        for phase in ("fwd", "fwd+bwd"):
            t, k = r["mem"][f"torch {phase}"], r["mem"][f"triton {phase}"]
            if k is None or (t is not None and k > t):
                ok = False
                print(f"  memory: N={r['n']} V={r['V']} {phase}: triton {k} MiB > torch {t} MiB")
    print(f"  peak memory <= chunked torch at every size and phase -> {'met' if ok else 'MISSED'}")


def main():
    global PEAK
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--quick", action="store_true", help="fewer sizes")
    ap.add_argument("--only", default="inject,reward,logprobs,nf4,sample,attention,rope", help="kernel families, comma-separated")
    ap.add_argument("--weight-grad", action="store_true", help="log-probs backward also into the head")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU; nothing measured (on CPU the torch reference is what runs)")
        return
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    el = torch.tensor([], dtype=dt).element_size()
    dev = "cuda"
    PEAK = copy_gbs()
    print(f"device: {torch.cuda.get_device_name()}  dtype: {a.dtype}  copy bandwidth: {PEAK:.0f} GB/s")
    print(f"{'kernel':16} {'size':28} {'torch ms':>9} {'triton ms':>9} {'speedup':>8}")
    ds = [576, 3584] if a.quick else [576, 2048, 3584, 8192]
    ns = [64, 4096] if a.quick else [64, 512, 4096]
    only = set(a.only.split(","))
    if "inject" in only:
        bench_inject(ds, ns, dt, el, dev)
    if "reward" in only:
        bench_reward(ds, ns, dt, el, dev)
    if "logprobs" in only:
        # SmolLM2-135M, Llama-3.2-1B-shaped, Qwen2.5-7B
        shapes = [(576, 49152), (3584, 152064)] if a.quick else [(576, 49152), (2048, 128256), (3584, 152064)]
        check_targets(bench_logprobs(shapes, dt, dev, a.weight_grad))
    if "nf4" in only:
        # 128: a 64-row rollout with its reference's twins; 256: the gpu preset's 32 x G=8 rollout, past
        # nf4.MAX_ROWS (it stays on bitsandbytes: does the kernel win there too?)
        bench_nf4([1, 64, 128, 256] if a.quick else [1, 8, 64, 128, 256], dev)
    if "nf4-sweep" in only:
        bench_nf4_sweep(dev)
    if "sample" in only:
        # SmolLM2's vocabulary at 16 rows (the CPU recipe's rollouts), Qwen2.5's at 64 (the issue's)
        bench_sample([(16, 49152), (64, 151936), (256, 151936)], dev)
    if "attention" in only:
        # the 1.5B rollout's 64 rows; the 7B one's 64 rows, alone and with their KL twins
        bench_attention([("qwen2.5-1.5b", 64, 12, 2, 128), ("qwen2.5-7b", 64, 28, 4, 128),
                         ("qwen2.5-7b twins", 128, 28, 4, 128)], dev)
    if "rope" in only:
        # a 7B decode step with twins; a 7B update's chunk of 16 rows
        bench_rope([("qwen2.5-7b twins", 128, 1, 28, 4, 128), ("qwen2.5-7b chunk", 16, 226, 28, 4, 128)], dev)


if __name__ == "__main__":
    main()
