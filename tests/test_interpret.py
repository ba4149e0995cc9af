"""interpret: dashboards, labels, label verification, cross-run alignment, layer importance."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import http.server  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from cli_runner import run_cli

from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary  # noqa: E402
from sparsetrace.interpret.align import align, write_alignment  # noqa: E402
from sparsetrace.interpret.dashboards import DashboardState, compute_dashboards  # noqa: E402
from sparsetrace.interpret.importance import layer_importance, measure_layer_ablation  # noqa: E402
from sparsetrace.interpret.labels import BuiltinLabeler, LabelCache, dictionary_sha, label_features  # noqa: E402
from sparsetrace.interpret.llm_labelers import OpenAICompatibleLabeler, TransformersLabeler  # noqa: E402
from sparsetrace.interpret.verify_labels import (  # noqa: E402
    VERDICTS,
    VerifyConfig,
    summarize_verdicts,
    verify_labels,
)
from sparsetrace.interpret.writer import write_dashboards  # noqa: E402
from sparsetrace.model.adapter import LanguageModel  # noqa: E402
from sparsetrace.model.hookpoints import Hookpoint  # noqa: E402

N_FEAT = 96
LAYER = 1


@pytest.fixture(scope="module")
def lm():
    return LanguageModel.load("tiny-llama")


@pytest.fixture(scope="module")
def dictionary():
    d = SparseDictionary(
        DictionaryConfig(kind="transcoder", d_in=64, d_out=64, n_features=N_FEAT, layer=LAYER, model_id="tiny-llama"),
        seed=0,
    )
    with torch.no_grad():
        d.W_enc.mul_(4.0)
        d.b_enc.copy_(torch.linspace(-2.5, 0.0, N_FEAT))  # a range of densities, some features never fire
    return d.eval()


@pytest.fixture(scope="module")
def windows(lm):
    g = torch.Generator().manual_seed(0)
    w = torch.randint(0, min(lm.vocab_size, 2000), (48, 32), generator=g)
    bos = lm.tokenizer.bos_token_id
    if bos is not None:
        w[:, 0] = bos
    return w


@torch.no_grad()
def brute_force(lm, d, windows):
    hp = Hookpoint("mlp_in", LAYER)
    x = lm.run(windows, read=[hp]).acts[hp]
    a = d.features(x.reshape(-1, 64)).view(*windows.shape, -1)
    bos = lm.tokenizer.bos_token_id
    valid = windows != bos if bos is not None else torch.ones_like(windows, dtype=torch.bool)
    return a * valid.unsqueeze(-1), valid


@pytest.fixture(scope="module")
def dashboards(lm, dictionary, windows):
    return compute_dashboards(
        lm, dictionary, windows, features=list(range(0, N_FEAT, 2)), n_top=6, batch_windows=7, width=10, per_bin=3
    )


def test_dashboard_top_examples_are_max_activations(lm, dictionary, windows, dashboards):
    A, valid = brute_force(lm, dictionary, windows)
    n_tok = int(valid.sum())
    checked = 0
    for f, dash in dashboards.items():
        wmax = A[:, :, f].max(1).values
        expected = wmax[wmax > 0].sort(descending=True).values[:6]
        got = torch.tensor([e["max_act"] for e in dash["top_examples"]])
        assert len(got) == len(expected)
        if len(got):
            checked += 1
            assert torch.allclose(got, expected, rtol=2e-3, atol=1e-4)
            for e in dash["top_examples"]:
                # the stored excerpt is the real window / tokens / activations
                w, s = e["window"], e["start"]
                assert e["acts"][e["max_pos"]] == pytest.approx(float(wmax[w]), rel=2e-3, abs=1e-3)
                ref = A[w, s : s + len(e["acts"]), f]
                assert torch.allclose(torch.tensor(e["acts"]), ref, rtol=3e-3, atol=2e-3)
                assert e["tokens"] == lm.to_str_tokens(windows[w, s : s + len(e["tokens"])])
                assert e["max_token_id"] == int(windows[w, s + e["max_pos"]])
        fires = int((A[:, :, f] > 0).sum())
        assert dash["n_tokens"] == n_tok
        assert sum(dash["histogram"]["counts"]) + dash["histogram"]["n_zero"] == n_tok
        assert sum(dash["histogram"]["counts"]) == fires
        assert dash["density"] == pytest.approx(fires / n_tok)
        assert dash["max_act"] == pytest.approx(float(A[:, :, f].max()), rel=1e-3, abs=1e-5)
        assert len(dash["histogram"]["edges"]) == len(dash["histogram"]["counts"]) + 1 or not fires
        for group in dash["quantile_examples"]:
            lo, hi = group["range"]
            assert len(group["examples"]) <= 3
            for e in group["examples"]:
                assert lo - 1e-3 <= e["max_act"] <= hi + 1e-3
                assert e["max_act"] == pytest.approx(float(A[e["window"], :, f].max()), rel=2e-3, abs=1e-4)
        assert len(dash["neighbors"]) == 10 and all(j != f for j, _ in dash["neighbors"])
        assert len(dash["top_logits"]) == 10 and len(dash["bottom_logits"]) == 10 and len(dash["top_inputs"]) == 10
    assert checked >= 10


def test_dashboard_state_is_bounded():
    st = DashboardState(8, n_top=4, width=6, per_bin=2)
    size0 = st.nbytes()
    g = torch.Generator().manual_seed(1)
    for i in range(30):
        acts = torch.relu(torch.randn(5, 12, 8, generator=g))
        st.update(acts, torch.ones(5, 12, dtype=torch.bool), torch.arange(5 * i, 5 * i + 5))
    assert st.nbytes() == size0
    assert not any(isinstance(v, (list, dict)) for v in vars(st).values())
    assert st.n_tokens == 30 * 5 * 12
    assert int(st.hist.sum()) == int(st.n_fire.sum())
    assert int(st.res_count.view(8, -1).sum(1)[0]) == 150  # every window counted once per feature


def test_dashboard_features_subset_matches_full(lm, dictionary, windows, dashboards):
    again = compute_dashboards(lm, dictionary, windows, features=[4, 10], n_top=6, batch_windows=16, width=10, per_bin=3)
    for f in (4, 10):
        a = [e["max_act"] for e in again[f]["top_examples"]]
        b = [e["max_act"] for e in dashboards[f]["top_examples"]]
        assert a == pytest.approx(b, rel=1e-4)
        assert again[f]["density"] == dashboards[f]["density"]


def test_write_dashboards(tmp_path, dashboards):
    folder = write_dashboards(tmp_path, LAYER, dashboards)
    index = json.loads((folder / "index.json").read_text())
    assert [e["feature"] for e in index] == sorted(dashboards)
    f = sorted(dashboards)[1]
    dash = json.loads((folder / f"f{f}.json").read_text())
    for key in ("layer", "feature", "label", "verdict", "density", "max_act", "histogram", "top_examples",
                "quantile_examples", "top_logits", "bottom_logits", "top_inputs", "neighbors"):
        assert key in dash
    # merging: a second write of one feature keeps the others in the index
    write_dashboards(tmp_path, LAYER, {f: {**dashboards[f], "label": "x"}})
    index2 = json.loads((folder / "index.json").read_text())
    assert len(index2) == len(index) and [e for e in index2 if e["feature"] == f][0]["label"] == "x"


def _fake_dash(tokens_at_max, promoted=(" she", " her")):
    ex = []
    for i, t in enumerate(tokens_at_max):
        ex.append({"tokens": [" Once", " there", " was", t, " who"], "acts": [0, 0, 0.5, 3.0 - 0.1 * i, 0],
                   "max_act": 3.0 - 0.1 * i, "max_pos": 3, "max_token_id": 1000 + sum(map(ord, t.strip().lower())) % 50})
    return {"layer": 3, "feature": 7, "density": 0.01, "top_examples": ex,
            "top_logits": [[p, 1.0 - 0.1 * i] for i, p in enumerate(promoted)], "top_logit_ids": [11, 12],
            "bottom_logits": [[" the", -1.0]]}


def test_builtin_labels_are_deterministic():
    dash = _fake_dash([" Mary", " John", " Mary", " John", " Mary", " mary", " Lily"])
    a, b = BuiltinLabeler().label(dash), BuiltinLabeler().label(json.loads(json.dumps(dash)))
    assert a == b
    assert a.text == '" Mary" / " John" (names) after " there was" → promotes " she" / " her"'
    assert a.key_tokens == [" Mary", " John"] and len(a.key_token_ids) == 2
    assert a.promoted_ids == [11, 12] and a.category == "names"
    punct = BuiltinLabeler().label(_fake_dash([",", ",", ".", ","]))
    assert punct.category == "punctuation" and punct.key_tokens[0] == ","
    assert BuiltinLabeler().label({"feature": 1, "top_examples": []}).text.startswith("dead")


def test_labels_on_real_dashboards_and_cache(tmp_path, dictionary, dashboards):
    live = {f: d for f, d in dashboards.items() if d["top_examples"]}
    sha = dictionary_sha(dictionary)
    cache = LabelCache(tmp_path / "labels.json")
    labels = label_features(live, cache=cache, dict_sha=sha)
    assert all(lab.text and lab.key_token_ids for lab in labels.values())
    again = label_features(live, cache=LabelCache(tmp_path / "labels.json"), dict_sha=sha)
    assert {f: x.text for f, x in again.items()} == {f: x.text for f, x in labels.items()}


def test_label_verification_verdicts(lm, dictionary, dashboards, windows):
    live = {f: d for f, d in dashboards.items() if d["top_examples"]}
    feats = sorted(live)[:3]
    labels = label_features(live, features=feats)
    g = torch.Generator().manual_seed(5)
    heldout = torch.randint(0, min(lm.vocab_size, 2000), (24, 32), generator=g)
    cfg = VerifyConfig(n_contexts=10, context_len=8, n_random=64)
    res = verify_labels(lm, dictionary, live, labels, heldout, cfg=cfg, features=feats)
    for f in feats:
        r = res[f]
        assert r["verdict"] in VERDICTS
        assert live[f]["verdict"] == r["verdict"]
        assert "p_value" in r["activation_test"] and "percentile" in r["intervention_test"]
        if r["verdict"] == "verified":
            assert r["activation_test"]["passed"] and r["intervention_test"]["passed"]
    s = summarize_verdicts(res)
    assert s["n"] == 3 and s["verified"] + s["associative"] + s["failed"] == 3


class _FakeChat(http.server.BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        reply = {"choices": [{"message": {"role": "assistant", "content": 'Label: the names "Mary" and "John"\nextra'}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_compatible_labeler_with_fake_server(tmp_path, monkeypatch):
    _FakeChat.requests = []
    server = http.server.HTTPServer(("127.0.0.1", 0), _FakeChat)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("FAKE_KEY", "sekret")
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        labeler = OpenAICompatibleLabeler(url, "fake-model", "FAKE_KEY", timeout=5)
        dash = _fake_dash([" Mary", " John", " Mary"])
        cache = LabelCache(tmp_path / "c.json")
        labels = label_features({7: dash}, labeler, cache=cache, dict_sha="abc")
        lab = labels[7]
        assert lab.text == 'the names "Mary" and "John"'
        assert lab.key_tokens == [" Mary", " John"] and lab.labeler == labeler.id
        assert len(_FakeChat.requests) == 1
        req = _FakeChat.requests[0]
        assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sekret"
        assert req["body"]["model"] == "fake-model" and req["body"]["messages"][-1]["role"] == "user"
        label_features({7: dash}, labeler, cache=LabelCache(tmp_path / "c.json"), dict_sha="abc")
        assert len(_FakeChat.requests) == 1  # served from the cache
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_transformers_labeler_runs():
    lab = TransformersLabeler("tiny-llama", max_new_tokens=4).label(_fake_dash([" Mary", " John"]))
    assert lab.labeler == "transformers:tiny-llama" and lab.text


def test_align_recovers_permutation(dictionary):
    perm = torch.randperm(N_FEAT, generator=torch.Generator().manual_seed(3))
    d2 = {"W_enc": dictionary.W_enc.detach()[perm], "W_dec": dictionary.W_dec.detach()[perm]}
    dens = torch.cat([torch.zeros(6), torch.logspace(-5, -0.5, N_FEAT - 6)])
    res = align(dictionary, d2, densities1=dens, threshold=0.7)
    inv = torch.argsort(perm)
    for e in res["mapping"]:
        assert e["match"] == int(inv[e["feature"]])
        assert e["cosine"] == pytest.approx(1.0, abs=1e-4) and e["matched"]
    assert res["overall"]["fraction"] == 1.0
    assert sum(b["n"] for b in res["by_density"]) == N_FEAT
    assert sum(b["matched"] for b in res["by_density"]) == res["overall"]["matched"]
    assert res["by_density"][0]["label"] == "dead" and res["by_density"][0]["n"] == 6


def test_align_random_and_buckets(tmp_path, dictionary):
    other = SparseDictionary(dictionary.cfg, seed=123)
    dens = torch.rand(N_FEAT, generator=torch.Generator().manual_seed(0)) * 0.05
    res = align(dictionary, other, densities1=dens, threshold=0.7)
    assert res["overall"]["fraction"] < 0.2
    assert sum(b["n"] for b in res["by_density"]) == N_FEAT
    assert sorted(e["match"] for e in res["mapping"]) == list(range(N_FEAT))
    path = write_alignment(tmp_path, res, run1="a", run2="b")
    back = json.loads(path.read_text())
    assert path.name == "align.json" and back["meta"]["run1"] == "a" and len(back["mapping"]) == N_FEAT
    assert align(dictionary, other, densities1=dens)["mapping"] == res["mapping"]  # stable


def _toy_graph():
    nodes = [
        {"node_id": "E@0", "kind": "embedding", "layer": -1, "position": 0, "influence": 0.5},
        {"node_id": "L0/F3@0", "kind": "feature", "layer": 0, "position": 0, "feature": 3, "activation": 1.5, "influence": 0.4},
        {"node_id": "L1/F5@2", "kind": "feature", "layer": 1, "position": 2, "feature": 5, "activation": 2.0, "influence": 0.3},
        {"node_id": "L1/ERR@2", "kind": "error", "layer": 1, "position": 2, "influence": 0.1},
        {"node_id": "L3/F7@2", "kind": "feature", "layer": 3, "position": 2, "feature": 7, "activation": 0.5, "influence": 0.2},
        {"node_id": "LOGIT/11@2", "kind": "logit", "layer": 4, "position": 2, "influence": 1.0},
    ]
    links = [
        {"source": "E@0", "target": "L0/F3@0", "weight": 1.0},
        {"source": "L0/F3@0", "target": "L1/F5@2", "weight": 0.8},  # crosses positions: attention of layer 1
        {"source": "L1/F5@2", "target": "L3/F7@2", "weight": 0.5},
        {"source": "L3/F7@2", "target": "LOGIT/11@2", "weight": 0.4},
        {"source": "L1/ERR@2", "target": "LOGIT/11@2", "weight": 0.1},
    ]
    meta = {"n_layers": 4, "prompt": "The cat sat", "targets": [{"token": "x", "token_id": 11}, {"token": "y", "token_id": 12}]}
    return {"format": "sparsetrace-graph/1", "metadata": meta, "nodes": nodes, "links": links}


def test_layer_importance_shares_and_ranking():
    graph = _toy_graph()
    verify = {"task": "toy", "circuit": [n["node_id"] for n in graph["nodes"]]}
    imp = layer_importance(verify, graph)
    rows = imp["layers"]
    assert sum(r["mlp_share"] + r["error_share"] for r in rows) == pytest.approx(1.0)
    assert sum(r["attn_share"] for r in rows) == pytest.approx(1.0)
    assert rows[1]["attn_share"] == pytest.approx(1.0)
    assert imp["train_these_layers"][0] in (0, 1)
    assert sum(r["score"] for r in rows) == pytest.approx(1.0)
    imp2 = layer_importance(verify, graph, ablation={0: 0.5, 1: 0.0, 3: 1.5})
    assert imp2["layers"][3]["ablation_share"] == pytest.approx(0.75)


def test_measure_layer_ablation_runs(lm):
    d = SparseDictionary(DictionaryConfig(kind="transcoder", d_in=64, d_out=64, n_features=16, layer=1), seed=1)
    graph = _toy_graph()
    out = measure_layer_ablation(lm, {1: d.eval()}, graph, input_ids=lm.tokenize("The cat sat"))
    assert set(out) == {1} and isinstance(out[1], float)


def _single(lm, ids, space=True):
    """The first id of ``ids`` whose decoded text tokenizes back to exactly that id (leading space when
    ``space``), so a label quoting the text names that token."""
    for i in ids:
        s = lm.tokenizer.decode([int(i)])
        if (not space or (s.startswith(" ") and s.strip().isalpha())) and \
                lm.tokenizer(s, add_special_tokens=False)["input_ids"] == [int(i)]:
            return int(i), s
    raise AssertionError("no round-tripping token found")


def test_intervention_test_detects_a_real_output_effect(lm, windows):
    """(c) A feature at the last layer whose decoder row is a token's unembedding direction must pass the
    output test for a label whose TEXT says it promotes that token, and fail it for a label naming the
    wrong token (the verifier reads the text only)."""
    from sparsetrace.interpret.verify_labels import LabelVerifier

    last = lm.n_layers - 1
    d = SparseDictionary(DictionaryConfig(kind="transcoder", d_in=64, d_out=64, n_features=8, layer=last), seed=2)
    target, target_s = _single(lm, range(1234 % lm.vocab_size, lm.vocab_size))
    W_U = lm.arch.unembed.weight.detach()
    g = lm.arch.final_norm.weight.detach()
    with torch.no_grad():
        direction = W_U[target] / g
        d.W_dec[0] = direction / direction.norm()
    g2 = torch.Generator().manual_seed(7)
    heldout = torch.randint(0, min(lm.vocab_size, 2000), (16, 24), generator=g2)
    v = LabelVerifier(lm, d.eval(), heldout, VerifyConfig(n_contexts=8, context_len=6, n_random=128))
    _, key_s = _single(lm, heldout[0].tolist(), space=False)
    good = f"{json.dumps(key_s)} → promotes {json.dumps(target_s)}"
    res = v.verify(0, good, max_act=20.0)
    assert res["prediction"]["promoted_tokens"] == [target_s]
    assert res["intervention_test"]["passed"], res["intervention_test"]
    effect = (W_U @ (d.W_dec[0].detach() * g)).abs()
    other, other_s = _single(lm, effect.argsort().tolist())  # a token the direction barely moves
    res_bad = v.verify(0, f"{json.dumps(key_s)} → promotes {json.dumps(other_s)}", max_act=20.0)
    assert res_bad["prediction"]["promoted_tokens"] == [other_s]
    assert not res_bad["intervention_test"]["passed"]
    assert res_bad["verdict"] != "verified"
    # a label that says nothing about outputs cannot pass the output test
    assert not v.verify(0, json.dumps(key_s), max_act=20.0)["intervention_test"]["passed"]


def test_activation_contexts_come_from_the_label_words(lm, dictionary, dashboards):
    """(b) The activation test's contexts end in the words the label's text names, found in the held-out
    windows (not the feature's top examples): every natural context ends there, control contexts do not."""
    from sparsetrace.interpret.predictions import parse_label
    from sparsetrace.interpret.verify_labels import LabelVerifier

    g = torch.Generator().manual_seed(11)
    heldout = torch.randint(0, min(lm.vocab_size, 2000), (24, 32), generator=g)
    f = next(f for f, x in dashboards.items() if x["top_examples"])
    top_ids = {e["max_token_id"] for e in dashboards[f]["top_examples"]}
    # two words of the held-out text that are not where the feature fires most
    cands = [int(t) for t in heldout[:, 10:].flatten().tolist() if int(t) not in top_ids]
    w1, s1 = _single(lm, cands, space=False)
    w2, s2 = _single(lm, [c for c in cands if c != w1 and lm.tokenizer.decode([c]).strip() != s1.strip()], space=False)
    for i, w in enumerate((w1, w2) * 8):  # both words occur 8 times in the held-out text
        heldout[i, 12 + i % 5] = w
    cfg = VerifyConfig(n_contexts=12, context_len=8, n_random=64, min_natural=1)
    v = LabelVerifier(lm, dictionary, heldout, cfg)

    def spelled(word):  # the single tokens that spell a word as written or with a leading space
        out = set()
        for text in (word, " " + word.strip()):
            ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                out.add(int(ids[0]))
        return out

    res = v.verify(f, f"{json.dumps(s1)} / {json.dumps(s2)} → promotes \" the\"")
    act = res["activation_test"]
    assert res["prediction"]["words"] == [s1, s2]
    assert act["n_contexts"] == 12 and act["n_natural"] == 12
    for w, p, natural in act["contexts"]:
        assert natural == 1 and int(heldout[w, p]) in spelled(s1) | spelled(s2)
    assert {int(heldout[w, p]) for w, p, _ in act["contexts"]} >= {w1, w2}  # both words are tested
    # another label, other contexts: they follow the words
    res2 = v.verify(f, json.dumps(s1))
    assert all(int(heldout[w, p]) in spelled(s1) for w, p, _ in res2["activation_test"]["contexts"])
    ctx, last, where = v.contexts(v.key_sequences(parse_label(json.dumps(s1))), torch.Generator())
    ctrl = v.control_tokens(sorted({int(x) for x in last.tolist()}), last, torch.Generator())
    assert not set(ctrl.tolist()) & spelled(s1)
    for row, (w, p, _) in zip(ctx, where, strict=True):  # the context is the held-out text up to the word
        assert row[-cfg.context_len :].tolist() == heldout[w, p - cfg.context_len + 1 : p + 1].tolist()


def test_label_text_parsing():
    from sparsetrace.interpret.predictions import parse_label

    p = parse_label('" Mary" / " John" (names) after " there was" → promotes " she" / " her"')
    assert (p.words, p.context, p.category, p.promoted) == ([" Mary", " John"], " there was", "names", [" she", " her"])
    p = parse_label('"\\n" (line breaks) → promotes "The"')
    assert p.words == ["\n"] and p.promoted == ["The"] and p.category == "line breaks"
    p = parse_label("fires on punctuation, predicts \"and\"")
    assert p.words == [] and p.category == "punctuation" and p.promoted == ["and"] and p.source == "category"
    assert parse_label("dead feature (never fired)").source == "none"
    assert parse_label('the word "promotes" → promotes "x"').words == ["promotes"]


def test_steered_logits_and_labels(lm, dictionary, windows, dashboards):
    from sparsetrace.interpret.steered import add_steered_logits

    live = [f for f, d in dashboards.items() if d["top_examples"]][:2]
    sub = {f: json.loads(json.dumps(dashboards[f])) for f in live}
    add_steered_logits(lm, dictionary, sub, windows, n_contexts=3)
    for f in live:
        assert len(sub[f]["steered_logits"]) == 10 and len(sub[f]["steered_logit_ids"]) == 10
        lab = BuiltinLabeler(promoted_from="steered").label(sub[f])
        assert lab.promoted_source == "steered" and lab.promoted_ids == sub[f]["steered_logit_ids"][:2]
        assert BuiltinLabeler().label(sub[f]).promoted_source == "direct"


def test_align_quantile_buckets(dictionary):
    other = SparseDictionary(dictionary.cfg, seed=7)
    dens = torch.cat([torch.zeros(8), torch.rand(N_FEAT - 8, generator=torch.Generator().manual_seed(1)) * 0.1 + 1e-6])
    res = align(dictionary, other, densities1=dens, bucket_edges="quantiles", n_quantile_buckets=4)
    buckets = res["by_density"]
    assert [b["label"] for b in buckets][0] == "dead" and buckets[0]["n"] == 8
    assert len(buckets) == 5 and sum(b["n"] for b in buckets) == N_FEAT
    assert all(abs(b["n"] - (N_FEAT - 8) / 4) <= 1 for b in buckets[1:])


# ------------------------------------------------------------------------------------------ explain CLI
def _cli(capsys, *args):
    return run_cli(capsys, *args)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, lm):
    from sparsetrace.train.config import TrainConfig
    from sparsetrace.train.pipeline import run_training

    root = tmp_path_factory.mktemp("explain_run")
    base = ["Once upon a time there was a little fox who lived in the woods near a river.",
            "Mary and John went to the store. John gave a drink to Mary because she was thirsty.",
            "In 1732 the war began, and it lasted until the year 1748 when peace returned."]
    (root / "corpus.txt").write_text("\n\n".join(f"{t} Story number {i}. " * 3 for i in range(60) for t in base))
    cfg = TrainConfig(model="tiny-llama", layers=[1], kind="transcoder", corpus=str(root / "corpus.txt"), context=32,
                      n_tokens=3000, epochs=2.0, batch_size=128, expansion=4, target_l0=8.0, seed=0)
    run_training(cfg, root / "run", lm=lm, progress=False, cache_dir=root / "cache")
    return root / "run"


