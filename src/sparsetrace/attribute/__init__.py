"""sparsetrace.attribute: attribution graphs over a local replacement model.

- :func:`attribute` builds an input-dependent attribution graph (nodes: embeddings, active features,
  error nodes, target logits; edges: activation x virtual weight through the frozen linear model);
- :func:`prune_graph`, :func:`graph_scores`, :func:`node_influence`: influence-based pruning and the
  replacement / graph_completeness scores;
- :func:`find_paths`, :func:`select_circuit`: greedy path search and top-influence features;
- :func:`check_edges`: finite-difference checks of edges (frozen and live attention);
- the MLP replacement may be per-layer transcoders or one cross-layer transcoder (:mod:`.clt_sites`);
  ``scores``: graph scores over the 20 packaged prompts (``sparsetrace graph-scores``);
- ``weights``: prompt-independent (weight-only) virtual weights, de-embeddings and logit effects;
  :func:`upstream_features` (``upstream``): a feature's top upstream features and input tokens from them;
- :func:`qk_terms`, :func:`check_qk` (``qk``): exact bilinear (query node, key node) terms of an attention
  score and their ablation check; :func:`head_loadings`, :func:`add_qk` (``heads``): how much of an
  attention-mediated edge each head carries, and QK terms in graph.json.
"""

from .build import attribute, build_graph, select_targets
from .checks import check_edges
from .graph_types import Edges, Graph, Node
from .heads import add_qk, head_loadings
from .paths import Path, find_paths, select_circuit
from .prune import graph_scores, node_influence, prune_graph
from .qk import check_qk, qk_terms
from .replacement import FreezeMode, ReplacementModel
from .upstream import upstream_features

__all__ = [
    "Edges",
    "FreezeMode",
    "Graph",
    "Node",
    "Path",
    "ReplacementModel",
    "add_qk",
    "attribute",
    "build_graph",
    "check_edges",
    "check_qk",
    "find_paths",
    "graph_scores",
    "head_loadings",
    "node_influence",
    "prune_graph",
    "qk_terms",
    "select_circuit",
    "select_targets",
    "upstream_features",
]
