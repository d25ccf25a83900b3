"""One RL iteration: sample, score with the current AR, step the AR, step the AV by GRPO.

    1. G explanations per activation from the AV at temperature 1.
    2. Reward = -MSE of the CURRENT AR's reconstruction; unclosed or capped ones get -2.0
       and are not fed to the AR.
    3. One regression step on the AR with these explanations (a frozen AR gets gamed).
    4. One GRPO step on the AV: group-standardised advantages, clipped ratio, KL to the
       frozen warm-start AV ("ref"; its log-probs taken in the rollout where that pays:
       ref_in_rollout), token-level averaging over the global batch.
With one update per batch the ratio is exactly 1 (the clip is inert); it is kept so that
more epochs per batch would be correct. A group's G rows share their prompt's forward (in the
rollout and in both log-prob passes: nla/shared_prefix.py), and in the update the prompts (and,
on a CPU, the AR's template prefix) run once for all micro-batches (shared_prefix.Held): on a GPU
each forward of a few rows costs about what a full one does (every weight read, ~400 launches per
block).
"""
from __future__ import annotations

import time

import torch
from torch.profiler import record_function  # named phases in a profile (bench/common.profile_ops)

import kernels

from . import decoding, dist, lora, switches
from .errors import NLAError
from .reconstructor import Prefix, reconstruct
from .reward import mse, score
from .verbalizer import Prompts, generate, response_logprobs


def rl_step(base, spec, head, vectors, opt_av, opt_ar, G: int, max_new: int, temperature: float = 1.0,
            kl_coef: float = 0.01, clip_eps: float = 0.2, generator=None, micro: int = 0) -> dict:
    t0 = time.time()
    vecs = vectors.repeat_interleave(G, 0).to(base.device)  # this rank's activations, G rows each
    samples = rollout(base, spec, vecs, max_new, temperature, generator, kl_coef, G)
    return update(base, spec, head, vecs, samples, opt_av, opt_ar, G, kl_coef, clip_eps, t0, micro)


def ref_in_rollout(base, rows: int) -> bool:
    """Take the KL reference's log-probs from the rollout (verbalizer.generate's ref_role)? Where
    a decode step reads unmerged weights, a 4-bit base's above all, the reference's rows ride
    along for the price of their adapters and cache, and the update saves a forward of every
    token (one of the GRPO phase's three or four). Not where sampling merges the adapters (two
    roles would read two merged copies: twice a step), nor on a CPU (compute-bound: no gain).
    The twins' log-probs come from the decode step's kernels, which round differently from the
    training forward's (~1e-2 in bf16), so the KL estimate gains a floor of rounding noise, the
    same noise a sampler's log-probs carry in any RL library that reuses them.
    NLA_REF_IN_ROLLOUT=0|1 overrides."""
    forced = switches.forced("NLA_REF_IN_ROLLOUT")
    if forced is not None:
        return forced
    return base.device.type == "cuda" and not lora.merge_wanted(base.model) and 2 * rows <= kernels.nf4.MAX_ROWS


