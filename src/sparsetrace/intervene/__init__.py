"""sparsetrace.intervene: feature-level interventions inside the real model, and causal verification.

>>> fs = FeatureSet.parse(["L6/F1234@5", "3:77"])
>>> logits = ablate(lm, [tc3, tc6], batch, fs, mode="mean")          # mean-ablate, errors kept
>>> logits = patch(lm, [tc3, tc6], batch, features=fs)                # from the corrupted prompts
>>> logits = clamp(lm, [tc6], ids, "L6/F1234", 5.0)
>>> steer_generate(lm, tc6, 1234, scale=4.0, prompt="The weather is")
>>> verify_circuit(lm, [tc3, tc6], batch, None, circuit_ids, unrelated_task="greater-than")
"""

from .core import (
    InterventionOutput,
    LayerIntervention,
    as_layer_map,
    build_edits,
    feature_acts,
    feature_means,
    run_with_interventions,
)
from .features import FeatureNode, FeatureSet, is_feature_node, parse_node_id
from .label_check import label_intervention_check
from .ops import (
    ablate,
    ablation_interventions,
    clamp,
    patch,
    steer,
    steer_generate,
    steering_vector,
    typical_norm,
)
from .verify import (
    circuit_from_graph,
    edge_checks,
    spearman,
    verify_circuit,
    write_verify_json,
)

__all__ = [
    "FeatureNode",
    "FeatureSet",
    "InterventionOutput",
    "LayerIntervention",
    "ablate",
    "ablation_interventions",
    "as_layer_map",
    "build_edits",
    "circuit_from_graph",
    "clamp",
    "edge_checks",
    "feature_acts",
    "feature_means",
    "is_feature_node",
    "label_intervention_check",
    "parse_node_id",
    "patch",
    "run_with_interventions",
    "spearman",
    "steer",
    "steer_generate",
    "steering_vector",
    "typical_norm",
    "verify_circuit",
    "write_verify_json",
]
