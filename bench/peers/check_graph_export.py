"""Validate our Neuronpedia graph export with circuit-tracer's own pydantic models.

    HF_HUB_OFFLINE=1 bench/.venv-peers/bin/python bench/peers/check_graph_export.py

1. ``to_neuronpedia`` on tests/fixtures/peers/graph_sparsetrace_small.json must validate as
   ``circuit_tracer.frontend.graph_models.Model`` and re-dump to exactly the same nodes, links,
   qParams and metadata fields (so we write no field circuit-tracer lacks, and miss none).
2. tests/fixtures/peers/circuit_tracer_graph/graph.json (written by circuit-tracer itself) ->
   ``from_neuronpedia`` -> ``to_neuronpedia(extras=False)`` must give the file back unchanged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from circuit_tracer.frontend.graph_models import Model

from sparsetrace.attribute.export import from_neuronpedia, to_neuronpedia

FIX = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "peers"


def main() -> int:
    ok = True
    ours = json.loads((FIX / "graph_sparsetrace_small.json").read_text())
    np_graph = to_neuronpedia(ours)
    dumped = Model.model_validate(np_graph).model_dump(mode="json")
    meta = {k: v for k, v in np_graph["metadata"].items() if k != "sparsetrace"}
    same = (dumped["nodes"] == np_graph["nodes"] and dumped["links"] == np_graph["links"]
            and dumped["qParams"] == np_graph["qParams"] and dumped["metadata"] == meta)
    print(f"{'ok ' if same else 'BAD'} to_neuronpedia(ours) validates as circuit_tracer Model and re-dumps identically "
          f"({len(np_graph['nodes'])} nodes, {len(np_graph['links'])} links)")
    ok &= same
    back = from_neuronpedia(np_graph)
    rt = back == ours
    print(f"{'ok ' if rt else 'BAD'} from_neuronpedia(to_neuronpedia(ours)) == ours")
    ok &= rt

    ct = json.loads((FIX / "circuit_tracer_graph" / "graph.json").read_text())
    Model.model_validate(ct)
    again = to_neuronpedia(from_neuronpedia(ct), extras=False)
    Model.model_validate(again)
    same_ct = again == ct
    print(f"{'ok ' if same_ct else 'BAD'} circuit-tracer graph.json -> ours -> Neuronpedia is unchanged "
          f"({len(ct['nodes'])} nodes, {len(ct['links'])} links)")
    ok &= same_ct
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