def pass_rows(base, rows: int, G: int = 1) -> int:
    """Rows per decode pass of a rollout: all of them, except on a 4-bit base on a GPU whose decode
    step goes through kernels.nf4 (decoding._all_nf4_kernel), where more rows than the kernel
    serves with the reference's twins (MAX_ROWS / 2) would fall back to bitsandbytes for the whole
    rollout: no compile, no twins, every weight dequantised to a bf16 copy and reread each step
    (~4.5 bytes a weight, against the kernel's 0.5). Then the rollout runs in passes of whole
    groups of at most MAX_ROWS / 2 rows, all of one size but a shorter last one (one decode graph
    serves them): the gpu preset's 32 x G=8 = 256 rows as 4 passes of 64, each with its twins and
    compiled. Only where the kernel is asked for (NLA_KERNELS=triton): on an H200 it was slower
    than bitsandbytes (bench/RESULTS.md), so by default a 4-bit rollout is one bitsandbytes pass.
    NLA_ROLLOUT_ROWS=N caps the rows per pass (0: one pass)."""
    forced = switches.rows()
    model, cap = base.model, kernels.nf4.MAX_ROWS // 2
    if forced is not None:
        cap = forced
    elif not (base.device.type == "cuda" and any(decoding._quantised(m) for m in model.modules())
              and decoding._all_nf4_kernel(model, 2 * cap, model.get_input_embeddings().weight.dtype)):
        return rows
    if cap == 0 or rows <= cap:
        return rows
    groups = -(-rows // G)
    passes = -(-groups // max(1, cap // G))
    return -(-groups // passes) * G


def rollout(base, spec, vecs, max_new: int, temperature: float = 1.0, generator=None, kl_coef: float = 0.01,
            G: int = 1) -> list:
    """The AV's samples for an RL step (vecs: G rows per activation, adjacent), with the reference's
    log-probs where that pays (ref_in_rollout), in passes where one would not fit the 4-bit
    decode kernel (pass_rows)."""
    per = pass_rows(base, len(vecs), G)
    out = []
    for i in range(0, len(vecs), per):
        v = vecs[i:i + per]
        ref = "ref" if kl_coef > 0 and ref_in_rollout(base, len(v)) else None
        out += generate(base, spec, v, max_new, temperature, generator=generator, ref_role=ref)
    return out


def _chunks(n: int, micro: int) -> list[slice]:
    """Row chunks for gradient accumulation: same update, bounded activation memory. Any rows: the
    prompts they share ran once for all chunks (shared_prefix.Held)."""
    step = micro if micro > 0 else max(n, 1)
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _by_length(lengths: list[int], micro: int) -> list[int]:
    """The rows in chunk order: longest first when there is more than one chunk, so that each
    chunk pads its rows to a length near their own (real explanations vary: at the GPU preset's
    cap of 150, a chunk of random rows pads most to ~the cap). One chunk keeps the sampled order."""
    n = len(lengths)
    if micro <= 0 or micro >= n:
        return list(range(n))
    return sorted(range(n), key=lambda i: -lengths[i])  # stable: ties keep the sampled order


# a GPU out of memory outside torch's allocator: a library's own allocation (a cuBLAS or cuDNN
# handle's workspace, a bare cudaMalloc) fails with a RuntimeError that says so (accelerate's
# should_reduce_batch_size matches such messages too)
_OUT_OF_MEMORY = ("CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def _out_of_gpu_memory(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(m in str(e) for m in _OUT_OF_MEMORY))


def fitting(phase, micro: int, n: int, opt, name: str, also=lambda: ""):
    """phase(micro) (an update's phase over n rows in chunks of micro, 0: all), and the micro it
    ran at. After a GPU out-of-memory error the attempt's gradients are dropped and the phase runs
    again in chunks of half as many rows, the same update (gradients are sums over chunks), so a
    batch too large for the card costs a retry, not the run. The caller keeps the micro it
    returns for later steps. `also()`: what else to try, for the message at one row."""
    while True:
        opt.zero_grad(set_to_none=True)
        try:
            return phase(micro), micro
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            if not _out_of_gpu_memory(e):
                raise
            rows = micro if 0 < micro < n else n
            if rows <= 1:
                raise NLAError(f"out of GPU memory in the {name} phase even at one row per chunk: try "
                               f"--grad-checkpointing, --load-in-4bit, a smaller --max-new or --rl-batch{also()}") from None
        micro = (rows + 1) // 2  # out of the handler, whose traceback held the attempt's tensors
        print(f"[nla] out of GPU memory in the {name} phase at {rows} rows per chunk: again at {micro}", flush=True)


def _now(dev) -> float:
    if dev.type == "cuda":  # phase timings in the metrics; one sync per phase is noise next to a step
        torch.cuda.synchronize(dev)
    return time.time()


def update(base, spec, head, vecs, samples, opt_av, opt_ar, G, kl_coef, clip_eps, t0=None, micro: int = 0) -> dict:
    t0 = t0 or time.time()
    t1 = _now(vecs.device)
    ok = torch.tensor([s.ok for s in samples], device=vecs.device)
    texts = [s.text for s in samples]
    good = ok.nonzero().flatten().tolist()
    n_good = dist.sum_(torch.tensor(float(len(good))))

    # AR: one forward per chunk serves the reward (the AR as it was when the texts were sampled:
    # its step comes after every chunk) and the regression step on the fresh explanations
    ar_params = lora.params(base.model, "ar") + list(head.parameters())
    pred = torch.zeros_like(vecs, dtype=torch.float32)

    def ar_phase(micro):
        good_order = [good[i] for i in _by_length([len(texts[j]) for j in good], micro)]  # characters: ~tokens
        with record_function("nla.update.ar"), lora.training_weights(base.model, "ar"):
            prefix = Prefix(base, spec, "ar", held=True)  # once for every chunk (on a GPU: with every row)
            for c in _chunks(len(good), micro):
                rows = good_order[c]
                p = reconstruct(base, spec, head, [texts[i] for i in rows], prefix=prefix)
                (mse(p, vecs[rows]).sum() / n_good.clamp_min(1)).backward()
                pred[rows] = p.detach().float()
            prefix.backward()
    def also():  # only for the message: not a walk over the modules at every step
        return (f", or NLA_MERGE_SAMPLING=0 (sampling's merged weight copies hold "
                f"{lora.merged_bytes(base.model) / 1e9:.1f} GB)" if lora.merge_wanted(base.model) else "")
    _, micro = fitting(ar_phase, micro, len(good), opt_ar, "AR", also)
    stats = score(pred, vecs, spec.mse_mean, G, valid=ok)
    ar_loss = (mse(pred[good], vecs[good].float()).sum() / n_good.clamp_min(1)).detach().cpu() if good else torch.tensor(0.0)
    dist.sum_grads(ar_params)
    if n_good > 0:
        opt_ar.step()
    t2 = _now(vecs.device)

    # AV: one GRPO step
    av_params = lora.params(base.model, "av")
    n_tok = dist.sum_(torch.tensor(float(sum(len(s.ids) for s in samples))))
    own_ref = ("ref",) if any(s.ref_lp is None for s in samples) else ()  # else taken in the rollout

    def grpo_phase(micro):
        kl_sum = torch.zeros((), device=vecs.device)  # on the device: no host sync per chunk
        order = _by_length([len(s.ids) for s in samples], micro)
        with record_function("nla.update.grpo"), lora.training_weights(base.model, "av", *own_ref):
            prompts, ref_prompts = Prompts(base, spec, vecs, "av", held=True), None  # once for every chunk
            for c in _chunks(len(samples), micro):
                rows = order[c]
                chunk = [samples[i] for i in rows]
                ids = [s.ids for s in chunk]
                lp, mask = response_logprobs(base, spec, prompts.rows(rows), ids)
                if all(s.ref_lp is not None for s in chunk):  # taken in the rollout
                    ref = torch.nn.utils.rnn.pad_sequence([s.ref_lp for s in chunk], batch_first=True)
                    ref = ref[:, :lp.shape[1]].to(lp.device)
                else:
                    with torch.no_grad():
                        ref_prompts = ref_prompts or Prompts(base, spec, vecs, "ref")
                        ref, _ = response_logprobs(base, spec, ref_prompts.rows(rows), ids)
                ratio = torch.exp(lp - lp.detach())  # old policy = the sampling policy: one update per batch
                adv = stats.advantage[rows].to(lp.device)[:, None]
                pg = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
                log_r = ref - lp
                kl = torch.exp(log_r) - log_r - 1  # k3 estimator: unbiased, non-negative
                ((pg + kl_coef * kl) * mask).sum().div(n_tok).backward()
                kl_sum += (kl.detach() * mask).sum()
            prompts.backward()
        return kl_sum
    kl_sum, micro = fitting(grpo_phase, micro, len(samples), opt_av, "GRPO", also)  # from the AR's: its rows are shorter
    dist.sum_grads(av_params)
    opt_av.step()
    t3 = _now(vecs.device)

    groups = stats.reward.view(-1, G)
    zero = (groups.max(1).values == groups.min(1).values).float()
    s = lambda x: float(dist.sum_(torch.as_tensor(x, dtype=torch.float32).detach().cpu()))  # noqa: E731
    n = s(len(samples))
    r_mean = s(stats.reward.sum()) / n
    return dict(
        reward_mean=r_mean, reward_std=(s((stats.reward ** 2).sum()) / n - r_mean ** 2) ** 0.5,
        train_fve=s(stats.fve[ok].sum()) / max(1.0, float(n_good)), ar_loss=float(dist.sum_(ar_loss.detach().cpu())),
        kl=s(kl_sum) / float(n_tok), expl_len=float(n_tok) / n,
        fail_frac=1 - float(n_good) / n, zero_spread=s(zero.sum()) / s(len(zero)), step_time=time.time() - t0,
        rollout_time=t1 - t0, ar_time=t2 - t1, grpo_time=t3 - t2, micro_batch=micro)