def test_explain_writes_labels_from_one_part_and_verifies_on_another(small_run, capsys, lm):
    """(a) The windows the verdicts are tested on are disjoint from the windows the labels were written
    from, and the JSON says which were used; dashboards carry the dictionary's sha256."""
    from safetensors.torch import load_file

    from sparsetrace.interpret.explain_job import corpus_windows
    from sparsetrace.util.hashing import sha256_file

    code, stdout, err = _cli(capsys, "explain", small_run, "--layer", "1", "--features", "random:4",
                             "--n-tokens", "2000", "--overwrite")
    assert code == 0, err
    folder = small_run / "features" / "L01"
    summary = json.loads((folder / "summary.json").read_text())
    split = summary["label_windows"]
    assert split["shared_windows"] == 0
    assert split["writing"]["n_windows"] >= 2 and split["verification"]["n_windows"] >= 1
    assert "held-out" in split["verification"]["source"]
    sha = sha256_file(small_run / "L01_transcoder" / "weights.safetensors")
    assert summary["dictionary_sha256"] == sha
    heldout = load_file(str(small_run / "heldout_tokens.safetensors"))["tokens"]
    # the writing windows, rebuilt as explain builds them: the corpus's windows outside the held-out ones
    writing = corpus_windows(lm, small_run, None, 2000, 32, heldout)
    assert len(writing) == split["writing"]["n_windows"]
    writing_rows = {tuple(r) for r in writing.tolist()}
    used = set()
    for e in json.loads((folder / "index.json").read_text()):
        dash = json.loads((folder / f"f{e['feature']}.json").read_text())
        assert dash["dictionary_sha256"] == sha
        assert dash["verification"]["windows"]["verification"] == split["verification"]["source"]
        assert all(0 <= ex["window"] < len(writing) for ex in dash["top_examples"])  # written from these
        for w, p, _natural in dash["verification"]["activation_test"].get("contexts", []):
            used.add(w)
            assert 16 <= p < heldout.shape[1]
    assert used, "no feature was tested on held-out contexts"
    assert not {tuple(heldout[w].tolist()) for w in used} & writing_rows


