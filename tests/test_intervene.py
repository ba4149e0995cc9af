"""Feature interventions and causal verification on a tiny random model with random dictionaries."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary  # noqa: E402
from sparsetrace.errors import DataError  # noqa: E402
from sparsetrace.intervene import (  # noqa: E402
    FeatureNode,
    FeatureSet,
    LayerIntervention,
    ablate,
    clamp,
    feature_acts,
    feature_means,
    label_intervention_check,
    parse_node_id,
    patch,
    run_with_interventions,
    spearman,
    steer,
    steer_generate,
    verify_circuit,
)
from sparsetrace.model.adapter import LanguageModel  # noqa: E402
from sparsetrace.model.hookpoints import Hookpoint  # noqa: E402
from sparsetrace.tasks import get_task  # noqa: E402

D = 64
N_FEAT = 96


@pytest.fixture(scope="module")
def lm():
    return LanguageModel.load("tiny-llama")


def transcoder(layer: int, seed: int) -> SparseDictionary:
    d = SparseDictionary(
        DictionaryConfig(kind="transcoder", d_in=D, d_out=D, n_features=N_FEAT, layer=layer), seed=seed
    )
    with torch.no_grad():
        d.W_enc.mul_(20.0)  # the tiny model's normalised MLP inputs are small; make many features fire
        d.b_enc.fill_(-0.1)
        d.b_enc[0] = -1e6  # feature 0 never fires
    return d


def exact_sae(layer: int) -> SparseDictionary:
    """An SAE on resid_pre with W_enc = W_dec = [I; -I]: relu(x) - relu(-x) reconstructs x exactly."""
    d = SparseDictionary(
        DictionaryConfig(
            kind="sae",
            d_in=D,
            d_out=D,
            n_features=2 * D,
            layer=layer,
            hookpoint_in="resid_pre",
            hookpoint_out="resid_pre",
        )
    )
    eye = torch.eye(D)
    with torch.no_grad():
        d.W_enc.copy_(torch.cat([eye, -eye]))
        d.W_dec.copy_(torch.cat([eye, -eye]))
        d.b_enc.zero_()
        d.b_dec.zero_()
    return d


@pytest.fixture(scope="module")
def dicts():
    return [transcoder(1, 0), transcoder(2, 1)]


@pytest.fixture(scope="module")
def ids(lm):
    return lm.tokenize("When Mary and John went to the store, John gave a drink to")


# ------------------------------------------------------------------------------------------ node ids


def test_parse_node_ids():
    assert parse_node_id("L6/F1234@5") == FeatureNode(6, 1234, 5)
    assert parse_node_id(" 6:1234 ") == FeatureNode(6, 1234, None)
    assert parse_node_id("L6/F1234") == FeatureNode(6, 1234, None)
    assert parse_node_id("L3/F7@-1") == FeatureNode(3, 7, -1)
    fs = FeatureSet.parse("L6/F1@2, 3:4 L6/F1@2")
    assert fs.node_ids() == ["L6/F1@2", "3:4"]
    assert fs.layers == [3, 6]
    fs = FeatureSet.from_dict({6: ([1, 2], [10]), 3: [7]})
    assert set(fs.node_ids()) == {"L6/F10@1", "L6/F10@2", "3:7"}
    assert FeatureSet.parse(
        ["E@0", "L6/ERR@3", "LOGIT/12@4", "L6/F1@2"], skip_non_features=True
    ).node_ids() == ["L6/F1@2"]


@pytest.mark.parametrize(
    "bad", ["L6F12", "L6/F12@x", "six:3", "6:", "", "E@3", "L6/ERR@3", "LOGIT/5@2", "L-1/F3"]
)
def test_node_id_errors(bad):
    with pytest.raises(DataError):
        FeatureSet.parse([bad])


def test_feature_out_of_range(lm, dicts, ids):
    with pytest.raises(DataError, match="features"):
        ablate(lm, dicts, ids, ["1:9999"], mode="zero")
    with pytest.raises(DataError, match="layer"):
        ablate(lm, dicts, ids, ["3:1"], mode="zero")
    with pytest.raises(DataError, match="position"):
        ablate(lm, dicts, ids, ["L1/F1@500"], mode="zero")


# ------------------------------------------------------------------------------------------ mechanics


def test_zero_ablating_an_inactive_feature_changes_nothing(lm, dicts, ids):
    acts = feature_acts(lm, dicts, ids)
    assert acts[1][..., 0].abs().max() == 0
    base = lm.run(ids).logits
    out = ablate(lm, dicts, ids, ["1:0", "2:0"], mode="zero")
    assert torch.equal(out, base)


def test_ablating_an_active_feature_changes_logits(lm, dicts, ids):
    acts = feature_acts(lm, dicts, ids)
    f = int(acts[1][0].sum(0).argmax())
    assert acts[1][0, :, f].max() > 0
    base = lm.run(ids).logits
    out = ablate(lm, dicts, ids, [f"1:{f}"], mode="zero")
    assert (out - base).abs().max() > 1e-5


def test_zero_ablating_all_features_of_exact_sae_zeroes_the_stream(lm, ids):
    sae = exact_sae(2)
    out = ablate(lm, [sae], ids, [], mode="zero", invert=True)
    hand = lm.run(ids, edit={Hookpoint("resid_pre", 2): lambda x: torch.zeros_like(x)}).logits
    torch.testing.assert_close(out, hand, atol=1e-5, rtol=1e-5)


def test_mean_ablating_all_features_of_exact_sae(lm, ids):
    sae = exact_sae(2)
    means = {2: torch.rand(2 * D)}
    out = ablate(lm, [sae], ids, [], mode="mean", means=means, invert=True)
    target = means[2] @ sae.W_dec  # what the stream becomes (bias is 0, error is 0)

    def edit(x):
        y = target.expand_as(x).clone()
        y[:, 0] = x[:, 0]  # the BOS position is left alone by mean-ablation
        return y

    hand = lm.run(ids, edit={Hookpoint("resid_pre", 2): edit}).logits
    torch.testing.assert_close(out, hand, atol=1e-5, rtol=1e-5)


def test_zero_ablating_all_transcoder_features_keeps_only_error_and_bias(lm, dicts, ids):
    tc = dicts[0]
    out = ablate(lm, [tc], ids, [], mode="zero", invert=True)
    stash = {}

    def take(x):
        stash["x"] = x
        return x

    def give(y):
        x = stash["x"]
        return y - tc.features(x.reshape(-1, D)).reshape(*x.shape[:2], -1) @ tc.W_dec

    hand = lm.run(ids, edit={Hookpoint("mlp_in", 1): take, Hookpoint("mlp_out", 1): give}).logits
    torch.testing.assert_close(out, hand, atol=1e-5, rtol=1e-5)


def test_patch_from_identical_corrupted_prompt_is_noop(lm, dicts, ids):
    base = lm.run(ids).logits
    out = patch(lm, dicts, ids, ids.clone(), ["1:3", "L2/F5@4", "2:7"])
    assert torch.equal(out, base)
    out = patch(lm, dicts, ids, ids.clone(), [], invert=True)
    assert torch.equal(out, base)


def test_patch_needs_same_shape(lm, dicts, ids):
    with pytest.raises(DataError, match="same length"):
        patch(lm, dicts, ids, ids[:, :-1], ["1:3"])


def test_clamp_sets_the_activation(lm, dicts, ids):
    out = run_with_interventions(
        lm,
        dicts,
        ids,
        {1: LayerIntervention(mask=FeatureSet.parse("L1/F4@3").mask(1, 1, ids.shape[1], N_FEAT), values=7.5)},
        record=[1],
    )
    assert out.new_acts[1][0, 3, 4] == 7.5
    assert torch.equal(clamp(lm, dicts, ids, "L1/F4@3", 7.5), out.logits)


def test_upstream_edits_reach_downstream_dictionaries(lm, dicts, ids):
    clean = feature_acts(lm, dicts, ids)[2]
    out = run_with_interventions(
        lm,
        dicts,
        ids,
        {1: LayerIntervention(mask=torch.ones(1, ids.shape[1], N_FEAT, dtype=torch.bool), values=0.0)},
        record=[2],
    )
    assert (out.acts[2] - clean).abs().max() > 1e-5


def test_feature_means_skip_padding_and_bos(lm, dicts):
    task = get_task("ioi")
    batch = task.prompts(lm, 4, seed=0)
    means = feature_means(lm, dicts, batch)
    acts = feature_acts(lm, dicts, batch.clean)
    keep = batch.mask.clone()
    keep[:, 0] = False
    torch.testing.assert_close(means[1], acts[1][keep].mean(0), atol=1e-5, rtol=1e-5)


def test_steering_scale_zero_is_noop_and_large_scale_changes_outputs(lm, dicts, ids):
    base = lm.run(ids).logits
    assert torch.equal(steer(lm, dicts[0], 3, 0.0, ids), base)
    assert (steer(lm, dicts[0], 3, 50.0, ids) - base).abs().max() > 1e-3
    plain = steer_generate(lm, dicts[0], 3, 0.0, "Hello there", max_new_tokens=4)
    again = steer_generate(lm, dicts[0], "L1/F3", 0.0, "Hello there", max_new_tokens=4)
    assert plain == again
    steered = steer_generate(lm, dicts[0], 3, 200.0, "Hello there", max_new_tokens=4)
    assert steered != plain
    with pytest.raises(DataError):
        steer(lm, dicts[0], "L2/F3", 1.0, ids)


def test_label_intervention_check(lm, dicts):
    res = label_intervention_check(lm, dicts[0], 3, ["Hello there", "The cat"], [" the", " Mary"], scale=0.0)
    assert [t["delta_logit"] for t in res["tokens"]] == [0.0, 0.0]
    res = label_intervention_check(lm, dicts[0], 3, "Hello there", [" the"], scale=50.0, top_k=3)
    assert len(res["top_promoted"]) == 3 and 0.0 <= res["tokens"][0]["percentile"] <= 1.0
    top_tok = res["top_promoted"][0][0]
    res2 = label_intervention_check(lm, dicts[0], 3, "Hello there", [top_tok], scale=50.0)
    assert res2["passes"] and res2["tokens"][0]["percentile"] > 0.99


# ------------------------------------------------------------------------------------------ verification


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)
    assert spearman([1, 2], [1, 2]) is None


@pytest.fixture(scope="module")
def custom_batch(lm):
    task = get_task(
        "custom",
        prompt="When Mary and John went to the store, John gave a drink to",
        target=" Mary",
        contrast=" John",
    )
    return task.prompts(lm)


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_faithfulness_full_circuit_is_one_and_empty_is_zero(lm, dicts, custom_batch, mode):
    everything = [f"{d.cfg.layer}:{f}" for d in dicts for f in range(N_FEAT)]
    full = verify_circuit(lm, dicts, custom_batch, None, everything, mode=mode, curve_points=3)
    assert abs(full["m_full"] - full["m_empty"]) > 1e-4
    assert full["faithfulness"] == pytest.approx(1.0, abs=1e-4)
    assert full["m_circuit"] == pytest.approx(full["m_full"], abs=1e-4)
    assert full["ablation_completeness"] == pytest.approx(0.0, abs=1e-4)  # ablating everything = the empty model
    assert full["curve"][0] == {"size": 0, "faithfulness": 0.0}
    assert full["curve"][-1]["size"] == len(everything)
    empty = verify_circuit(lm, dicts, custom_batch, None, [], mode=mode)
    assert empty["faithfulness"] == pytest.approx(0.0, abs=1e-6)
    assert empty["ablation_completeness"] == pytest.approx(1.0, abs=1e-6)
    assert empty["ablation_drop"] == pytest.approx(0.0, abs=1e-6)


def test_verify_schema_spearman_specificity_edges(lm, dicts):
    task = get_task("ioi")
    batch = task.prompts(lm, 4, seed=0)
    acts = feature_acts(lm, dicts, batch.clean)
    f1 = int(acts[1].sum((0, 1)).argmax())
    f2 = int(acts[2].sum((0, 1)).argmax())
    circuit = [f"1:{f1}", f"L2/F{f2}@-1", "E@0", "L1/ERR@2"]
    scores = {f"1:{f1}": 2.0, f"L2/F{f2}@-1": 1.0, "1:5": 0.5, "2:6": -0.2, "E@0": 9.0}
    edges = [
        {"source": f"L1/F{f1}@3", "target": f"L2/F{f2}@5", "weight": 0.3},
        {"source": "E@0", "target": "1:1", "weight": 1},
    ]
    res = verify_circuit(
        lm,
        dicts,
        batch,
        task.metric,
        circuit,
        unrelated_task="sva",
        scores=scores,
        edges=edges,
        curve_points=5,
    )
    for key in [
        "task",
        "circuit",
        "metric_name",
        "m_full",
        "m_empty",
        "m_circuit",
        "faithfulness",
        "ablation_completeness",
        "specificity",
        "ablation_drop",
        "curve",
        "curve_auc",
        "spearman",
        "edge_checks",
    ]:
        assert key in res
    assert res["task"] == "ioi" and res["circuit"] == [f"1:{f1}", f"L2/F{f2}@-1"]
    assert res["m_full"] == pytest.approx(task.metric(lm.run(batch.clean).logits, batch), abs=1e-5)
    assert [c["size"] for c in res["curve"]] == [0, 1, 2]
    assert res["specificity"]["task"] == "sva"
    assert len(res["single_feature_effects"]) == 4
    assert res["spearman"] is None or -1.0 <= res["spearman"] <= 1.0
    assert len(res["edge_checks"]) == 1 and set(res["edge_checks"][0]) == {
        "source",
        "target",
        "predicted",
        "measured",
    }
    # per-layer ablation: one row per circuit layer; each equals the single-feature effect of its only node
    rows = {r["layer"]: r for r in res["layer_importance"]}
    assert sorted(rows) == [1, 2] and all(r["n_features"] == 1 for r in rows.values())
    single = {s["node"]: s["effect"] for s in res["single_feature_effects"]}
    assert rows[1]["m_without"] == pytest.approx(res["m_full"] - single[f"1:{f1}"], abs=1e-6)
    assert rows[2]["drop"] == pytest.approx(single[f"L2/F{f2}@-1"] / res["m_full"], abs=1e-6)
    json.dumps(res, allow_nan=False)


def test_patch_mode_verification_runs(lm, dicts):
    batch = get_task("ioi").prompts(lm, 3, seed=1)
    res = verify_circuit(lm, dicts, batch, None, ["1:2", "2:3"], mode="patch", curve_points=2, unrelated_task="sva")
    assert res["mode"] == "patch"
    # the unrelated task has no corrupted version of C: its specificity is the mean-ablation one
    mean = verify_circuit(lm, dicts, batch, None, ["1:2", "2:3"], mode="mean", curve_points=2, unrelated_task="sva")
    assert res["specificity"]["mode"] == "mean"
    assert res["specificity"]["ablated"] == pytest.approx(mean["specificity"]["ablated"], abs=1e-6)
    with pytest.raises(DataError):
        verify_circuit(lm, dicts, batch, None, ["1:2"], mode="resample")


def test_circuit_from_graph_and_write_verify_json(tmp_path):
    from sparsetrace.intervene import circuit_from_graph, write_verify_json

    graph = {
        "nodes": [
            {"node_id": "E@0", "kind": "embedding", "influence": 5.0},
            {"node_id": "L1/F3@2", "kind": "feature", "influence": 0.2},
            {"node_id": "L2/F7@4", "kind": "feature", "influence": -0.9},
            {"node_id": "L2/ERR@4", "kind": "error", "influence": 1.0},
            {"node_id": "L0/F1@1", "kind": "feature", "influence": 0.01},
        ]
    }
    nodes, scores = circuit_from_graph(graph, min_abs_influence=0.05)
    assert nodes == ["L2/F7@4", "L1/F3@2"] and scores["L2/F7@4"] == -0.9
    path = tmp_path / "g.json"
    path.write_text(json.dumps(graph))
    assert circuit_from_graph(str(path), top_k=1)[0] == ["L2/F7@4"]
    with pytest.raises(DataError):
        circuit_from_graph({"links": []})
    out = write_verify_json(
        {"faithfulness": float("nan"), "curve": [{"size": 0, "faithfulness": float("inf")}]},
        tmp_path / "v.json",
    )
    assert json.loads(out.read_text()) == {"faithfulness": None, "curve": [{"size": 0, "faithfulness": None}]}


def test_role_keyed_nodes():
    """``L6/F12@S2``: the feature at the token that plays the role S2 in each prompt."""
    assert parse_node_id("L6/F12@S2") == FeatureNode(6, 12, "S2")
    assert parse_node_id("6:12@END").node_id == "L6/F12@END"
    fs = FeatureSet.parse(["L6/F1@S2", "L6/F2@END"])
    roles = {"S2": torch.tensor([1, 3, -1]), "END": torch.tensor([4, 5, 2])}
    m = fs.mask(6, 3, 6, 4, roles=roles)
    assert m.sum() == 5
    assert m[0, 1, 1] and m[1, 3, 1] and not m[2, :, 1].any()  # row 2 has no S2: left alone
    assert m[0, 4, 2] and m[1, 5, 2] and m[2, 2, 2]
    with pytest.raises(DataError, match="role S2"):
        fs.mask(6, 3, 6, 4, roles={"END": roles["END"]})
