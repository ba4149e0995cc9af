"""evaluate/replacement.py: a full replacement with every replaced MLP substituted at once.

Hand-checkable cases: a replacement that returns each layer's true MLP output gives KL 0, top-1 agreement 1
and CE recovered 1; one that outputs zeros is the zero-ablation reference (CE recovered 0). The by-depth
fast path (resume from the substituted pass's residual) equals substituting the first k layers from
scratch, for per-layer transcoders, a CLT and a partial set; and running a model from a cached residual
(model/suffix.py) reproduces the full forward pass on every tiny architecture."""

from __future__ import annotations

import pytest
import torch

from sparsetrace.dictionary.clt import CLTConfig, CrossLayerTranscoder
from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary
from sparsetrace.dictionary.replacement_set import CLTReplacement, MLPReplacement, PLTSet
from sparsetrace.evaluate.replacement import evaluate_replacement, format_replacement
from sparsetrace.model.hookpoints import Hookpoint
from sparsetrace.model.suffix import start_at


class TrueMLP(MLPReplacement):
    """Features = the MLP input itself; decode = the true MLP (a perfect replacement)."""

    kind = "plt"

    def __init__(self, lm, layers, scale: float = 1.0):
        self.lm, self._layers, self.scale = lm, list(layers), scale
        self.n_features = {layer: lm.d_model for layer in layers}

    @property
    def layers(self):
        return self._layers

    def encode(self, layer, mlp_in):
        return mlp_in

    def decode(self, layer, features, mlp_in=None):
        mlp = self.lm.arch.mlp(layer)
        return type(mlp).forward(mlp, features[layer]) * self.scale

    def targets(self, layer):
        return [layer]


class FirstK(MLPReplacement):
    """Another replacement restricted to its first k layers (the slow path: substitute them from scratch)."""

    def __init__(self, rep, k):
        self.rep, self.kind, self.n_features = rep, rep.kind, rep.n_features
        self._layers = sorted(rep.layers)[:k]

    @property
    def layers(self):
        return self._layers

    def encode(self, layer, mlp_in):
        return self.rep.encode(layer, mlp_in)

    def decode(self, layer, features, mlp_in=None):
        return self.rep.decode(layer, features, mlp_in)


@pytest.fixture(scope="module")
def loud_llama(tiny_llama):
    """tiny-llama with its MLP outputs scaled up, so that ablating them moves CE clearly."""
    import copy

    from sparsetrace.model.adapter import LanguageModel

    model = copy.deepcopy(tiny_llama.model)
    lm = LanguageModel(model, tiny_llama.tokenizer, tiny_llama.model_id)
    with torch.no_grad():
        for layer in range(lm.n_layers):
            lm.arch.mlp(layer).down_proj.weight.mul_(40.0)
    return lm


def _windows(lm, n=6, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, min(lm.vocab_size, 250), (n, t), generator=g)


def _plt(lm, layers, seed=1):
    ds = []
    for layer in layers:
        cfg = DictionaryConfig(kind="transcoder", d_in=lm.d_model, d_out=lm.d_model, n_features=2 * lm.d_model,
                               layer=layer, model_id=lm.model_id)
        d = SparseDictionary(cfg, seed=seed + layer)
        with torch.no_grad():
            d.b_enc.fill_(0.05)
            d.W_dec.mul_(0.3)
        ds.append(d)
    return PLTSet(ds)


def _clt(lm, seed=2):
    clt = CrossLayerTranscoder(CLTConfig(n_layers=lm.n_layers, d_model=lm.d_model, n_features=2 * lm.d_model,
                                         activation="relu", model_id=lm.model_id), seed=seed)
    with torch.no_grad():
        clt.b_enc.fill_(0.02)
        for w in clt.W_dec:
            w.mul_(0.5)
    return CLTReplacement(clt)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-neox", "tiny-gptneo"])
def test_start_at_reproduces_the_full_pass(tiny_lms, name):
    lm = tiny_lms[name]
    ids = _windows(lm, 3, 10)
    out = lm.run(ids, read=[Hookpoint("resid_pre", layer) for layer in range(lm.n_layers)])
    for layer in range(lm.n_layers):
        with start_at(lm, layer, out.acts[Hookpoint("resid_pre", layer)]), torch.no_grad():
            logits = lm.model(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-5)
    # the layers below the start really are skipped: a garbage residual changes the output
    with start_at(lm, 2, torch.zeros_like(out.acts[Hookpoint("resid_pre", 2)])), torch.no_grad():
        assert not torch.allclose(lm.model(input_ids=ids, use_cache=False).logits, out.logits)


