"""sparsetrace.interpret: feature dashboards, labels, causal label verification, cross-run alignment
and layer importance.

- :mod:`.dashboards`: ``compute_dashboards(lm, dictionary, windows, features)`` (one bounded-memory pass,
  harvesting only up to the dictionary's layer) and ``write_dashboards(run_dir, layer, dashboards)``.
- :mod:`.labels`: ``BuiltinLabeler`` (deterministic, no LLM), ``LabelCache`` and ``label_features``;
  :mod:`.llm_labelers`: ``OpenAICompatibleLabeler``, ``TransformersLabeler`` and ``make_labeler``
  (``explain --labeler``); :mod:`.predictions`: what a label's text claims.
- :mod:`.verify_labels`: ``verify_labels`` scores each label ``verified`` / ``associative`` / ``failed``
  with an activation test and an intervention (steering) test; ``summarize_verdicts``.
- :mod:`.align`: ``align(d1, d2, densities1=...)`` and ``write_alignment`` (``align.json``).
- :mod:`.importance`: ``layer_importance(verify, graph)`` and ``measure_layer_ablation``.
"""

from .align import align, write_alignment
from .dashboards import compute_dashboards
from .importance import layer_importance, measure_layer_ablation
from .labels import BuiltinLabeler, Label, LabelCache, dictionary_sha, label_features
from .llm_labelers import OpenAICompatibleLabeler, TransformersLabeler, make_labeler
from .verify_labels import VERDICTS, LabelVerifier, VerifyConfig, summarize_verdicts, verify_labels
from .writer import write_dashboards

__all__ = [
    "VERDICTS",
    "BuiltinLabeler",
    "Label",
    "LabelCache",
    "LabelVerifier",
    "OpenAICompatibleLabeler",
    "TransformersLabeler",
    "VerifyConfig",
    "align",
    "compute_dashboards",
    "dictionary_sha",
    "label_features",
    "make_labeler",
    "layer_importance",
    "measure_layer_ablation",
    "summarize_verdicts",
    "verify_labels",
    "write_alignment",
    "write_dashboards",
]
