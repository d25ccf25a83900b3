"""Peak GPU memory of full NLA RL steps on a Qwen2.5-7B-shaped model with a 4-bit base.

No download: the model is built from a config with random weights, in bf16 on the GPU, and its
decoder projections are quantised to nf4 (double quantisation) one by one, as
`--load-in-4bit` does for real weights. Then: adapters for every role, 8 activations x G=8
explanations forced to the 150-token cap (a random model never closes its tag: the worst case),
the AR step and the GRPO step, with gradient checkpointing and micro-batches. Target: peak
<= 20 GB, so a 24 GB card fits. The reference trains this size on 16 x 80 GB GPUs.

    python bench/memory.py [--tokenizer DIR] [--acts 8] [--group 8] [--max-new 150] [--micro 16]
(--tokenizer: any HF tokenizer dir; default the embedded SmolLM2's cache, see README.)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script or -m

import argparse
import sys

import torch


def quantise_(model, compute_dtype=torch.bfloat16):
    import bitsandbytes as bnb
    from nla.lora import TARGETS
    for mod in list(model.modules()):
        for name, lin in list(mod.named_children()):
            if name in TARGETS and isinstance(lin, torch.nn.Linear):
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                if lin.bias is not None:
                    q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
                setattr(mod, name, q.to(lin.weight.device))
                del lin
    torch.cuda.empty_cache()


def main():
    if not torch.cuda.is_available():
        sys.exit("bench/memory.py needs a CUDA GPU (it measures GPU memory)")
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from bench.common import Timer, nla_on
    from nla import lora
    from nla.grpo import update
    from nla.models import Base, resolve
    from nla.verbalizer import generate
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--acts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=150)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--layer", type=int, default=20)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(a.tokenizer or resolve("smollm2")[0])
    cfg = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                      rope_theta=1e6, tie_word_embeddings=False)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    quantise_(model)
    model.requires_grad_(False)
    model.eval()
    base = Base(model, tok, "random Qwen2.5-7B-shaped", cfg.num_hidden_layers, cfg.hidden_size, quant="nf4")
    weights_gb = torch.cuda.memory_allocated() / 1e9
    spec, head, opt_av, opt_ar = nla_on(base, a.layer, rank=a.rank, scale=150.0)
    lora.enable_checkpointing(model)
    torch.cuda.reset_peak_memory_stats()
    vecs = torch.randn(a.acts, cfg.hidden_size, device="cuda").repeat_interleave(a.group, 0)
    for step in range(a.steps):
        g = torch.Generator(device="cuda").manual_seed(step)
        with Timer(base.device) as t:
            samples = generate(base, spec, vecs, a.max_new, 1.0, generator=g)
            m = update(base, spec, head, vecs, samples, opt_av, opt_ar, a.group, 0.01, 0.2, micro=a.micro)
        n_tok = sum(len(s.ids) for s in samples)
        print(f"step {step}: {t.s:.1f}s, {n_tok} explanation tokens (mean {n_tok / len(samples):.0f}), "
              f"fail {m['fail_frac']:.2f}, peak {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")
    peak = torch.cuda.max_memory_allocated() / 1e9
    print(f"4-bit base weights {weights_gb:.2f} GB; adapters rank {a.rank} x 3 roles; "
          f"{a.acts} acts x G={a.group} x <= {a.max_new} tokens, micro-batch {a.micro}")
    print(f"peak GPU memory of an RL step: {peak:.2f} GB (target <= 20 GB: {'OK' if peak <= 20 else 'OVER'}); "
          f"reserved {torch.cuda.max_memory_reserved() / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
