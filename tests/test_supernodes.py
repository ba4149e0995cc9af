"""Supernodes (named groups of graph nodes made in the report's viewer): Graph JSON round trip, the
checks on bad groupings, pruning, and the Neuronpedia export (``qParams.supernodes``) and back."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from sparsetrace.attribute.export import GraphFormatError, from_neuronpedia, to_neuronpedia
from sparsetrace.attribute.graph_types import Graph
from sparsetrace.attribute.prune import prune_graph
from sparsetrace.errors import DataError

FIXTURE = Path(__file__).parent / "fixtures" / "report_run" / "circuits" / "ioi" / "graph.json"


def _doc() -> dict:
    doc = json.loads(FIXTURE.read_text())
    doc["format"] = "sparsetrace-graph/1"
    return doc


def _features(doc: dict) -> list[str]:
    return [n["node_id"] for n in doc["nodes"] if n["kind"] == "feature"]


def test_graph_json_round_trips_supernodes(tmp_path):
    doc = _doc()
    feats = _features(doc)
    doc["supernodes"] = [{"name": "name movers", "members": feats[:3]}, {"name": "S-inhibition", "members": [feats[5]]}]
    g = Graph.from_json(copy.deepcopy(doc))
    assert g.supernodes == doc["supernodes"]
    path = g.save(tmp_path / "graph.json")
    again = Graph.load(path)
    assert again.supernodes == doc["supernodes"]
    assert json.loads(path.read_text())["supernodes"] == doc["supernodes"]
    # a graph without supernodes writes no key (older readers see the same document as before)
    del doc["supernodes"]
    assert "supernodes" not in Graph.from_json(doc).to_json()


@pytest.mark.parametrize(
    ("supernodes", "needle"),
    [
        ({"name": "x"}, "expected a list"),
        ([{"name": "", "members": ["E@1"]}], "non-empty string"),
        ([{"name": "x", "members": []}], "non-empty list"),
        ([{"name": "x", "members": ["L99/F1@0"]}], "'L99/F1@0'"),
        ([{"name": "a", "members": ["E@1"]}, {"name": "b", "members": ["E@1"]}], "two supernodes"),
    ],
)
def test_bad_supernodes_are_refused(supernodes, needle):
    doc = _doc()
    doc["supernodes"] = supernodes
    with pytest.raises(DataError, match="supernode") as e:
        Graph.from_json(doc)
    assert needle in str(e.value)


def test_pruning_keeps_the_surviving_members():
    doc = _doc()
    feats = _features(doc)
    doc["supernodes"] = [{"name": "all features", "members": feats}]
    g = Graph.from_json(doc)
    pruned = prune_graph(g, 0.5, 0.9)
    kept = {n.node_id for n in pruned.nodes}
    assert len(kept) < len(g.nodes)
    assert pruned.supernodes == [{"name": "all features", "members": [f for f in feats if f in kept]}]


def test_neuronpedia_export_and_back():
    doc = _doc()
    doc["supernodes"] = [{"name": "name movers", "members": ["L4/F5@13", "L5/F19@13"]},
                         {"name": "tokens", "members": ["E@1", "LOGIT/5335@13"]}]
    np_graph = to_neuronpedia(doc)
    ids = {n["node_id"] for n in np_graph["nodes"]}
    assert np_graph["qParams"]["supernodes"] == [["name movers", "4_5_13", "5_19_13"],
                                                 ["tokens", f"E_{_emb_tid(np_graph, 1)}_1", "7_5335_13"]]  # logits sit at layer n_layers + 1
    for group in np_graph["qParams"]["supernodes"]:
        assert set(group[1:]) <= ids  # every member is a Neuronpedia node id of the exported graph
    back = from_neuronpedia(json.loads(json.dumps(np_graph)))
    assert back["supernodes"] == doc["supernodes"]
    assert Graph.from_json(back).supernodes == doc["supernodes"]
    # a graph without supernodes exports Neuronpedia's empty list
    del doc["supernodes"]
    assert to_neuronpedia(doc)["qParams"]["supernodes"] == []
    assert "supernodes" not in from_neuronpedia(to_neuronpedia(doc))


def _emb_tid(np_graph: dict, pos: int) -> str:
    return next(n["node_id"].split("_")[1] for n in np_graph["nodes"] if n["feature_type"] == "embedding" and n["ctx_idx"] == pos)


def test_export_refuses_a_supernode_of_unknown_nodes():
    doc = _doc()
    doc["supernodes"] = [{"name": "ghost", "members": ["L9/F9@9"]}]
    with pytest.raises(GraphFormatError, match="ghost"):
        to_neuronpedia(doc)
