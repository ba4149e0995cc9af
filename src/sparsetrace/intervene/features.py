"""Sets of dictionary features, parsed from graph node ids.

Accepted forms (whitespace around them is ignored):

- ``L6/F1234@5``  feature 1234 of the layer-6 dictionary at position 5 (graph.json node ids);
- ``L6/F1234``    the same feature at every position;
- ``6:1234``      at every position; ``6:1234@5`` at position 5.

Negative positions count from each prompt's last real token (``@-1`` = the last token), which is what
you want for a batch of prompts with different lengths. A name as position (``L6/F1234@S2``) is a token
*role* of a task's prompts (``TaskBatch.roles``: IOI's S1, IO, S2, END, ...): the feature at the token
that plays that role in each prompt, whatever the template; rows without the role are left alone.

Other graph node kinds (``E@3`` embeddings, ``L6/ERR@3`` errors, ``LOGIT/123@9`` logits) are not
features: :meth:`FeatureSet.parse` refuses them unless ``skip_non_features=True``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import DataError

_POS = r"(?:@(-?\d+|[A-Z][A-Za-z0-9_]*))?"
_NODE_RE = re.compile(r"^L(\d+)/F(\d+)" + _POS + "$")
_SHORT_RE = re.compile(r"^(\d+):(\d+)" + _POS + "$")
_NON_FEATURE_RE = re.compile(r"^(E@-?\d+|L\d+/ERR@-?\d+|LOGIT/\d+@-?\d+)$")

EXPECTED = "expected 'L6/F1234@5', 'L6/F1234' or '6:1234' (layer, feature, optional position)"


@dataclass(frozen=True, order=True)
class FeatureNode:
    layer: int
    feature: int
    position: int | str | None = None  # None = every position; a str is a token role ("S2")

    @property
    def node_id(self) -> str:
        if self.position is None:
            return f"{self.layer}:{self.feature}"
        return f"L{self.layer}/F{self.feature}@{self.position}"

    def __str__(self) -> str:
        return self.node_id


def parse_node_id(text: str) -> FeatureNode:
    """Parse one feature node id (DataError for anything else, naming the bad id)."""
    if not isinstance(text, str):
        raise DataError(f"node id {text!r} is not a string; {EXPECTED}")
    s = text.strip()
    m = _NODE_RE.match(s) or _SHORT_RE.match(s)
    if m is None:
        if _NON_FEATURE_RE.match(s):
            raise DataError(f"node '{text}' is not a feature node (embedding, error or logit); {EXPECTED}")
        raise DataError(f"cannot parse node id '{text}'; {EXPECTED}")
    layer, feature, pos = m.group(1), m.group(2), m.group(3)
    if pos is not None and not pos.lstrip("-").isdigit():
        return FeatureNode(int(layer), int(feature), pos)
    return FeatureNode(int(layer), int(feature), None if pos is None else int(pos))


def is_feature_node(text: str) -> bool:
    s = str(text).strip()
    return bool(_NODE_RE.match(s) or _SHORT_RE.match(s))


class FeatureSet:
    """An ordered set of :class:`FeatureNode` (layer, feature, position or every position)."""

    def __init__(self, nodes: Iterable[FeatureNode] = ()):
        seen: dict[FeatureNode, None] = {}
        for n in nodes:
            if not isinstance(n, FeatureNode):
                raise DataError(f"{n!r} is not a FeatureNode")
            if n.layer < 0 or n.feature < 0:
                raise DataError(f"node '{n}' has a negative layer or feature index")
            seen.setdefault(n, None)
        self.nodes: list[FeatureNode] = list(seen)

    # ------------------------------------------------------------------ construction
    @classmethod
    def parse(cls, items, *, skip_non_features: bool = False) -> FeatureSet:
        """From node ids: a string (one id, or several separated by commas/whitespace), FeatureNodes,
        (layer, feature[, position]) tuples, or an iterable mixing them. A FeatureSet is returned as is."""
        if isinstance(items, FeatureSet):
            return items
        if isinstance(items, (str, FeatureNode)):
            items = [items]
        if isinstance(items, tuple) and items and all(isinstance(x, int) for x in items):
            items = [items]
        if isinstance(items, Mapping):
            return cls.from_dict(items)
        nodes = []
        for item in items:
            if isinstance(item, FeatureNode):
                nodes.append(item)
            elif isinstance(item, str):
                if not item.strip():
                    raise DataError(f"empty node id; {EXPECTED}")
                for part in re.split(r"[,\s]+", item.strip()):
                    if not part:
                        continue
                    if skip_non_features and not is_feature_node(part):
                        if _NON_FEATURE_RE.match(part):
                            continue
                    nodes.append(parse_node_id(part))
            elif (
                isinstance(item, Sequence)
                and len(item) in (2, 3)
                and all(isinstance(x, int) or x is None for x in item)
            ):
                nodes.append(FeatureNode(int(item[0]), int(item[1]), None if len(item) == 2 else item[2]))
            else:
                raise DataError(f"cannot read {item!r} as a feature node; {EXPECTED}")
        return cls(nodes)

    @classmethod
    def from_dict(cls, spec: Mapping[int, object]) -> FeatureSet:
        """``{layer: features}`` or ``{layer: (positions or None, features)}`` (None = all positions)."""
        nodes = []
        for layer, value in spec.items():
            positions: Sequence[int | None] = [None]
            feats = value
            if isinstance(value, tuple) and len(value) == 2 and not isinstance(value[0], int):
                pos, feats = value
                positions = [None] if pos is None else [int(p) for p in pos]
            if isinstance(feats, Tensor):
                feats = feats.reshape(-1).tolist()
            if isinstance(feats, int):
                feats = [feats]
            for f in feats:
                for p in positions:
                    nodes.append(FeatureNode(int(layer), int(f), p))
        return cls(nodes)

    # ------------------------------------------------------------------ container
    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[FeatureNode]:
        return iter(self.nodes)

    def __contains__(self, node) -> bool:
        if isinstance(node, str):
            node = parse_node_id(node)
        return node in set(self.nodes)

    def __repr__(self) -> str:
        ids = ", ".join(n.node_id for n in self.nodes[:6])
        more = f", ... ({len(self.nodes)} nodes)" if len(self.nodes) > 6 else ""
        return f"FeatureSet([{ids}{more}])"

    def __or__(self, other: FeatureSet) -> FeatureSet:
        return FeatureSet([*self.nodes, *FeatureSet.parse(other).nodes])

    @property
    def layers(self) -> list[int]:
        return sorted({n.layer for n in self.nodes})

    def node_ids(self) -> list[str]:
        return [n.node_id for n in self.nodes]

    def prefix(self, k: int) -> FeatureSet:
        """The first ``k`` nodes (in the order given)."""
        return FeatureSet(self.nodes[:k])

    def on_layer(self, layer: int) -> list[FeatureNode]:
        return [n for n in self.nodes if n.layer == layer]

    def without_positions(self) -> FeatureSet:
        """The same features at every position."""
        return FeatureSet(FeatureNode(n.layer, n.feature, None) for n in self.nodes)

    # ------------------------------------------------------------------ masks
    def mask(
        self,
        layer: int,
        batch: int,
        seq: int,
        n_features: int,
        *,
        last_pos: Tensor | None = None,
        device: torch.device | str | None = None,
        roles: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """Bool [batch, seq, n_features]: True where this set selects (row, position, feature).
        ``roles``: {role: [batch] token positions, -1 = absent} for role-keyed nodes."""
        m = torch.zeros(batch, seq, n_features, dtype=torch.bool, device=device)
        for n in self.on_layer(layer):
            if n.feature >= n_features:
                raise DataError(
                    f"node '{n}' names feature {n.feature}, but the layer-{layer} dictionary has "
                    f"{n_features} features"
                )
            if n.position is None:
                m[:, :, n.feature] = True
            elif isinstance(n.position, str):
                if not roles or n.position not in roles:
                    raise DataError(f"node '{n}' is keyed by the role {n.position}, but these prompts mark "
                                    f"the roles {sorted(roles or {}) or 'none'}")
                pos = roles[n.position].to(m.device)
                rows = (pos >= 0).nonzero().flatten()
                m[rows, pos[rows], n.feature] = True
            elif n.position >= 0:
                if n.position >= seq:
                    raise DataError(
                        f"node '{n}' is at position {n.position}, but the prompts are {seq} tokens long"
                    )
                m[:, n.position, n.feature] = True
            else:
                ends = (
                    last_pos.to(m.device)
                    if last_pos is not None
                    else torch.full((batch,), seq - 1, dtype=torch.long, device=m.device)
                )
                pos = ends + 1 + n.position
                if bool((pos < 0).any()):
                    raise DataError(f"node '{n}' reaches before the start of a prompt")
                m[torch.arange(batch, device=m.device), pos, n.feature] = True
        return m
