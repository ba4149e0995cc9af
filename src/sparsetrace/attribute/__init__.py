"""sparsetrace.attribute: attribution graphs over a local replacement model.

- :func:`attribute` builds an input-dependent attribution graph (nodes: embeddings, active features,
  error nodes, target logits; edges: activation x virtual weight through the frozen linear model);
- :func:`prune_graph`, :func:`graph_scores`, :func:`node_influence`: influence-based pruning and the
  replacement / completeness scores;
- :func:`find_paths`, :func:`select_circuit`: greedy path search and top-influence features;
- :func:`check_edges`: finite-difference checks of edges (frozen and live attention);
- ``weights``: prompt-independent (weight-only) virtual weights, de-embeddings and logit effects;
  :func:`upstream_features` (``upstream``): a feature's top upstream features and input tokens from them.
"""

from .build import attribute, build_graph, select_targets
from .checks import check_edges
from .graph_types import Edges, Graph, Node
from .paths import Path, find_paths, select_circuit
from .prune import graph_scores, node_influence, prune_graph
from .replacement import FreezeMode, ReplacementModel
from .upstream import upstream_features

__all__ = [
    "Edges",
    "FreezeMode",
    "Graph",
    "Node",
    "Path",
    "ReplacementModel",
    "attribute",
    "build_graph",
    "check_edges",
    "find_paths",
    "graph_scores",
    "node_influence",
    "prune_graph",
    "select_circuit",
    "select_targets",
    "upstream_features",
]
