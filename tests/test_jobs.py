"""The circuit and interpretation jobs behind `trace`, `verify`, `steer`, `explain`, `align` and the CLI
commands themselves (in-process, through ``sparsetrace.cli.main``), on a small tiny-llama run."""

import json

import pytest
import torch
from cli_runner import run_cli

from sparsetrace.interpret.verify_labels import VERDICTS
from sparsetrace.intervene.circuit_job import TraceConfig, load_dictionaries, trace_circuit, verify_trace
from sparsetrace.train.config import TrainConfig
from sparsetrace.train.pipeline import run_training

PROMPT = "When Mary and John went to the store, John gave a drink to"


def _train(tmp_path_factory, texts, tiny_llama, seed):
    root = tmp_path_factory.mktemp(f"run{seed}")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(texts))
    cfg = TrainConfig(model="tiny-llama", layers=[1, 2], kind="transcoder", corpus=str(corpus), context=32,
                      n_tokens=3000, epochs=3.0, batch_size=128, expansion=4, target_l0=8.0, seed=seed)
    run_training(cfg, root / "run", lm=tiny_llama, progress=False, cache_dir=root / "cache")
    return root / "run"


@pytest.fixture(scope="module")
def module_texts():
    base = [
        "Once upon a time there was a little fox who lived in the woods near a river.",
        "Mary and John went to the store. John gave a drink to Mary because she was thirsty.",
        "In 1732 the war began, and it lasted until the year 1748 when peace returned.",
    ]
    return [f"{t} Story number {i}. " * 3 for i in range(60) for t in base]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, module_texts, tiny_llama):
    return _train(tmp_path_factory, module_texts, tiny_llama, seed=0)


def cli(capsys, *args):
    """Run ``sparsetrace ARGS`` in this process; returns (exit code, stdout, stderr)."""
    return run_cli(capsys, *args)


