"""Run configuration as dataclasses: validated on construction, and also the CLI's options.

Each field's metadata carries its help text; cli.py turns every field into a `--flag` so the
dataclass is the single place an option is defined. Presets are plain dicts of overrides.
"""
from __future__ import annotations

from dataclasses import InitVar, dataclass, field, fields, asdict

from .errors import NLAError


def opt(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise NLAError(msg)


@dataclass
class CollectConfig:
    model: str = opt("smollm2", "model: HF id or dir, a .gguf file, or 'smollm2' (embedded default)")
    layer: int = opt(20, "layer L = residual stream after decoder block L (0-indexed) = HF hidden_states[L+1]")
    corpus: str = opt("embedded", "corpus: .txt (blank-line separated), .jsonl (text field), a dir, hf:NAME[:split], or 'embedded'")
    out: str = opt("runs/smollm2-L20/acts", "output directory for shards + nla_acts.json")
    per_doc: int = opt(4, "positions sampled per document")
    min_pos: int = opt(16, "sample positions >= this (position 0 is an attention sink; early positions decode poorly)")
    max_docs: int = opt(0, "use at most this many documents (0 = all)")
    max_tokens: int = opt(512, "truncate documents to this many tokens")
    batch_size: int = opt(8, "documents per forward pass")
    shard_docs: int = opt(64, "documents per shard (the unit of resume)")
    heldout_frac: float = opt(0.1, "fraction of documents held out for evaluation (1 = an evaluation-only dataset)")
    dtype: str = opt("float32", "storage dtype of vectors: float32 or bfloat16")
    device: str = opt("auto", "auto, cpu, cuda, cuda:1, ...")
    load_in_4bit: bool = opt(False, "load the base in 4-bit nf4 (bitsandbytes)")
    seed: int = opt(0, "seed for position sampling and the document split")
    overwrite: bool = opt(False, "replace a dataset of another model/layer/corpus in --out")

    def __post_init__(self):
        _check(self.layer >= 0, f"--layer must be >= 0, got {self.layer}")
        _check(self.per_doc >= 1, "--per-doc must be >= 1")
        _check(self.min_pos >= 1, "--min-pos must be >= 1 (position 0 is the attention sink)")
        _check(self.max_docs >= 0, "--max-docs must be >= 0")
        _check(self.max_tokens > self.min_pos, "--max-tokens must exceed --min-pos")
        _check(self.batch_size >= 1, "--batch-size must be >= 1")
        _check(self.shard_docs >= 1, "--shard-docs must be >= 1")
        _check(0.0 <= self.heldout_frac < 0.9 or self.heldout_frac == 1.0,
               "--heldout-frac must be in [0, 0.9), or 1 for an evaluation-only dataset")
        _check(self.dtype in ("float32", "bfloat16"), "--dtype must be float32 or bfloat16")


def to_dict(cfg) -> dict:
    return asdict(cfg)


def field_help(cls) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}


PRESETS = {
    # the embedded model and corpus end to end on 2 CPU cores in under 15 minutes: summaries cost
    # nothing now (drawn from the text), so every warm-start vector is used, and the time goes to
    # SFT, which is what makes the first explanations a user sees readable; RL barely starts
    "cpu-smoke": dict(n_warm=0, summary_max_new=32, sft_ar_steps=120, sft_av_steps=80, sft_batch=8, rank_av=16,
                      rank_ar=16, rl_steps=4, rl_batch=4, group=4, max_new=48, eval_every=2, eval_n=16,
                      eval_max_new=48, save_every=2),
    # the shipped NLA for the embedded model: ~3k warm-start vectors per split, ~80 minutes on 2 idle CPU cores
    "cpu-demo": dict(n_warm=0, summary_max_new=32, sft_ar_steps=400, sft_av_steps=400, sft_batch=8, rank_av=32,
                     rank_ar=32, rl_steps=100, rl_batch=4, group=4, max_new=48, eval_every=5, eval_n=32,
                     eval_max_new=48, save_every=5),
    # the reference's settings scaled to one GPU with LoRA adapters. micro_batch 0: each update's
    # phase in as few chunks as fit (all 256 rows, halved at an out-of-memory error, then kept:
    # grpo.fitting), since every chunk reads every weight and dispatches its ops again (a 7B
    # update at micro 64 dispatches 2.8x fewer than at micro 16, bench/ops.py)
    "gpu": dict(n_warm=0, sft_ar_steps=400, sft_av_steps=400, sft_batch=32, rank_av=64, rank_ar=64,
                rl_steps=300, rl_batch=32, group=8, max_new=150, eval_every=25, eval_n=128, eval_max_new=150,
                summary_max_new=128, save_every=25, micro_batch=0, grad_checkpointing=True),
}


