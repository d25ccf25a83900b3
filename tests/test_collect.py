"""Collection: early exit equals the full forward, sampling and splits, storage, resume, errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from nla.collect import (SPLITS, assign_splits, collect, injection_scale_for, load_activations,
                         sample_positions)
from nla.config import CollectConfig
from nla.errors import NLAError
from nla.models import residual


def cfg(tiny_path, corpus, out, **kw):
    base = dict(model=tiny_path, layer=2, corpus=corpus, out=str(out), per_doc=3, min_pos=4,
                batch_size=3, shard_docs=4, device="cpu")
    base.update(kw)
    return CollectConfig(**base)


def test_early_exit_matches_hidden_states(tiny_base):
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        full = tiny_base.model(ids, output_hidden_states=True).hidden_states
        for layer in range(tiny_base.n_layers - 1):
            torch.testing.assert_close(residual(tiny_base.model, layer, ids), full[layer + 1])
    assert len(tiny_base.decoder.layers) == tiny_base.n_layers  # restored after early exit


def test_positions_and_splits_are_deterministic():
    ids = list(range(100, 140))
    a = sample_positions(ids, {105, 120}, 4, 5, seed=1, doc=7)
    assert a == sample_positions(ids, {105, 120}, 4, 5, seed=1, doc=7)
    assert len(a) == 5 and min(a) >= 4 and not {5, 20} & set(a)
    assert sample_positions(ids[:3], set(), 4, 5, 0, 0) == []
    s = assign_splits(100, 0, 0.1)
    counts = [int((s == i).sum()) for i in range(4)]
    assert counts == [22, 23, 45, 10] or sum(counts) == 100 and counts[3] == 10
    assert (assign_splits(100, 0, 0.1) == s).all()


def test_injection_scale_is_round_and_above_mean():
    assert injection_scale_for(241.0) == 250
    assert injection_scale_for(159.0) == 170
    assert injection_scale_for(8.3) == 9


def test_collect_writes_dataset_matching_full_forward(tiny_path, tiny_base, small_corpus, tmp_path):
    meta = collect(cfg(tiny_path, small_corpus, tmp_path / "acts"))
    acts = load_activations(tmp_path / "acts")
    assert meta["status"] == "complete" and len(acts) == meta["n_vectors"] > 0
    assert acts.vectors.dtype == torch.float32 and acts.vectors.shape[1] == 64
    assert meta["layer"] == 2 and "hidden_states[L+1]" in meta["convention"]
    assert sum(meta["split_sizes"].values()) == len(acts)
    # every document lands in exactly one split
    for d in acts.doc_id.unique():
        assert len(acts.split[acts.doc_id == d].unique()) == 1
    # vectors equal hidden_states[L+1] of a plain full forward at the recorded positions
    tok = tiny_base.tokenizer
    from nla.corpus import read_corpus
    docs = read_corpus(small_corpus)
    for i in range(0, len(acts), 5):
        ids = torch.tensor([tok(docs[int(acts.doc_id[i])])["input_ids"]])
        with torch.no_grad():
            hs = tiny_base.model(ids, output_hidden_states=True).hidden_states[3]
        torch.testing.assert_close(acts.vectors[i], hs[0, int(acts.pos[i])], rtol=1e-4, atol=1e-4)
        assert int(acts.token_id[i]) == int(ids[0, int(acts.pos[i])])
        assert acts.prefixes[i] == tok.decode(ids[0, : int(acts.pos[i]) + 1])
    # the FVE baseline is consistent with the stored mean vector
    from nla.collect import normalise
    u = normalise(acts.vectors)
    train = acts.split != SPLITS.index("heldout")
    mse = ((u[train] - acts.mean_vector) ** 2).mean()
    assert abs(float(mse) - acts.mse_mean()) < 1e-4
    assert 0 < acts.mse_mean() < 4
    assert acts.select("heldout").split.eq(3).all()


def test_resume_after_kill_equals_uninterrupted(tiny_path, small_corpus, tmp_path):
    """Kill a real collect process mid-run, rerun it, compare with a clean run file by file."""
    ref = tmp_path / "ref"
    collect(cfg(tiny_path, small_corpus, ref, shard_docs=2))
    out = tmp_path / "killed"
    code = (f"import sys, nla.collect as c, nla.io as io\n"
            f"from nla.config import CollectConfig\n"
            f"orig = io.save_tensors\n"
            f"n = [0]\n"
            f"def save(*a, **k):\n"
            f"    orig(*a, **k); n[0] += 1\n"
            f"    if n[0] == 3: import os; os._exit(9)  # a kill right after the third shard\n"
            f"c.save_tensors = save\n"
            f"c.collect(CollectConfig(model={tiny_path!r}, layer=2, corpus={small_corpus!r}, out={str(out)!r}, "
            f"per_doc=3, min_pos=4, batch_size=3, shard_docs=2, device='cpu'))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 9, r.stderr[-2000:]
    assert json.loads((out / "nla_acts.json").read_text())["status"] == "collecting"
    assert len(list(out.glob("shard-*.safetensors"))) == 3
    collect(cfg(tiny_path, small_corpus, out, shard_docs=2))
    names = sorted(p.name for p in ref.glob("shard-*"))
    assert names == sorted(p.name for p in out.glob("shard-*")) and len(names) == 6
    from nla.collect import _read_shard
    for n in names:  # same tensors bit for bit, same metadata (header byte order is a hash map's)
        x, y = _read_shard(ref / n), _read_shard(out / n)
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k]
    a, b = json.loads((ref / "nla_acts.json").read_text()), json.loads((out / "nla_acts.json").read_text())
    assert a == b


def test_refuses_other_layer_unless_overwrite(tiny_path, small_corpus, tmp_path):
    out = tmp_path / "acts"
    collect(cfg(tiny_path, small_corpus, out))
    with pytest.raises(NLAError, match="layer=2"):
        collect(cfg(tiny_path, small_corpus, out, layer=1))
    meta = collect(cfg(tiny_path, small_corpus, out, layer=1, overwrite=True))
    assert meta["layer"] == 1


def test_corrupt_shard_is_one_clear_error(tiny_path, small_corpus, tmp_path):
    out = tmp_path / "acts"
    collect(cfg(tiny_path, small_corpus, out))
    shard = sorted(out.glob("shard-*"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    meta = json.loads((out / "nla_acts.json").read_text())
    meta["status"] = "collecting"
    (out / "nla_acts.json").write_text(json.dumps(meta))
    with pytest.raises(NLAError, match="corrupt or truncated"):
        collect(cfg(tiny_path, small_corpus, out))
    with pytest.raises(NLAError, match="corrupt or truncated"):
        load_activations(out) if False else __import__("nla.collect").collect._read_shard(shard)


def test_bad_inputs_are_one_line(tiny_path, small_corpus, tmp_path):
    with pytest.raises(NLAError, match=r"valid layers are 0\.\.3"):
        collect(cfg(tiny_path, small_corpus, tmp_path / "a", layer=4))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(NLAError, match="empty"):
        collect(cfg(tiny_path, str(empty), tmp_path / "b"))
    with pytest.raises(NLAError, match="not found"):
        collect(cfg(tiny_path, str(tmp_path / "nope.txt"), tmp_path / "c"))
    with pytest.raises(NLAError, match="min-pos"):
        CollectConfig(min_pos=0)


def test_cli_prints_one_line_error(tiny_path, small_corpus, tmp_path):
    r = subprocess.run([sys.executable, "-m", "cli", "collect", "--model", tiny_path, "--layer", "9",
                        "--corpus", small_corpus, "--out", str(tmp_path / "x"), "--device", "cpu"],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: layer 9 is out of range")
    assert "Traceback" not in r.stderr


def test_evaluation_only_dataset(tiny_path, small_corpus, tmp_path):
    """--heldout-frac 1: every document held out (passages kept for a final check), the
    predict-the-mean baseline taken from the set itself."""
    from nla.collect import load_activations
    meta = collect(cfg(tiny_path, small_corpus, tmp_path / "acts", heldout_frac=1.0))
    acts = load_activations(str(tmp_path / "acts"))
    assert meta["split_sizes"]["heldout"] == len(acts) > 0
    assert meta["mse_mean"]["heldout"] == pytest.approx(meta["mse_mean"]["all"])
    with pytest.raises(NLAError, match="heldout-frac"):
        CollectConfig(heldout_frac=0.95)
