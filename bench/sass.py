"""What our Triton kernels compile to on NVIDIA GPUs, measured without one.

A GPU is lent to few sessions, and for minutes. But Triton ships its own ptxas, so every kernel
can be compiled here for sm_80 (A100, RTX 30), sm_89 (RTX 40, L4) and sm_90 (H100/H200), exactly
as our code launches it (the launches are recorded from the real call paths with CPU tensors,
then compiled for each target), and the machine code read back:

    regs     registers per thread (255 is the ceiling)
    spill    bytes per thread spilled to local memory (slow: any is a bug to fix)
    smem     shared memory per block (consumer GPUs allow 99 KB)
    loop     instructions in the kernel's main loop, per thread per iteration
    /elem    for the nf4 decode matmul: issued instructions per weight of a tile. At 0.5 bytes per
             weight an H200 must issue ~3 per weight to keep pace with its memory; more means the
             kernel is bound by issue, not bandwidth, so this is the number its tiles were chosen by.
             A count, not a speed: on an H200 the kernel ran ~10x below what these counts
             predicted (bench/RESULTS.md, 2026-11-27), so a spill is a bug, and the rest a hint

    python bench/sass.py [--arch 80,89,90] [--sweep] [--nf4-sweep]

--sweep compiles the nf4 kernel's candidate tiles (sizes and warps) for each row tile it uses, and
one row tile for MAX_ROWS: the table kernels/nf4.py's TILES came from. --check exits 1 on a spill,
on more than 99 KB, or where a kernel uses a load that must be in flight early in the iteration
that issues it (`late_loads`, `AHEAD`); tests/test_kernels.py runs it for sm_80 and sm_90.
--nf4-sweep compiles
the tiles `bench/kernels.py --only nf4-sweep` times on a GPU, with both code tables, and says how
many programs an SM each holds.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script or -m

import argparse
import re
import subprocess
import tempfile

import torch

SMEM_LIMIT = 101376  # bytes a block may use on sm_86/sm_89 (99 KB)


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **meta)` records the launch instead."""

    def __init__(self, fn, name, calls):
        self.fn, self.name, self.calls = fn, name, calls

    def __getitem__(self, grid):
        return lambda *args, **meta: self.calls.append((self.name, self.fn, args, meta))