def test_exact_replacement(loud_llama):
    lm = loud_llama
    res = evaluate_replacement(lm, TrueMLP(lm, range(lm.n_layers)), _windows(lm), progress=False)
    assert res["kl"] == pytest.approx(0.0, abs=1e-5)
    assert res["top1_agreement"] == 1.0
    assert res["ce"] == pytest.approx(res["clean_ce"], abs=1e-5)
    assert res["ce_zero_ablation"] > res["clean_ce"] + 0.01  # the reference differs, so recovered is defined
    assert res["ce_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert res["ce_recovered_vs_mean"] == pytest.approx(1.0, abs=1e-3)
    assert res["mean_ablation_reference"] == "evaluation windows"
    assert all(v < 1e-8 for v in res["nmse_by_layer"].values())
    assert [r["k"] for r in res["by_depth"]] == [1, 2, 3, 4]
    assert all(r["kl"] == pytest.approx(0.0, abs=1e-5) and r["top1_agreement"] == 1.0 for r in res["by_depth"])
    assert "every replaced MLP" in format_replacement(res)


def test_zero_replacement_is_zero_ablation(loud_llama):
    lm = loud_llama
    means = {layer: torch.zeros(lm.d_model) for layer in range(lm.n_layers)}
    res = evaluate_replacement(lm, TrueMLP(lm, range(lm.n_layers), scale=0.0), _windows(lm), means=means,
                               progress=False)
    assert res["ce"] == pytest.approx(res["ce_zero_ablation"], abs=1e-5)
    assert res["ce_recovered"] == pytest.approx(0.0, abs=1e-4)
    # zero means: mean-ablation is zero-ablation too, and the training means were used
    assert res["ce_mean_ablation"] == pytest.approx(res["ce_zero_ablation"], abs=1e-6)
    assert res["mean_ablation_reference"] == "training"
    assert all(v == pytest.approx(1.0) for v in res["nmse_local_by_layer"].values())
    assert res["by_depth"][-1]["ce"] == pytest.approx(res["ce_zero_ablation"], abs=1e-5)


def test_half_scaled_replacement_has_local_nmse_quarter(loud_llama):
    lm = loud_llama
    res = evaluate_replacement(lm, TrueMLP(lm, range(lm.n_layers), scale=0.5), _windows(lm), progress=False)
    assert all(v == pytest.approx(0.25, rel=1e-4) for v in res["nmse_local_by_layer"].values())
    assert res["ce"] != res["clean_ce"]
    assert res["kl"] > 0 and res["kl_ci"][0] <= res["kl"] <= res["kl_ci"][1]


@pytest.mark.parametrize("which", ["plt", "clt", "partial"])
def test_by_depth_fast_path_equals_substituting_from_scratch(tiny_llama, which):
    lm = tiny_llama
    rep = {"plt": lambda: _plt(lm, range(lm.n_layers)), "clt": lambda: _clt(lm),
           "partial": lambda: _plt(lm, [1, 2])}[which]()
    windows = _windows(lm, 5, 14, seed=3)
    fast = evaluate_replacement(lm, rep, windows, batch_windows=2, progress=False)
    assert fast["kl"] > 1e-4  # a real (imperfect) replacement
    n = len(rep.layers)
    assert [r["last_layer"] for r in fast["by_depth"]] == sorted(rep.layers)
    for k in range(1, n + 1):
        slow = evaluate_replacement(lm, FirstK(rep, k), windows, batch_windows=3, by_depth=False, progress=False)
        r = fast["by_depth"][k - 1]
        assert r["ce"] == pytest.approx(slow["ce"], abs=1e-4), k
        assert r["kl"] == pytest.approx(slow["kl"], abs=1e-4), k
        assert r["top1_agreement"] == pytest.approx(slow["top1_agreement"], abs=1e-9), k
    assert fast["by_depth"][-1]["ce"] == fast["ce"] and fast["by_depth"][-1]["kl"] == fast["kl"]


# ------------------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def all_layer_run(tmp_path_factory, tiny_llama):
    from sparsetrace.train.config import TrainConfig
    from sparsetrace.train.pipeline import run_training

    base = ["Once upon a time there was a little fox who lived in the woods near a river.",
            "Mary and John went to the store. John gave a drink to Mary because she was thirsty."]
    root = tmp_path_factory.mktemp("allrun")
    corpus = root / "text.txt"
    corpus.write_text("\n\n".join(f"{t} Story number {i}. " * 3 for i in range(60) for t in base))
    out = root / "run"
    cfg = TrainConfig(model="tiny-llama", layers=list(range(tiny_llama.n_layers)), kind="transcoder",
                      corpus=str(corpus), context=32, n_tokens=1500, epochs=1.0, batch_size=128, expansion=2,
                      target_l0=8.0)
    run_training(cfg, out, lm=tiny_llama, progress=False, cache_dir=root / "cache")
    return out, corpus


def test_cli_json_has_a_replacement_line(all_layer_run, capsys):
    import json

    from cli_runner import run_cli

    run, corpus = all_layer_run
    code, out, err = run_cli(capsys, "evaluate", run, "--n-windows", "4", "--json")
    assert code == 0, err
    lines = [json.loads(x) for x in out.splitlines() if x.strip()]
    reps = [x["replacement"] for x in lines if "replacement" in x]
    assert len(reps) == 1
    r = reps[0]
    for key in ("ce_recovered", "ce_recovered_vs_mean", "kl", "top1_agreement", "nmse_by_layer", "by_depth"):
        assert key in r
    assert r["layers"] == [0, 1, 2, 3] and [d["k"] for d in r["by_depth"]] == [1, 2, 3, 4]
    assert r["mean_ablation_reference"] == "training"  # the run saved its training means
    rows = [x for x in lines if "layer" in x and "replacement" not in x]
    assert len(rows) == 4 and all("fvu" in x and "ce_spliced" not in x for x in rows)  # per-layer CE skipped
    saved = json.loads((run / "eval.json").read_text())
    assert saved["replacement"]["kl"] == r["kl"] and len(saved["substitution"]) == 4
    # the table, on other text, with the per-layer splices asked for
    code, out, err = run_cli(capsys, "evaluate", run, "--n-windows", "3", "--corpus", corpus, "--per-layer-ce")
    assert code == 0, err
    assert "full replacement (plt, layers 0-3" in out and "first k replaced layers substituted" in out
    assert "rec(zero)" in out and " - " not in out.split("full replacement")[0].split("\n", 2)[2]
    assert json.loads((run / "eval_text.json").read_text())["replacement"]["n_windows"] == 3


def test_partial_set_only_on_request(all_layer_run, tiny_llama):
    import shutil

    from sparsetrace.evaluate.job import evaluate_run

    run, _ = all_layer_run
    part = run.parent / "part"
    part.mkdir()
    for name in ("L01_transcoder", "L02_transcoder"):
        shutil.copytree(run / name, part / name)
    shutil.copy(run / "heldout_tokens.safetensors", part)
    res = evaluate_run(part, lm=tiny_llama, n_windows=3, progress=False, write=False)
    assert "replacement" not in res and "ce_spliced" in res["dictionaries"][0]
    res = evaluate_run(part, lm=tiny_llama, n_windows=3, progress=False, write=False, replacement=True)
    assert res["replacement"]["layers"] == [1, 2] and len(res["replacement"]["by_depth"]) == 2
    assert "ce_spliced" in res["dictionaries"][0]  # a partial set keeps its per-layer splices


def test_report_draws_the_depth_plot(tmp_path, loud_llama):
    import json
    import re

    from sparsetrace.report.html import build_report

    lm = loud_llama
    res = evaluate_replacement(lm, TrueMLP(lm, range(lm.n_layers), scale=0.6), _windows(lm), progress=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps({"model": lm.model_id, "clean_ce": res["clean_ce"], "dictionaries": [],
                                               "substitution": [], "replacement": res}))
    out = tmp_path / "report"
    build_report([run], out, upstream=False)
    text = (out / "data" / "report-data.js").read_text()
    data = json.loads(text[len("window.SPARSETRACE_DATA="):].rstrip().rstrip(";"))
    r = data["runs"][0]["replacement"]
    assert r["ce_recovered"] == pytest.approx(res["ce_recovered"]) and len(r["by_depth"]) == lm.n_layers
    svg = r["svg"]
    assert svg.startswith("<svg") and svg.count("<polyline") == 2  # CE and KL against k
    kl_points = re.search(r'class="dp-line dp-kl"[^>]*points="([^"]+)"', svg).group(1).split()
    assert len(kl_points) == lm.n_layers
    ys = [float(p.split(",")[1]) for p in kl_points]
    kls = [d["kl"] for d in res["by_depth"]]
    # larger KL is drawn higher (smaller y), in the same order as the figures
    assert sorted(range(len(ys)), key=lambda i: -ys[i]) == sorted(range(len(kls)), key=lambda i: kls[i])
    assert "replacement" in (out / "assets" / "report.js").read_text()
    # a run without a replacement section gets none
    (run / "eval.json").write_text(json.dumps({"model": lm.model_id, "clean_ce": 1.0, "dictionaries": []}))
    build_report([run], tmp_path / "report2", upstream=False)
    text = (tmp_path / "report2" / "data" / "report-data.js").read_text()
    assert json.loads(text[len("window.SPARSETRACE_DATA="):].rstrip().rstrip(";"))["runs"][0]["replacement"] is None


def test_a_clt_run_is_evaluated_as_a_replacement(all_layer_run, tiny_llama, tmp_path):
    from sparsetrace.dictionary.clt import save_clt
    from sparsetrace.evaluate.job import evaluate_run

    _, corpus = all_layer_run
    run = tmp_path / "cltrun"
    run.mkdir()
    save_clt(_clt(tiny_llama).clt, run / "clt")
    res = evaluate_run(run, lm=tiny_llama, corpus=str(corpus), n_windows=3, progress=False, write=False)
    r = res["replacement"]
    assert r["kind"] == "clt" and r["layers"] == [0, 1, 2, 3] and len(r["by_depth"]) == 4
    assert r["mean_ablation_reference"] == "evaluation windows" and res["dictionaries"] == []
    assert any("mean-ablation uses evaluation windows" in n for n in res["notes"])


@pytest.mark.browser
def test_report_section_renders_in_chromium(tmp_path, loud_llama):
    import importlib.util
    import json
    import os

    from sparsetrace.report.html import build_report

    chromium = os.environ.get("SPARSETRACE_CHROMIUM", "/usr/bin/chromium")
    if not os.path.exists(chromium) or importlib.util.find_spec("playwright") is None:
        pytest.skip(f"{chromium} or playwright missing (bash scripts/install_browser.sh)")
    from playwright.sync_api import sync_playwright

    lm = loud_llama
    res = evaluate_replacement(lm, TrueMLP(lm, range(lm.n_layers), scale=0.6), _windows(lm), progress=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps({"model": lm.model_id, "clean_ce": res["clean_ce"], "dictionaries": [],
                                               "substitution": [], "replacement": res}))
    index = build_report([run], tmp_path / "report", upstream=False)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"],
                               timeout=30_000)
        page = b.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(index.as_uri() + "#/r/0")
        page.wait_for_selector("#replacement svg.depth-plot", timeout=30_000)
        assert page.locator("#replacement polyline").count() == 2
        assert page.locator("#replacement circle.dp-dot").count() == 2 * lm.n_layers
        assert "top-1 agreement" in page.locator("#replacement").inner_text()
        b.close()
    assert errors == []