# ------------------------------------------------------------------------------------------ trace / verify
@pytest.fixture(scope="module")
def traced(run_dir, tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("trace") / "custom"
    dicts = load_dictionaries(run_dir, tiny_llama)
    cfg = TraceConfig(task=None, prompt=PROMPT, target=" Mary", max_features=5, n_edge_checks=40, n_spearman=8)
    doc = trace_circuit(tiny_llama, dicts, cfg, out)
    return out, doc, dicts


def test_trace_writes_graph_and_circuit(traced, tiny_llama):
    traced_lm = [tiny_llama]
    out, doc, _ = traced
    from sparsetrace.attribute import Graph

    g = Graph.load(out / "graph.json")
    assert json.loads((out / "circuit.json").read_text())["circuit"] == doc["circuit"]
    assert doc["exactness"] <= 1e-3
    assert 0 < len(doc["circuit"]) <= 5
    scores = list(doc["scores"].values())
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    # every circuit node is a feature that fires on the prompt at its position, on a trained layer
    from sparsetrace.intervene.features import parse_node_id
    from sparsetrace.model.hookpoints import Hookpoint

    lm = traced_lm[0]
    ids = lm.tokenize(PROMPT)
    for node_id in doc["circuit"]:
        node = parse_node_id(node_id)
        assert node.layer in (1, 2) and node.position is not None and node.position < 0
        d = next(x for x in traced[2] if x.cfg.layer == node.layer)
        hp = Hookpoint("mlp_in", node.layer)
        with torch.no_grad():
            acts = d.features(lm.run(ids, read=[hp]).acts[hp][0])
        assert float(acts[ids.shape[1] + node.position, node.feature]) > 0, node_id
    assert any(n.kind == "feature" for n in g.nodes)
    # edges are the exact linear effect of their source in the frozen replacement model
    assert doc["edge_check"]["n"] > 0
    assert doc["edge_check"]["frozen"]["max_rel_err"] < 1e-2


def test_trace_records_paths_that_exist_in_the_graph(traced):
    """circuit.json's paths (path search on the graph) run along real graph edges into a logit node."""
    out, doc, _ = traced
    from sparsetrace.attribute import Graph

    g = Graph.load(out / "graph.json")
    assert doc["paths"], "trace wrote no paths"
    src, dst, w = g.edges.numpy()
    edge = {(int(a), int(b)): float(x) for a, b, x in zip(src, dst, w, strict=True)}
    for p in doc["paths"]:
        idx = [g.index[n] for n in p["nodes"]]
        assert g.nodes[idx[-1]].kind == "logit"
        assert p["weights"] == [pytest.approx(edge[(a, b)]) for a, b in zip(idx, idx[1:], strict=False)]
    scores = [p["score"] for p in doc["paths"]]
    assert scores == sorted(scores, reverse=True)


def test_verify_whole_dictionary_is_fully_faithful(traced, tiny_llama):
    """A circuit of *every* feature: keeping it is the model (f = 1), ablating it is m(empty) (completeness 0)."""
    out, doc, dicts = traced
    full = out.parent / "everything"
    full.mkdir()
    every = [f"{d.cfg.layer}:{i}" for d in dicts for i in range(d.n_features)]
    (full / "circuit.json").write_text(json.dumps({**doc, "circuit": every, "scores": {}}))
    res = verify_trace(tiny_llama, dicts, full)
    assert res["faithfulness"] == pytest.approx(1.0, abs=1e-4)
    assert res["ablation_completeness"] == pytest.approx(0.0, abs=1e-4)
    assert res["m_circuit"] == pytest.approx(res["m_full"], abs=1e-4)


def test_verify_trace(traced, tiny_llama):
    out, doc, dicts = traced
    res = verify_trace(tiny_llama, dicts, out)
    saved = json.loads((out / "verify.json").read_text())
    assert saved["circuit"] == doc["circuit"] and saved["task"] == "custom"
    # m_full is the real model's metric: logit(" Mary") after the prompt
    ids = tiny_llama.tokenize(PROMPT)
    logit = float(tiny_llama.run(ids).logits[0, -1, tiny_llama.single_token_id(" Mary")])
    assert res["m_full"] == pytest.approx(logit, abs=1e-4)
    assert res["curve"][0]["faithfulness"] == 0.0
    assert res["curve"][-1]["faithfulness"] == pytest.approx(res["faithfulness"], abs=1e-9)
    assert len(res["single_feature_effects"]) == min(8, len(doc["scores"]))
    assert res["specificity"]["task"] == "facts"
    for e in res["edge_checks"]:
        assert e["source"].startswith("L") and e["target"].startswith("L")


def test_edge_checks_cover_sae_nodes(tiny_llama, tmp_path):
    """A transcoder (layer 1) composed with a residual SAE (resid_pre of layer 2) in one graph: the SAE's
    graph nodes are named by hookpoint, and their edges are still checked causally."""
    from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary

    # random dictionaries with real decoders (the tiny model's own MLPs write almost nothing)
    tc = SparseDictionary(DictionaryConfig(kind="transcoder", d_in=64, d_out=64, n_features=96, layer=1,
                                           model_id=tiny_llama.model_id), seed=2).eval()
    cfg = DictionaryConfig(kind="sae", d_in=64, d_out=64, n_features=96, layer=2, hookpoint_in="resid_pre",
                           hookpoint_out="resid_pre", model_id=tiny_llama.model_id)
    sae = SparseDictionary(cfg, seed=3).eval()
    with torch.no_grad():
        sae.b_enc.zero_()
        tc.b_enc.fill_(-0.08)
    dicts = [tc, sae]
    tcfg = TraceConfig(task=None, prompt=PROMPT, target=" Mary", max_features=4, n_edge_checks=20, n_spearman=2)
    trace_circuit(tiny_llama, dicts, tcfg, tmp_path / "t")
    res = verify_trace(tiny_llama, dicts, tmp_path / "t")
    assert res["edge_checks"], "no feature -> feature edge was checked"
    assert any(e["source"].startswith("L1/") and e["target"].startswith("L2/") for e in res["edge_checks"])
    assert all(e["measured"] is not None for e in res["edge_checks"])


def test_cli_trace_task_and_verify_json(run_dir, tmp_path, capsys):
    out = tmp_path / "ioi"
    code, stdout, err = cli(capsys, "trace", "-d", run_dir, "--task", "ioi", "--n-prompts", "4", "--graph-prompts",
                            "2", "--max-features", "6", "--out", out)
    assert code == 0, err
    assert "circuit (" in stdout and (out / "graph.json").exists()
    # --select effect (default) ranks by the ablation estimate: only the first prompt needs a graph
    assert len(json.loads((out / "circuit.json").read_text())["graph_prompts"]) == 1
    code, stdout, err = cli(capsys, "verify", out, "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["task"] == "ioi" and res["n_prompts"] == 4 and len(res["circuit"]) <= 6
    assert {"faithfulness", "ablation_completeness", "specificity", "curve", "spearman"} <= set(res)


def test_relative_positions_use_one_template(run_dir, tiny_llama, tmp_path):
    """positions="relative": prompts from one template (same length), nodes at positions from the end."""
    from sparsetrace.intervene.circuit_job import task_for
    from sparsetrace.intervene.features import parse_node_id

    cfg = TraceConfig(task="ioi", n_prompts=6, n_graph_prompts=2, max_features=4, n_edge_checks=0, n_spearman=3,
                      template=2, positions="relative")
    batch = task_for(cfg).prompts(tiny_llama, n=6)
    assert len(set(batch.last_pos.tolist())) == 1
    assert all(p.startswith("After ") for p in batch.prompts)  # template 2
    dicts = load_dictionaries(run_dir, tiny_llama)
    doc = trace_circuit(tiny_llama, dicts, cfg, tmp_path / "t")
    nodes = [parse_node_id(n) for n in doc["circuit"]]
    assert nodes and all(n.position is not None and -batch.seq_len <= n.position < 0 for n in nodes)
    res = verify_trace(tiny_llama, dicts, tmp_path / "t")
    assert res["circuit"] == doc["circuit"] and res["n_prompts"] == 6
    any_cfg = TraceConfig(task="ioi", positions="any")
    assert len(set(task_for(any_cfg).prompts(tiny_llama, n=10).last_pos.tolist())) > 1
    # a task whose prompts differ in length falls back to features at every position
    facts = TraceConfig(task="facts", n_prompts=4, n_graph_prompts=1, max_features=3, n_edge_checks=0, n_spearman=2,
                        unrelated_task="sva", positions="relative")
    assert len(set(task_for(facts).prompts(tiny_llama, n=4).last_pos.tolist())) > 1
    doc = trace_circuit(tiny_llama, dicts, facts, tmp_path / "f")
    assert doc["config"]["positions"] == "any" and all(parse_node_id(n).position is None for n in doc["circuit"])
    assert verify_trace(tiny_llama, dicts, tmp_path / "f")["circuit"] == doc["circuit"]


@pytest.mark.parametrize("mode,positions", [("zero", "relative"), ("patch", "relative"), ("patch", "role")])
def test_effect_scores_are_first_order_ablation_effects(run_dir, tiny_llama, mode, positions):
    """score(node) = -(a_ablated - a) . dm/da: moving the feature (where it is active) a small step eps
    towards its ablated value in the real model (errors kept) changes the metric by -eps * score."""
    import copy

    from sparsetrace.intervene.circuit_job import effect_scores, task_for
    from sparsetrace.intervene.core import LayerIntervention, feature_acts, run_with_interventions
    from sparsetrace.intervene.features import FeatureSet
    from sparsetrace.model.adapter import LanguageModel

    # float64, so that a small step is far above rounding
    lm = LanguageModel(copy.deepcopy(tiny_llama.model).double(), tiny_llama.tokenizer, tiny_llama.model_id)
    cfg = TraceConfig(task="ioi", n_prompts=6, positions=positions)
    task = task_for(cfg)
    batch = task.prompts(lm, n=6)
    dicts = [d.double() for d in load_dictionaries(run_dir, lm)]
    scores = effect_scores(lm, dicts, batch, task, mode, positions)
    top = list(scores)[:3]
    assert top and scores[top[0]] > 0
    dmap = {d.cfg.layer: d for d in dicts}
    clean = feature_acts(lm, dmap, batch.clean)
    target = feature_acts(lm, dmap, batch.corrupted) if mode == "patch" else {k: 0 * v for k, v in clean.items()}
    rows = torch.arange(len(batch))

    def metric(logits):  # the IOI logit difference, in float64 (task.metric works in float32)
        last = logits[rows, batch.last_pos]
        return float((last[rows, batch.answer_ids] - last[rows, batch.wrong_ids]).mean())

    assert metric(lm.run(batch.clean).logits) == pytest.approx(task.metric(lm.run(batch.clean).logits, batch), abs=1e-4)
    base = metric(lm.run(batch.clean).logits)
    eps = 1e-2
    for node_id in top:
        node = FeatureSet.parse([node_id]).nodes[0]
        a, t = clean[node.layer], target[node.layer]
        b, n, f = a.shape
        mask = FeatureSet([node]).mask(node.layer, b, n, f, last_pos=batch.last_pos, roles=batch.roles)
        # the score sums over the prompts where the feature is active there: move only those
        iv = {node.layer: LayerIntervention(mask=mask & (a > 0), values=a + eps * (t - a))}
        m = metric(run_with_interventions(lm, dmap, batch.clean, iv).logits)
        assert (base - m) / eps == pytest.approx(scores[node_id], rel=0.02), node_id


def test_trace_selects_on_selection_prompts_and_verify_holds_out(run_dir, tiny_llama, tmp_path, capsys):
    """Role-keyed circuit chosen on selection prompts; verify measures it on held-out prompts (other names,
    other templates, another seed) and, with --in-sample, also on the selection ones, labelled."""
    from sparsetrace.intervene.features import parse_node_id

    out = tmp_path / "ioi"
    code, stdout, err = cli(capsys, "trace", "-d", run_dir, "--task", "ioi", "--n-prompts", "6", "--max-features", "5",
                            "--out", out, "--verify")
    assert code == 0, err
    assert "in-sample" not in stdout  # held-out figures only unless asked
    doc = json.loads((out / "circuit.json").read_text())
    assert doc["config"]["positions"] == "role"
    assert doc["circuit"] and all(parse_node_id(n).position in {"S1", "IO", "S2", "END"} for n in doc["circuit"])
    assert doc["selection"]["split"] == "selection" and doc["selection"]["seed"] == 0
    res = json.loads((out / "verify.json").read_text())
    assert res["split"]["name"] == "heldout" and res["split"]["seed"] == 1 and "in_sample" not in res
    selection = {p for p in doc["selection"]["prompts"]}
    assert selection.isdisjoint(res["split"]["example_prompts"])
    code, stdout, err = cli(capsys, "verify", out, "--in-sample")
    assert code == 0, err
    res2 = json.loads((out / "verify.json").read_text())
    assert res2["in_sample"]["split"]["name"] == "selection" and res2["in_sample"]["split"]["seed"] == 0
    assert res2["faithfulness"] == pytest.approx(res["faithfulness"], abs=1e-6)  # held-out stays the headline
    assert res2["in_sample"]["split"]["example_prompts"][0] == doc["selection"]["prompts"][0]
    assert "faithfulness f(C)" in stdout and "(in-sample " in stdout


def test_cli_trace_default_out_is_inside_the_run(run_dir, capsys):
    code, stdout, err = cli(capsys, "trace", "-d", run_dir, "--prompt", "The cat sat on the", "--target", " mat",
                            "--max-features", "3")
    assert code == 0, err
    assert (run_dir / "circuits" / "custom" / "circuit.json").exists()


def test_cli_steer(run_dir, tiny_llama, capsys):
    code, stdout, err = cli(capsys, "steer", "-d", run_dir, "--feature", "2:3", "--scale", "200", "--prompt",
                            "Once upon a time", "--max-new-tokens", "6")
    assert code == 0, err
    lines = dict(line.split(":", 1) for line in stdout.strip().splitlines())
    ids = tiny_llama.tokenize("Once upon a time")
    greedy = tiny_llama.model.generate(ids, max_new_tokens=6, do_sample=False,
                                       pad_token_id=tiny_llama.tokenizer.eos_token_id)
    plain = tiny_llama.tokenizer.decode(greedy[0, ids.shape[1]:].tolist())
    assert lines["baseline"].strip() == repr(plain)  # unsteered = the model's own greedy continuation
    assert lines["steered"].split("   (")[0].strip() != repr(plain)


@pytest.mark.parametrize("args, expect", [
    (["trace", "--task", "ioi"], "--dictionaries is required"),
    (["trace", "-d", "RUN", "--task", "nope"], "unknown task 'nope'"),
    (["trace", "-d", "RUN", "--prompt", "The cat"], "--prompt needs --target"),
    (["trace", "-d", "RUN", "--prompt", "The cat", "--target", " on the"], "' on the'"),
    (["trace", "-d", "RUN", "--mode", "bogus"], "--mode 'bogus'"),
    (["trace", "-d", "RUN", "--template", "99"], "--template 99 is out of range"),
    (["trace", "-d", "RUN", "--positions", "some"], "--positions 'some'"),
    (["verify", "RUN"], "no circuit.json"),
    (["steer", "-d", "RUN", "--feature", "9:1", "--prompt", "Hi"], "layer 9"),
    (["steer", "-d", "RUN", "--feature", "x", "--prompt", "Hi"], "cannot parse node id 'x'"),
    (["explain", "RUN", "--layer", "3"], "no dictionary for layer 3"),
    (["explain", "RUN", "--layer", "1", "--features", "5:2"], "--features '5:2'"),
])
def test_cli_bad_inputs(run_dir, capsys, args, expect):
    code, stdout, err = cli(capsys, *[str(run_dir) if a == "RUN" else a for a in args])
    assert code == 2, (stdout, err)
    lines = [x for x in err.strip().splitlines() if not x.startswith("[sparsetrace]")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expect in lines[0], err


# ------------------------------------------------------------------------------------------ explain / align
def test_explain_random_live_features(run_dir, capsys):
    code, stdout, err = cli(capsys, "explain", run_dir, "--layer", "1", "--features", "random:6", "--n-tokens", "2000")
    assert code == 0, err
    folder = run_dir / "features" / "L01"
    index = json.loads((folder / "index.json").read_text())
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["n_live"] == 6 and len(index) == 6
    for e in index:
        dash = json.loads((folder / f"f{e['feature']}.json").read_text())
        assert dash["top_examples"] and dash["label"] and dash["verdict"] in VERDICTS
    v = summary["verdicts"]
    assert v["verified"] + v["associative"] + v["failed"] == 6
    assert "causal verdicts on 6 labels" in stdout


def test_explain_run_without_heldout_file(run_dir, tmp_path, capsys):
    """A run folder that lost heldout_tokens.safetensors (e.g. dictionaries copied elsewhere) still gets
    dashboards: the last tenth of the corpus windows is held out instead of the whole corpus."""
    import shutil

    bare = tmp_path / "copied"
    bare.mkdir()
    for p in run_dir.iterdir():
        if p.name.startswith("L0") and p.is_dir():
            shutil.copytree(p, bare / p.name)
        elif p.suffix == ".json":
            shutil.copy(p, bare / p.name)
    assert not (bare / "heldout_tokens.safetensors").exists()
    code, stdout, err = cli(capsys, "explain", bare, "--layer", "1", "--features", "random:3", "--n-tokens", "2000",
                            "--no-verify", "--corpus", run_dir.parent / "corpus.txt")
    assert code == 0, err
    assert json.loads((bare / "features" / "L01" / "summary.json").read_text())["n_live"] == 3


def test_align_same_run_and_other_seed(run_dir, tmp_path_factory, module_texts, tiny_llama, capsys):
    code, stdout, err = cli(capsys, "align", run_dir, run_dir, "--layer", "2", "--out", run_dir / "self-align.json")
    assert code == 0, err
    same = json.loads((run_dir / "self-align.json").read_text())
    assert same["overall"]["fraction"] == 1.0
    assert all(m["match"] == m["feature"] for m in same["mapping"])
    assert sum(b["n"] for b in same["by_density"]) == same["n_features"][0]
    other = _train(tmp_path_factory, module_texts, tiny_llama, seed=1)
    code, stdout, err = cli(capsys, "align", run_dir, other, "--layer", "2")
    assert code == 0, err
    res = json.loads((run_dir / "align.json").read_text())
    assert res["overall"]["fraction"] < 1.0
    assert "features matched" in stdout


def test_main_job_quick_has_every_stage(tmp_path, tiny_llama, monkeypatch):
    """`sparsetrace run --preset quick` on tiny-llama: train, evaluate, circuit, explain, report."""
    from sparsetrace import job

    monkeypatch.setattr(job, "PRESETS", {**job.PRESETS, "quick": job.Preset(
        layers=[1, 2], n_tokens=3000, epochs=1.0, eval_windows=2, dashboard_features=4, dashboard_tokens=1000,
        circuit_prompts=2, graph_prompts=1, spearman_features=3)})
    monkeypatch.setattr(job.LanguageModel, "load", classmethod(lambda cls, *a, **k: tiny_llama))
    text = job.run_main_job(tmp_path / "run", preset="quick", model="tiny-llama", progress=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stages"] == ["train", "evaluate", "circuit", "explain"]
    assert (tmp_path / "run" / "circuits" / "ioi" / "verify.json").exists()
    assert (tmp_path / "run" / "features" / "L02" / "index.json").exists()
    assert (tmp_path / "run" / "report" / "index.html").exists()
    assert "faithfulness" in text and "causal verdicts" in text
    # every circuit node has a dashboard (the report's graph links to it)
    from sparsetrace.intervene.features import parse_node_id

    circuit = json.loads((tmp_path / "run" / "circuits" / "ioi" / "circuit.json").read_text())["circuit"]
    assert circuit
    for node_id in circuit:
        node = parse_node_id(node_id)
        assert (tmp_path / "run" / "features" / f"L{node.layer:02d}" / f"f{node.feature}.json").exists(), node_id


def test_main_job_model_dtype_bfloat16_trains_from_a_bf16_model(tmp_path, tiny_llama, monkeypatch):
    """`sparsetrace run --model-dtype bfloat16`: the training stage is not handed the float32 model (the
    pipeline loads a bf16 copy), the dtype is part of the run's recorded settings, and an unknown dtype is
    refused before anything is written."""
    from sparsetrace import job
    from sparsetrace.errors import ConfigError
    from sparsetrace.train import pipeline

    class Stop(Exception):
        pass

    seen = {}

    def fake_training(tcfg, out, *, lm=None, **_):
        seen.update(model_dtype=tcfg.model_dtype, lm=lm)
        raise Stop

    monkeypatch.setattr(pipeline, "run_training", fake_training)
    monkeypatch.setattr(job.LanguageModel, "load", classmethod(lambda cls, *a, **k: tiny_llama))
    with pytest.raises(Stop):
        job.run_main_job(tmp_path / "run", preset="quick", model="tiny-llama", progress=False, model_dtype="bfloat16")
    assert seen == {"model_dtype": "bfloat16", "lm": None}
    settings = json.loads((tmp_path / "run" / job._MARKERS / "settings.json").read_text())
    assert settings["model_dtype"] == "bfloat16"
    with pytest.raises(Stop):  # the default hands training the loaded float32 model
        job.run_main_job(tmp_path / "run32", preset="quick", model="tiny-llama", progress=False)
    assert seen == {"model_dtype": "float32", "lm": tiny_llama}
    assert "model_dtype" not in json.loads((tmp_path / "run32" / job._MARKERS / "settings.json").read_text())
    with pytest.raises(ConfigError, match="--model-dtype 'float16'"):
        job.run_main_job(tmp_path / "other", preset="quick", model="tiny-llama", progress=False, model_dtype="float16")
    assert not (tmp_path / "other").exists()


def test_explain_layers_follow_the_circuit():
    """With a transcoder on every layer, dashboards go to the layers holding most circuit features."""
    from sparsetrace.job import _explain_layers

    trained = list(range(30))
    circuit = {4: [1, 2], 17: [3], 9: [5, 6, 7], 22: [8, 9]}
    assert _explain_layers(trained, circuit, 3) == [4, 9, 22]
    assert _explain_layers(trained, {}, 3) == [15]
    assert _explain_layers([1, 2], circuit, 3) == [1, 2]  # few layers: all of them
    assert _explain_layers(trained, {40: [1]}, 3) == [15]  # circuit layers that were not trained are ignored