def test_explain_labeler_option(small_run, tmp_path, capsys, lm):
    """`--labeler local:PATH` runs a transformers model folder (a tiny model saved here: its labels are
    nonsense, the plumbing is what is checked); bad values give one error line before any work."""
    folder = tmp_path / "tiny-labeler"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    code, stdout, err = _cli(capsys, "explain", small_run, "--layer", "1", "--features", "random:2",
                             "--n-tokens", "2000", "--labeler", f"local:{folder}", "--overwrite")
    assert code == 0, err
    summary = json.loads((small_run / "features" / "L01" / "summary.json").read_text())
    assert summary["labeler"].startswith("transformers:") and summary["verdicts"]["n"] == 2
    labels = json.loads((small_run / "features" / "labels.json").read_text())
    assert any(k.endswith(summary["labeler"]) for k in labels)
    for bad, expect in [("gpt", "--labeler 'gpt' is unknown"), (f"local:{tmp_path / 'nope'}", "does not exist"),
                        (f"local:{tmp_path}", "no config.json"), ("openai:ftp://x", "not an http(s) URL"),
                        ("builtin:x", "--labeler 'builtin:x'")]:
        code, stdout, err = _cli(capsys, "explain", small_run, "--layer", "1", "--labeler", bad)
        lines = [x for x in err.strip().splitlines() if not x.startswith("[sparsetrace]")]
        assert code != 0 and len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err
