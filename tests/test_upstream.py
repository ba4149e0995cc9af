"""`sparsetrace upstream` and attribute.upstream.upstream_features: weight-only upstream features.

Checked against a brute-force enumeration of every (source feature, path) virtual weight built from
the public per-path functions of attribute.weights (themselves checked against explicit matrix
products in test_attribute.py), plus explicit products for the top entries and the de-embeddings.
No specific tokenisation is assumed: tokens are compared by id.
"""

import json
import sys

import pytest
import torch

from sparsetrace.attribute import weights as W
from sparsetrace.attribute.upstream import format_upstream, parse_feature, upstream_features
from sparsetrace.cli import main
from sparsetrace.dictionary.io import save_dictionary
from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary
from sparsetrace.errors import ConfigError

SPEC = ((0, "transcoder"), (1, "sae"), (1, "skip_transcoder"), (3, "transcoder"))


def random_dicts(d_model: int, spec=SPEC, n_features: int = 80, model_id: str = "") -> list[SparseDictionary]:
    out = []
    for layer, kind in spec:
        hp = {"sae": ("resid_pre",) * 2, "sae_post": ("resid_post",) * 2, "sae_attn": ("attn_out",) * 2}.get(
            kind, ("mlp_in", "mlp_out"))
        kind = "sae" if kind.startswith("sae") else kind
        cfg = DictionaryConfig(kind=kind, d_in=d_model, d_out=d_model, n_features=n_features, layer=layer,
                               hookpoint_in=hp[0], hookpoint_out=hp[1], model_id=model_id)
        out.append(SparseDictionary(cfg, seed=100 + 7 * layer + len(out)).eval())
    return out


def brute_force(lm, dicts, tgt, f, through_attention=True):
    """Every (|w|, w, source index, feature, attn layer, head) candidate over all valid paths."""
    parallel = bool(lm.arch.parallel_residual)
    cands = []
    for si, src in enumerate(dicts):
        if src is tgt:
            continue
        if W.path_exists(src, tgt, parallel):
            v = W.virtual_weights(src, tgt, f, lm=lm)
            cands += [(abs(float(x)), float(x), si, i, None, None) for i, x in enumerate(v)]
        if not through_attention:
            continue
        for a in range(lm.n_layers):
            if W.path_exists(src, tgt, parallel, a):
                ov = W.ov_virtual_weights(lm, a, src, tgt, f)
                cands += [(abs(float(ov[h, i])), float(ov[h, i]), si, i, a, h)
                          for h in range(ov.shape[0]) for i in range(ov.shape[1])]
    return sorted(cands, key=lambda c: -c[0])


def check_against_brute_force(lm, dicts, doc, tgt, f, top, through_attention=True):
    ref = brute_force(lm, dicts, tgt, f, through_attention)
    got = doc["upstream"]
    assert len(got) == min(top, len(ref))
    for e, r in zip(got, ref, strict=False):
        assert e["weight"] == pytest.approx(r[1], rel=1e-4, abs=1e-6)
    # the entries themselves are the reference's (up to ties at the cut-off)
    cut = abs(got[-1]["weight"]) if got else 0.0
    ref_keys = {(dicts[c[2]].cfg.layer, dicts[c[2]].cfg.kind, c[3], c[4], c[5]) for c in ref if c[0] >= cut * (1 - 1e-5)}
    for e in got:
        assert (e["layer"], e["kind"], e["feature"], e["attn_layer"], e["head"]) in ref_keys
        assert (e["path"] == "direct") == (e["attn_layer"] is None)


@torch.no_grad()
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-neox"])
def test_upstream_matches_brute_force(tiny_lms, name):
    lm = tiny_lms[name]
    dicts = random_dicts(lm.d_model)
    tgt, f = dicts[3], 11
    top = 400  # large enough that attention paths make the list on these tiny models
    doc = upstream_features(lm, dicts, 3, f, top=top, n_tokens=7)
    check_against_brute_force(lm, dicts, doc, tgt, f, top)
    assert {e["path"] for e in doc["upstream"]} == {"direct", "attention"}
    assert doc["target"] == {"layer": 3, "feature": f, "kind": "transcoder", "hookpoint": "mlp_in", "n_features": 80}
    assert {(s["layer"], s["kind"]) for s in doc["sources"]} == {(0, "transcoder"), (1, "sae"), (1, "skip_transcoder")}
    json.dumps(doc, allow_nan=False)  # JSON-able

    # explicit products for the top direct entry (the target transcoder reads after its MLP norm)
    gamma, centred = W.norm_linear(lm, 3, "mlp")
    e = next(e for e in doc["upstream"] if e["path"] == "direct")
    src = next(d for d in dicts if d.cfg.layer == e["layer"] and d.cfg.kind == e["kind"])
    x = src.W_dec[e["feature"]]
    x = x - x.mean() if centred else x
    assert e["weight"] == pytest.approx(float(tgt.W_enc[f] @ (gamma * x)), rel=1e-4, abs=1e-6)

    # de-embeddings: the top tokens of W_E[v] . N^T W_enc[f], by id
    u = gamma * tgt.W_enc[f]
    u = u - u.mean() if centred else u
    scores = lm.arch.embed.weight.float() @ u
    vals, ids = scores.topk(7)
    assert [t["token_id"] for t in doc["tokens"]] == ids.tolist()
    assert [t["weight"] for t in doc["tokens"]] == pytest.approx(vals.tolist(), rel=1e-4, abs=1e-6)

    direct = upstream_features(lm, dicts, 3, f, top=25, through_attention=False)
    check_against_brute_force(lm, dicts, direct, tgt, f, 25, through_attention=False)
    assert {e["path"] for e in direct["upstream"]} == {"direct"}