def launches(nf4_rows=(1, 32, 64, 128)) -> list[tuple]:
    """(name, JITFunction, args, meta) of each kernel launch our code makes at realistic sizes
    (Qwen2.5-7B widths), recorded from the real call paths with CPU tensors."""
    import kernels.inject as inj
    import kernels.logprobs as lp
    import kernels.nf4 as nf4
    import kernels.reward as rw
    import kernels.attention as att
    import kernels.rope as rope
    import kernels.sample as smp
    calls: list = []
    saved, programs = (nf4._K, lp._K, rw._K, inj._K, smp._K, att._K, rope._K), att.PROGRAMS
    interp = os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter's (as in CI)
    try:
        nf4._K = lp._K = rw._K = inj._K = smp._K = att._K = rope._K = None
        nf4._K = _Recorder(nf4._k(), "nf4", calls)
        k = lp._k()
        lp._K = (_Recorder(k[0], "logprobs.lse_pick", calls), _Recorder(k[1], "logprobs.dlogits", calls))
        rw._K = _Recorder(rw._kernel(), "reward", calls)
        k = inj._k()
        inj._K = (_Recorder(k[0], "inject.replace", calls), _Recorder(k[1], "inject.add", calls))
        smp._K = _Recorder(smp._k(), "sample", calls)
        k = att._k()
        att._K = (_Recorder(k[0], "decode_attention", calls), _Recorder(k[1], "decode_attention.combine", calls))
        rope._K = _Recorder(rope._k(), "rope", calls)
        bf = torch.bfloat16
        d, V, N, K = 3584, 152064, 18944, 3584
        table = os.environ.pop("NLA_NF4_TABLE", None)
        for t, rows in (("pairs", nf4_rows), ("codes", nf4_rows[-2:])):  # the lookup experiment too
            os.environ["NLA_NF4_TABLE"] = t
            for m in rows:
                nf4.nf4_partials(torch.empty(m, K, dtype=bf), torch.empty(N * K // 2, dtype=torch.uint8),
                                 torch.empty(N * K // 64), torch.zeros(256, dtype=torch.int64), N, K, 64)
        os.environ.pop("NLA_NF4_TABLE")
        if table is not None:
            os.environ["NLA_NF4_TABLE"] = table
        h, w, t = torch.zeros(8, d, dtype=bf), torch.zeros(V, d, dtype=bf), torch.zeros(8, dtype=torch.long)
        buf, o, lse = torch.empty(8, V, dtype=bf), torch.empty(8), torch.empty(8)
        lp._lse_pick_triton(h, w, t, o, lse, buf)
        lp._dlogits_triton(h, w, t, lse, torch.ones(8), buf)
        rw.reward_stats_triton(torch.randn(64, d, dtype=bf), torch.randn(64, d, dtype=bf), 1.0, 8,
                               valid=torch.ones(64, dtype=torch.bool))
        ids, slots = torch.zeros(2, 5, dtype=torch.long), torch.full((2, 5), -1, dtype=torch.long)
        inj.inject_replace_triton(torch.zeros(V, d, dtype=bf), ids, slots, torch.zeros(2, d), 150.0)
        inj.inject_add_triton(torch.zeros(2, 5, d, dtype=bf), slots, torch.zeros(2, d))
        smp.sample_next_triton(torch.zeros(64, V, dtype=bf), 1.0, torch.zeros(1, dtype=torch.long))
        # Qwen2.5-7B with twins: 28 query heads on 4 key/value heads of 128, 128 rows (one program
        # each); Qwen2.5-1.5B: 12 on 2, 64 rows (positions split among programs, then combined)
        S, att.PROGRAMS = 226, 4 * 132  # an H200's split target (CPU tensors would not split)
        for b, h, kvh in ((128, 28, 4), (64, 12, 2)):
            att._decode_attention_op(torch.zeros(b, h, 1, 128, dtype=bf), torch.zeros(b, kvh, S, 128, dtype=bf),
                                     torch.zeros(b, kvh, S, 128, dtype=bf), torch.ones(b, 1, 1, S, dtype=torch.bool),
                                     128 ** -0.5)
        # Qwen2.5-7B's rotary: q and k as its projections make them, a training chunk and a decode step
        # with twins (backward: the same kernel, grads contiguous)
        for b, t in ((16, 226), (128, 1)):
            q = torch.zeros(b, t, 28, 128, dtype=bf).transpose(1, 2)
            k = torch.zeros(b, t, 4, 128, dtype=bf).transpose(1, 2)
            cs = torch.zeros(1, t, 128, dtype=bf)
            rope._launch(q, k, cs, cs, False)
        rope._launch(q.contiguous(), k.contiguous(), cs, cs, True)
    finally:
        nf4._K, lp._K, rw._K, inj._K, smp._K, att._K, rope._K = saved
        att.PROGRAMS = programs
        if interp is not None:
            os.environ["TRITON_INTERPRET"] = interp
    return calls


def bind(fn, args, meta, arch: int):
    """(source, options, target) for one recorded launch, through Triton's own launch binder: the
    same specialization a launch gets (integers equal to 1 become constants; integers divisible by
    16 and 16-byte-aligned pointers are marked so, which is what lets loads vectorise and the
    pipeliner turn them into async copies). Before the ninth session this tool built a bare
    signature without those marks, and overstated registers and instructions (bench/RESULTS.md)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    bound, spec, options = create_function_from_signature(fn.signature, fn.params, backend)(*args, **meta)
    options, signature, constexprs, attrs = fn._pack_args(backend, meta, bound, spec, options)
    return ASTSource(fn, signature, constexprs, attrs), options.__dict__, target


def _tool(name: str) -> str:
    import triton.backends.nvidia as nv
    return os.path.join(os.path.dirname(nv.__file__), "bin", name)


def compile_stats(fn, args, meta: dict, arch: int) -> dict:
    """Compile a launch for sm_<arch> with Triton's own ptxas; read registers, spills, shared memory
    and the main loop back from the cubin, and which loads in the loop are late (late_loads)."""
    import triton
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what a launch uses (silences 3.9's notice)
    src, options, target = bind(fn, args, meta, arch)
    c = triton.compile(src, target=target, options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(c.asm["cubin"])
        f.flush()
        dump = lambda flag: subprocess.run([_tool("cuobjdump"), flag, f.name], capture_output=True, text=True).stdout  # noqa: E731
        usage, sass = dump("--dump-resource-usage"), dump("-sass")
    return dict(regs=int(re.search(r"REG:(\d+)", usage).group(1)), spill=int(re.search(r"STACK:(\d+)", usage).group(1)),
                smem=c.metadata.shared, loop=loop_length(sass), late=late_loads(c.asm["ttgir"]))


# kernels whose main-loop loads must all be in flight before the iteration that uses them. A load
# used where it is issued costs a whole memory latency every iteration, and with one or a few
# programs an SM nothing covers it (bench/RESULTS.md, ninth session): the nf4 kernel's weight bytes
# (Triton's pipeliner does not prefetch a load whose values become table addresses, so the kernel
# does) and activations, the decode attention's mask, keys and values
AHEAD = ("nf4", "decode_attention")


def late_loads(ttgir: str) -> set[str]:
    """Element types of the loads in a kernel's main loop (its longest) that are used in the
    iteration that issues them: neither async copies (the pipeliner's prefetch) nor loads whose
    only use is the loop's yield (a prefetch written into the kernel)."""
    lines, body = ttgir.splitlines(), []
    for start in (i for i, ln in enumerate(lines) if "scf.for" in ln):
        loop, depth = [], 0
        for ln in lines[start:]:
            depth += ln.count("{") - ln.count("}")
            if depth <= 0:
                break
            loop.append(ln)
        body = max(body, loop[1:], key=len)
    late = set()
    for ln in body:
        m = re.match(r"\s*(%[\w.]+) = tt\.load .*!tt\.ptr<(\w+)>", ln)
        if m:
            v = m.group(1)
            uses = [u for u in body if re.search(re.escape(v) + r"(?![\w.])", u) and not u.lstrip().startswith(v + " =")]
            if any("scf.yield" not in u for u in uses):
                late.add(m.group(2))
    return late


def loop_length(sass: str) -> int:
    """Instructions of the longest loop (a backward branch) in a kernel's SASS; 0 without one."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    best = 0
    for addr, text in ins:
        t = re.search(r"BRA\b.*?0x([0-9a-f]+)", text)
        if t and int(t.group(1), 16) < addr:
            best = max(best, sum(1 for a, _ in ins if int(t.group(1), 16) <= a <= addr))
    return best


def per_weight(meta: dict, loop: int) -> float:
    """nf4: issued instructions per weight of a tile (all threads' loop instructions / tile size)."""
    return loop * meta.get("num_warps", 4) * 32 / (meta["BLOCK_N"] * meta["BLOCK_K"])


def describe(name, meta) -> str:
    if name == "nf4":
        return (f"rows<={meta['BLOCK_M']} tile {meta['BLOCK_N']}x{meta['BLOCK_K']} "
                f"w{meta.get('num_warps', 4)} s{meta.get('num_stages', 3)}"
                + (f" r{meta['maxnreg']}" if meta.get("maxnreg") else "") + ("" if meta.get("PAIRS", True) else " codes"))
    blocks = " ".join(f"{k}={v}" for k, v in meta.items() if k.startswith("BLOCK"))
    return f"{blocks} w{meta.get('num_warps', 4)}" + (" split" if meta.get("SPLIT") else "")


def bad_loads(name, s) -> set[str]:
    """The late loads (late_loads) of a kernel that must have none (AHEAD)."""
    return s["late"] if name in AHEAD else set()


def row(name, arch, s, meta) -> str:
    flags = (("SPILL " if s["spill"] else "") + ("SMEM>99KB " if s["smem"] > SMEM_LIMIT else "")
             + (f"LATE-{'/'.join(sorted(bad_loads(name, s)))} " if bad_loads(name, s) else ""))
    pw = f"{per_weight(meta, s['loop']):6.1f}" if name == "nf4" and s["loop"] else f"{'':6}"
    late = ",".join(sorted(s["late"])) or "-"
    return (f"{name:24} {describe(name, meta):38} sm_{arch}  {s['regs']:4d} {s['spill']:6d} {s['smem'] / 1024:6.1f} "
            f"{s['loop']:6d} {pw} {late:>9}  {flags}")


HEADER = (f"{'kernel':24} {'launch':38} {'arch':5} {'regs':>4} {'spill':>6} {'smem KB':>7} {'loop':>6} {'/elem':>6} "
          f"{'late':>9}")


def sweep(arches) -> None:
    import kernels.nf4 as nf4
    rows = sorted(nf4.TILES) + [nf4.MAX_ROWS]  # and one tile for the most rows it serves
    rec = {c[2][c[1].arg_names.index("M")]: c for c in launches(nf4_rows=rows) if c[0] == "nf4" and c[3]["PAIRS"]}
    print("\nnf4 candidates (the table TILES was chosen from: fewest /elem with no spill anywhere)\n" + HEADER)
    for bm in rows:
        _, fn, args, meta = rec[bm]  # launched with as many rows as the tile holds: the row count's
        # own specialization (1 becomes a constant, a multiple of 16 is marked)
        for bn in (64, 128):
            for bk in (64, 128):
                for warps in (4, 8):
                    m = dict(meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=nf4.STAGES)
                    for arch in arches:
                        print(row("nf4", arch, compile_stats(fn, args, m, arch), m), flush=True)


# per SM: registers, shared memory a block may use, warps (CUDA's occupancy tables)
SM_LIMITS = {80: (65536, 163 * 1024, 64), 86: (65536, 99 * 1024, 48), 89: (65536, 99 * 1024, 48),
             90: (65536, 227 * 1024, 64)}


def programs_per_sm(s: dict, warps: int, arch: int) -> int:
    """Programs an SM holds at once, by registers (allocated 8 at a time a thread), shared memory
    (1 KB reserved a block) and warps."""
    regs, smem, max_warps = SM_LIMITS[arch]
    return min(regs // (-(-s["regs"] // 8) * 8 * 32 * warps), smem // (s["smem"] + 1024), max_warps // warps)


def timed_sweep(arches, calls) -> None:
    """What each tile `bench/kernels.py --only nf4-sweep` times compiles to, with both code tables
    (each from its own recorded launch in `calls`: the tables differ in type), and how many
    programs an SM holds: the sweep's question is whether more than one pays."""
    from bench.kernels import NF4_SWEEP
    rec = {(args[fn.arg_names.index("M")], meta["PAIRS"]): (fn, args, meta) for name, fn, args, meta in calls
           if name == "nf4"}
    print(f"\nnf4-sweep tiles (bench/kernels.py), and programs an SM\n{HEADER}  programs")
    for rows, tiles in NF4_SWEEP.items():
        for bm, bn, bk, warps, stages, regs in tiles:
            for pairs in (True, False):
                fn, args, meta = rec[rows, pairs]  # the launch with the rows the bench times
                m = dict(meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, maxnreg=regs)
                for arch in arches:
                    s = compile_stats(fn, args, m, arch)
                    print(row("nf4", arch, s, m), programs_per_sm(s, warps, arch), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="80,89,90", help="compute capabilities, comma-separated")
    ap.add_argument("--sweep", action="store_true", help="also compile the nf4 kernel's candidate tiles")
    ap.add_argument("--nf4-sweep", action="store_true", help="also compile the tiles bench/kernels.py's nf4-sweep times")
    ap.add_argument("--check", action="store_true", help="exit 1 if a launch spills, needs more than 99 KB, or "
                    "uses a load that must be in flight early (AHEAD) in the iteration that issues it")
    a = ap.parse_args()
    arches = [int(x) for x in a.arch.split(",")]
    import triton
    print(f"Triton {triton.__version__}, its bundled ptxas; no GPU used")
    print(HEADER)
    seen, bad, calls = set(), 0, launches()
    for name, fn, args, meta in calls:
        key = (name, describe(name, meta))
        if key in seen:
            continue
        seen.add(key)
        for arch in arches:
            s = compile_stats(fn, args, meta, arch)
            bad += bool(s["spill"] or s["smem"] > SMEM_LIMIT or bad_loads(name, s))
            print(row(name, arch, s, meta), flush=True)
    print(f"{len(seen)} launches x {len(arches)} targets: {bad} with a spill, over 99 KB of shared memory, "
          "or a load that must be in flight early used where it is issued (LATE)")
    if a.sweep:
        sweep(arches)
    if a.nf4_sweep:
        timed_sweep(arches, calls)
    sys.exit(1 if a.check and bad else 0)


if __name__ == "__main__":
    main()