@dataclass
class TrainConfig:
    acts: str = opt("runs/smollm2-L20/acts", "activation dataset from `nla-cli collect`")
    out: str = opt("runs/smollm2-L20", "run directory: warmstart/, checkpoints sft/ and rl/, metrics.jsonl, plot")
    preset: str = opt("", "cpu-smoke, cpu-demo or gpu: sets every option not given explicitly")
    model: str = opt("", "base model (default: the one recorded in the activation dataset)")
    summarizer: str = opt("text", "warm-start summaries: 'text' (topics drawn from the text itself, no model), 'self' "
                                  "(the base model's topic line, used only where it checks out against the text), a "
                                  "model dir or HF id (likewise), or an OpenAI-compatible endpoint "
                                  "http(s)://HOST[:PORT]/v1?model=NAME (whole summaries, checked; key from $OPENAI_API_KEY)")
    n_warm: int = opt(0, "use at most this many vectors per warm-start split (0 = all)")
    summary_max_new: int = opt(96, "token cap for each warm-start summary")
    rank_av: int = opt(16, "LoRA rank of the AV adapter")
    rank_ar: int = opt(16, "LoRA rank of the AR adapter")
    sft_ar_steps: int = opt(100, "AR warm-start steps")
    sft_av_steps: int = opt(100, "AV warm-start steps")
    sft_batch: int = opt(16, "warm-start batch size")
    sft_lr: float = opt(3e-4, "warm-start learning rate (adapters and AR head)")
    rl_steps: int = opt(100, "GRPO iterations")
    rl_batch: int = opt(8, "activations per RL step (global, across ranks)")
    group: int = opt(4, "explanations sampled per activation (G)")
    max_new: int = opt(64, "length cap of an explanation in tokens (cut = reward -2)")
    temperature: float = opt(1.0, "sampling temperature in RL")
    av_lr: float = opt(3e-5, "AV learning rate in RL")
    ar_lr: float = opt(1e-4, "AR learning rate in RL")
    kl_coef: float = opt(0.01, "KL penalty toward the warm-start AV")
    clip_eps: float = opt(0.2, "PPO ratio clip")
    micro_batch: int = opt(0, "rows per forward/backward, gradients accumulated (0 = whole batch at once); halved "
                                 "while a GPU runs out of memory")
    grad_checkpointing: bool = opt(False, "recompute blocks in backward to save activation memory (GPU runs)")
    eval_every: int = opt(20, "held-out FVE every N RL steps")
    eval_n: int = opt(64, "held-out activations used for FVE")
    eval_max_new: int = opt(64, "length cap of held-out explanations (greedy)")
    save_every: int = opt(10, "RL checkpoint every N steps")
    injection_mode: str = opt("replace", "replace (embedding at the placeholder) or add (at block 1)")
    injection_scale: float = opt(0.0, "norm of the injected vector (0 = the dataset's suggestion)")
    device: str = opt("auto", "auto, cpu, cuda, ...")
    load_in_4bit: bool = opt(False, "4-bit nf4 frozen base (bitsandbytes); adapters and head stay fp32")
    seed: int = opt(0, "seed")
    # Names of the options given explicitly (the CLI passes those typed on the command line,
    # `TrainConfig.make` the keywords it got): they beat the preset even at their default value.
    # Without it, an option still at its default is taken as not given.
    given: InitVar[tuple] = None

    @classmethod
    def make(cls, **kw) -> "TrainConfig":
        """Every keyword given here beats the preset, whatever its value."""
        return cls(**kw, given=tuple(kw))

    def __post_init__(self, given):
        if self.preset:
            _check(self.preset in PRESETS, f"--preset must be one of {', '.join(PRESETS)}")
            defaults = TrainConfig.__dataclass_fields__
            for k, v in PRESETS[self.preset].items():
                explicit = k in given if given is not None else getattr(self, k) != defaults[k].default
                if not explicit:
                    setattr(self, k, v)
        _check(self.group >= 2, "--group must be >= 2 (GRPO standardises within a group)")
        _check(self.rl_batch >= 1 and self.sft_batch >= 1, "batch sizes must be >= 1")
        _check(self.max_new >= 4, "--max-new must be >= 4")
        _check(self.injection_mode in ("replace", "add"), "--injection-mode must be replace or add")
        _check(min(self.rank_av, self.rank_ar) >= 1, "LoRA ranks must be >= 1")
        _check(self.temperature > 0, "--temperature must be > 0 in RL")
        _check(self.eval_every >= 1 and self.save_every >= 1, "--eval-every and --save-every must be >= 1")