@pytest.mark.parametrize("rows", [1, 7, 10_000])
def test_scores_in_row_chunks_equal_the_whole_block(monkeypatch, rows):
    """CE, KL(clean || z) and top-1 agreement computed a few positions at a time equal the same figures
    computed on the whole [batch, seq, vocab] block, from their definitions."""
    from sparsetrace.evaluate import replacement

    monkeypatch.setattr(replacement._Clean, "ROWS", rows)
    g = torch.Generator().manual_seed(0)
    b, t, v = 3, 9, 50
    clean = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 3
    ids = torch.randint(0, v, (b, t), generator=g)
    z = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 3
    z[0, :4] = clean[0, :4]  # some positions agree on the top token
    ref = replacement._Clean(clean, ids)
    ce, kl, agree = ref.scores(z)
    lp, lq = clean.float().log_softmax(-1), z.float().log_softmax(-1)
    want_ce = -lq[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).mean(-1)
    want_kl = (lp.exp() * (lp - lq)).sum(-1).mean(-1)
    want_agree = (z[:, :-1].argmax(-1) == clean[:, :-1].argmax(-1)).sum(-1).double()
    torch.testing.assert_close(ce, want_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, want_kl, rtol=1e-4, atol=1e-5)
    assert torch.equal(agree, want_agree) and agree[0] >= 4