@torch.no_grad()
def test_upstream_targets_and_sources(tiny_llama):
    lm = tiny_llama
    dicts = random_dicts(lm.d_model, spec=((0, "transcoder"), (1, "sae_attn"), (2, "sae_post")))
    # a residual SAE target at resid_post.2 sees the transcoder directly and through attention 1 and 2
    doc = upstream_features(lm, dicts, dicts[2], 4, top=1000)
    placed = [d for d in dicts if d.cfg.hookpoint_in != "attn_out"]
    check_against_brute_force(lm, placed, doc, dicts[2], 4, 1000)
    assert {e["attn_layer"] for e in doc["upstream"]} == {None, 1, 2}  # attention 0 reads before the MLP writes
    assert doc["skipped_sources"] == ["sae at attn_out.1"]  # not placed on the residual stream: left out, said so
    assert "skipped sae at attn_out.1" in format_upstream(doc)
    # nothing writes before layer 0's transcoder reads: no upstream features, de-embeddings still there
    first = upstream_features(lm, dicts, 0, 4, top=5, n_tokens=3)
    assert first["upstream"] == [] and len(first["tokens"]) == 3
    assert "no upstream features" in format_upstream(first)
    for layer, feature, match in ((5, 1, "layer 5 has no dictionary"), (0, 80, "out of range"),
                                  (0, -1, "out of range"), (1, 0, "attn_out")):
        with pytest.raises(ConfigError, match=match):
            upstream_features(lm, dicts, layer, feature)
    two = random_dicts(lm.d_model, spec=((1, "transcoder"), (1, "sae")))
    with pytest.raises(ConfigError, match="2 dictionaries"):
        upstream_features(lm, two, 1, 0)
    with pytest.raises(ConfigError, match="top"):
        upstream_features(lm, dicts, 0, 1, top=0)


def test_parse_feature():
    assert parse_feature("6:123") == (6, 123)
    assert parse_feature(" L6/F123 ") == (6, 123)
    for bad in ("6", "6:", ":3", "a:b", "6:1:2", "-1:3", "6:-3", "6.0:1", ""):
        with pytest.raises(ConfigError, match="LAYER:INDEX"):
            parse_feature(bad)


# ------------------------------------------------------------------------------------------ CLI
@pytest.fixture()
def run_dir(tmp_path, tiny_llama):
    run = tmp_path / "run"
    for d in random_dicts(tiny_llama.d_model, model_id=tiny_llama.model_id):
        save_dictionary(d, run / f"L{d.cfg.layer:02d}_{d.cfg.kind}")
    return run


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["sparsetrace", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_upstream(run_dir, tiny_llama, monkeypatch, capsys):
    from sparsetrace.intervene.circuit_job import load_dictionaries

    code, out, err = cli(monkeypatch, capsys, "upstream", run_dir, "--feature", "3:11", "--top", "40", "--json")
    assert code == 0, err
    doc = json.loads(out)
    dest = run_dir / "upstream" / "L03_F11.json"
    assert json.loads(dest.read_text(encoding="utf-8")) == doc
    assert str(dest) in err
    dicts = load_dictionaries([run_dir], tiny_llama)
    tgt = next(d for d in dicts if d.cfg.layer == 3)
    check_against_brute_force(tiny_llama, dicts, doc, tgt, 11, 40)
    assert doc["model"] == tiny_llama.model_id and doc["through_attention"] is True

    # the table: one row per upstream feature, with layer, index, weight and path
    before = dest.read_bytes()
    code, out, err = cli(monkeypatch, capsys, "upstream", run_dir, "--feature", "3:11", "--top", "40")
    assert code == 2 and err.startswith("error: ") and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert dest.read_bytes() == before  # never silently overwritten
    code, out, err = cli(monkeypatch, capsys, "upstream", run_dir, "--feature", "3:11", "--top", "40", "--overwrite")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 40
    for row, e in zip(rows, doc["upstream"], strict=True):
        assert (int(row[1]), int(row[2]), row[3]) == (e["layer"], e["feature"], e["kind"])
        assert float(row[4]) == pytest.approx(e["weight"], abs=1e-4)
        assert (row[5] == "residual") == (e["path"] == "direct")
        if e["path"] == "attention":
            assert row[5:8] == ["attn", f"L{e['attn_layer']}", f"H{e['head']}"]
    assert "de-embedding" in out

    code, out, err = cli(monkeypatch, capsys, "upstream", run_dir, "--feature", "L3/F11", "--top", "40", "--json",
                         "--overwrite", "--no-through-attention")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["through_attention"] is False and {e["path"] for e in doc["upstream"]} == {"direct"}
    check_against_brute_force(tiny_llama, dicts, doc, tgt, 11, 40, through_attention=False)


@pytest.mark.parametrize("args, expect", [
    (("--feature", "3:9999"), "9999"),
    (("--feature", "2:1"), "layer 2"),
    (("--feature", "three:1"), "three:1"),
    (("--feature", "3:1", "--top", "0"), "--top 0"),
    (("--feature", "3:1", "--model", "no-such-model-xyz"), "no-such-model-xyz"),
])
def test_cli_upstream_bad_input(run_dir, monkeypatch, capsys, args, expect):
    code, out, err = cli(monkeypatch, capsys, "upstream", run_dir, *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and expect in lines[-1] and "Traceback" not in err
    assert all(line.startswith("[sparsetrace]") for line in lines[:-1])  # progress lines only
    assert not (run_dir / "upstream").exists() or not any((run_dir / "upstream").iterdir())


def test_cli_upstream_missing_run(tmp_path, monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "upstream", tmp_path / "nope", "--feature", "1:1")
    assert code == 2 and err.startswith("error: ") and "nope" in err and len(err.strip().splitlines()) == 1
