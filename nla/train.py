"""`nla-cli train`: warm-start data -> AR SFT -> AV SFT -> GRPO with the AR alongside.

Each stage leaves something on disk under --out and is skipped when it is already there, so
the same command resumes after a kill: summaries resume per batch, SFT per stage, RL from the
last checkpoint (adapters, head, optimiser states, sampling RNG, metrics truncated to match).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint, dist, lora, sft, warmstart
from .collect import load_activations
from .config import TrainConfig, to_dict
from .errors import NLAError
from .grpo import rl_step
from .io import append_jsonl, read_jsonl, write_json, write_text
from .metrics import content_hits, explain_and_score, token_hits
from .models import load_base
from .reconstructor import ARHead
from .spec import build_spec
from .verbalizer import target_ids


def _subset(acts, n: int, seed: int):
    if not n or n >= len(acts):
        return acts
    idx = torch.randperm(len(acts), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    from .collect import Activations
    return Activations(acts.meta, acts.vectors[idx], acts.doc_id[idx], acts.pos[idx], acts.token_id[idx],
                       acts.split[idx], [acts.prefixes[i] for i in idx.tolist()])


def _evaluate(base, spec, head, held, cfg, shuffled: bool = False) -> dict:
    vec = held.vectors.float()
    res = explain_and_score(base, spec, head, vec, cfg.eval_max_new, temperature=0.0)
    tokens = held.tokens(base.tokenizer)
    out = dict(heldout_fve=res["fve"], heldout_cos=res["cos"], heldout_ok=res["ok_frac"],
               heldout_token_hits=token_hits(res["texts"], tokens),
               heldout_content_hits=content_hits(res["texts"], held.prefixes))
    if shuffled:  # the control: the AV reads another row's vector; scored against the true one
        ctl = explain_and_score(base, spec, head, vec, cfg.eval_max_new, temperature=0.0, av_input=torch.roll(vec, 1, 0))
        out.update(shuffled_fve=ctl["fve"], shuffled_cos=ctl["cos"], shuffled_token_hits=token_hits(ctl["texts"], tokens),
                   shuffled_content_hits=content_hits(ctl["texts"], held.prefixes))
    out["examples"] = res["texts"][:4]
    return out


def warmstart_summarizer(spec: str, base, device: str):
    """--summarizer -> what warmstart.build takes: "text", a loaded model, or an endpoint."""
    from .endpoint import parse_summarizer
    if spec in ("", "text"):
        return "text"
    if spec == "self":
        return base
    return parse_summarizer(spec) or load_base(spec, device=device)


def _plot(out: Path, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ev = [r for r in rows if r.get("stage") == "eval"]
    rl = [r for r in rows if r.get("stage") == "rl"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot([r["step"] for r in ev], [r["heldout_fve"] for r in ev], "o-")
    ax[0].axhline(0, color="grey", lw=0.8)
    ax[0].set(title="held-out FVE (greedy)", xlabel="RL step (0 = after warm start)", ylabel="FVE")
    ax[1].plot([r["step"] for r in rl], [r["reward_mean"] for r in rl], ".-")
    ax[1].set(title="RL reward (-MSE)", xlabel="RL step", ylabel="mean reward")
    fig.tight_layout()
    tmp = out / ".training.tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(out / "training.png")


def train(cfg: TrainConfig) -> dict:
    rank, world = dist.init()
    torch.manual_seed(cfg.seed)
    acts = load_activations(cfg.acts)
    base = load_base(cfg.model or acts.meta["model"], device=cfg.device, load_in_4bit=cfg.load_in_4bit)
    if base.d_model != acts.meta["d_model"]:
        raise NLAError(f"{cfg.acts} holds d={acts.meta['d_model']} vectors of {acts.meta['model']}, but "
                       f"{base.name} has d_model={base.d_model}")
    layer = acts.meta["layer"]
    base.check_layer(layer)
    if cfg.rl_batch % world:
        raise NLAError(f"--rl-batch {cfg.rl_batch} must be divisible by the {world} ranks")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = build_spec(base, layer, acts.meta, cfg.injection_mode, cfg.rank_av, cfg.rank_ar, cfg.injection_scale or None)
    av_data = _subset(acts.select("sft_av"), cfg.n_warm, cfg.seed)
    ar_data = _subset(acts.select("sft_ar"), cfg.n_warm, cfg.seed + 1)
    rl_data = acts.select("rl")
    held = _subset(acts.select("heldout"), cfg.eval_n, cfg.seed + 2)
    if min(len(av_data), len(ar_data), len(rl_data), len(held)) == 0:
        raise NLAError(f"{cfg.acts} is too small: every split (sft_av, sft_ar, rl, heldout) needs vectors; collect more documents")
    samples = cfg.rl_steps * cfg.rl_batch * cfg.group
    if rank == 0:
        print(f"[nla] train: {base.name} layer {layer}, d={base.d_model}, injection {spec.injection_mode} at norm "
              f"{spec.injection_scale:g}, placeholder {spec.placeholder!r} (id {spec.placeholder_id}), {world} rank(s)")
        print(f"[nla] plan: {len(av_data) + len(ar_data)} warm-start summaries, AR SFT {cfg.sft_ar_steps} + AV SFT "
              f"{cfg.sft_av_steps} steps of {cfg.sft_batch}, RL {cfg.rl_steps} steps x {cfg.rl_batch} acts x G={cfg.group} "
              f"= {samples:,} explanations (<= {samples * cfg.max_new:,} tokens), held-out FVE on {len(held)} every {cfg.eval_every}")
        write_json(out / "train_config.json", to_dict(cfg))

    # 1. warm-start data (rank 0 writes, the others read the cache)
    summaries = {}
    # both warm starts see what the AV can write within its RL cap, closing tag included
    av_max_len = cfg.max_new - 4
    fits = lambda text: len(target_ids(base.tokenizer, text)) <= av_max_len  # noqa: E731
    for turn in (0, 1):
        if (rank == 0) == (turn == 0):  # the other ranks find what a model said in the cache
            summarizer = warmstart_summarizer(cfg.summarizer, base, cfg.device)
            for name, data in (("sft_av", av_data), ("sft_ar", ar_data)):
                summaries[name] = warmstart.build(summarizer, data, out / "warmstart" / f"{name}.jsonl",
                                                  max_new=cfg.summary_max_new, fits=fits, tokenizer=base.tokenizer)
            del summarizer
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    if cfg.grad_checkpointing:
        lora.enable_checkpointing(base.model)

    # 2. SFT: the AR first (it does not need the AV), then the AV
    lora.attach(base.model, {"av": cfg.rank_av, "ref": cfg.rank_av, "ar": cfg.rank_ar})
    for p in lora.params(base.model, "ref"):
        p.requires_grad_(False)
    head = ARHead(base.d_model).to(base.device)
    sft_dir, sft_ar_dir = out / "sft", out / "sft_ar"
    metrics_path = out / "metrics.jsonl"
    if checkpoint.exists(sft_dir):
        spec, head, _ = checkpoint.load(sft_dir, base, ("av", "ar"))
    else:
        if checkpoint.exists(sft_ar_dir):
            spec, head, _ = checkpoint.load(sft_ar_dir, base, ("ar",))
        else:
            losses = sft.train_ar(base, spec, head, summaries["sft_ar"], ar_data.vectors.float(), cfg.sft_ar_steps,
                                  cfg.sft_batch, cfg.sft_lr, cfg.seed)
            if rank == 0:
                append_jsonl(metrics_path, [{"stage": "sft_ar", "step": i + 1, "loss": l} for i, l in enumerate(losses)])
                checkpoint.save(sft_ar_dir, base, spec, head, roles=("ar",), info={"stage": "sft_ar"})
        losses = sft.train_av(base, spec, summaries["sft_av"], av_data.vectors.float(), cfg.sft_av_steps,
                              cfg.sft_batch, cfg.sft_lr, cfg.seed, max_len=av_max_len)
        if rank == 0:
            append_jsonl(metrics_path, [{"stage": "sft_av", "step": i + 1, "loss": l} for i, l in enumerate(losses)])
            ev = _evaluate(base, spec, head, held, cfg, shuffled=True)
            print(f"[nla] warm start: held-out FVE {ev['heldout_fve']:.3f} (cos {ev['heldout_cos']:.3f}); "
                  f"control with shuffled vectors FVE {ev['shuffled_fve']:.3f}; explanations quote their token "
                  f"{ev['heldout_token_hits']:.0%} (control {ev['shuffled_token_hits']:.0%}); their content words are in "
                  f"the context {ev['heldout_content_hits']:.0%} (control {ev['shuffled_content_hits']:.0%})")
            append_jsonl(metrics_path, [{"stage": "eval", "step": 0, **{k: v for k, v in ev.items() if k != "examples"}}])
            write_json(out / "warmstart_eval.json", ev)
            checkpoint.save(sft_dir, base, spec, head, roles=("av", "ar"), info={"stage": "sft"})

    # 3. RL
    lora.copy_role(base.model, "av", "ref")
    opt_av = torch.optim.AdamW(lora.params(base.model, "av"), lr=cfg.av_lr, weight_decay=0.0)
    opt_ar = torch.optim.AdamW(lora.params(base.model, "ar") + list(head.parameters()), lr=cfg.ar_lr, weight_decay=0.0)
    gen = torch.Generator(device=base.device).manual_seed(cfg.seed * 1000 + rank)
    rl_dir, start = out / "rl", 0
    if checkpoint.exists(rl_dir):
        spec, head_loaded, meta = checkpoint.load(rl_dir, base, ("av", "ar", "ref"))
        head.weight.data.copy_(head_loaded.weight)
        state = torch.load(rl_dir / "state.pt", map_location=base.device, weights_only=False)
        opt_av.load_state_dict(state["opt_av"])
        opt_ar.load_state_dict(state["opt_ar"])
        gen.set_state(state["gen"][rank].cpu() if base.device.type == "cpu" else state["gen"][rank])
        start = int(meta["step"])
        if rank == 0:
            print(f"[nla] resuming RL at step {start}/{cfg.rl_steps}")
    if rank == 0:  # drop rows a killed run logged after its last checkpoint
        rows = [r for r in read_jsonl(metrics_path, repair=True) if r.get("stage") not in ("rl", "eval") or r["step"] <= start]
        write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
    order = torch.randperm(len(rl_data), generator=torch.Generator().manual_seed(cfg.seed + 3))
    bar = tqdm(range(start, cfg.rl_steps), initial=start, total=cfg.rl_steps, desc="RL", disable=rank > 0)
    last, micro = {}, cfg.micro_batch  # halved where a GPU runs out of memory (grpo.fitting), then kept
    for step in bar:
        rows = order[(torch.arange(cfg.rl_batch) + step * cfg.rl_batch) % len(rl_data)]
        mine = rows[dist.shard(cfg.rl_batch)]
        m = rl_step(base, spec, head, rl_data.vectors[mine].float(), opt_av, opt_ar, cfg.group, cfg.max_new,
                    cfg.temperature, cfg.kl_coef, cfg.clip_eps, generator=gen, micro=micro)
        micro = m["micro_batch"]
        row = {"stage": "rl", "step": step + 1, **m}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.rl_steps:
            if rank == 0:
                ev = _evaluate(base, spec, head, held, cfg)
                last = ev
                append_jsonl(metrics_path, [{"stage": "eval", "step": step + 1,
                                             **{k: v for k, v in ev.items() if k != "examples"}}])
        bar.set_postfix(reward=f"{m['reward_mean']:.3f}", fve=f"{m['train_fve']:.3f}", s=f"{m['step_time']:.1f}",
                        held=f"{last.get('heldout_fve', float('nan')):.3f}")
        if rank == 0:
            append_jsonl(metrics_path, [row])
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.rl_steps:
            gens = dist.gather_list([gen.get_state()])
            if rank == 0:
                checkpoint.save(rl_dir, base, spec, head, roles=("av", "ar", "ref"),
                                info={"stage": "rl", "step": step + 1},
                                state={"opt_av": opt_av.state_dict(), "opt_ar": opt_ar.state_dict(), "gen": gens})
    dist.finish()
    if rank != 0:
        return {}
    rows = read_jsonl(metrics_path)
    _plot(out, rows)
    evals = [r for r in rows if r.get("stage") == "eval"]
    summary = dict(warm_start_fve=evals[0]["heldout_fve"] if evals else None,
                   final_fve=evals[-1]["heldout_fve"] if evals else None, steps=cfg.rl_steps)
    write_json(out / "summary.json", summary)
    print(f"[nla] done: held-out FVE {summary['warm_start_fve']} after warm start -> {summary['final_fve']} after "
          f"{cfg.rl_steps} RL steps; checkpoint {rl_dir}, curve {out / 'training.png'}")
    if last.get("examples"):
        tok = base.tokenizer
        for i, text in enumerate(last["examples"][:3]):
            print(f"  [{tok.decode([int(held.token_id[i])])!r} in ...{held.prefixes[i][-60:]!r}]\n    -> {text[:300]}")
    return summary
