"""The real embedded model: collected vectors equal hidden_states[L+1] of a plain full forward."""
import json

import torch

from nla.collect import collect, load_activations
from nla.config import CollectConfig
from nla.models import load_base


def test_collect_on_smollm2_matches_full_forward(smol_path, tmp_path):
    corpus = tmp_path / "c.jsonl"
    docs = ["The committee met on Tuesday to discuss the budget, but the chairman arrived late and the "
            "meeting ran well past six o'clock, long after the caterers had gone home.",
            "def mean(xs):\n    # an empty list has no mean; say so instead of dividing by zero\n"
            "    if not xs:\n        raise ValueError('empty')\n    return sum(xs) / len(xs)\n",
            "Dear Ms. Okafor, thank you for the seeds you sent in March. The tomatoes came up in a week "
            "and the beans have already climbed halfway up the fence."]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = collect(CollectConfig(model="smollm2", layer=20, corpus=str(corpus), out=str(tmp_path / "a"),
                                 per_doc=3, min_pos=5, device="cpu", heldout_frac=0.0))
    assert meta["d_model"] == 576 and meta["n_layers"] == 30 and meta["model"] == "smollm2"
    acts = load_activations(tmp_path / "a")
    base = load_base("smollm2", device="cpu")
    tok = base.tokenizer
    for d, text in enumerate(docs):
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            hs = base.model(ids, output_hidden_states=True).hidden_states[21][0]
        rows = (acts.doc_id == d).nonzero().flatten()
        assert len(rows) == 3
        for r in rows:
            torch.testing.assert_close(acts.vectors[r], hs[int(acts.pos[r])], rtol=1e-4, atol=1e-3)
    # residual norms at layer 20 are ~240 on real text (environment.md)
    assert 150 < meta["mean_norm"] < 350 and meta["injection_scale"] >= meta["mean_norm"]
