"""The default training mix: named sources deduplicated and interleaved at the document level.

Every source's passages are shuffled (seeded by the source's name, so the order is the same on every
machine), then sources are interleaved by stride scheduling: the next passage always comes from the
source furthest below its weight (in characters taken). Any prefix of the mix, which is what a training
run reads, therefore holds every source close to its weight. Exact duplicates (after lower-casing and
collapsing white space) are dropped wherever they occur.

When a source runs out its weight goes to the others. The mix ends before any kind of text whose sources
have all run out would fall below ``min_kind`` of the characters, and a source that would pass
``max_source`` of them is retired. The weights in characters are set so that, in tokens, every source
stays under 35% and every kind over 5% (``run.json``'s ``corpus_sources`` records the measured counts).
"""

from __future__ import annotations

import hashlib
import heapq
import random

__all__ = ["interleave"]


def _key(text: str) -> bytes:
    return hashlib.blake2b(" ".join(text.lower().split()).encode("utf-8"), digest_size=16).digest()


def interleave(
    docs: dict[str, list[str]],
    weights: dict[str, float],
    kinds: dict[str, str],
    *,
    seed: int = 0,
    min_kind: float = 0.06,
    max_source: float = 0.30,
    min_chars: int | None = None,
    warmup_chars: int = 200_000,
) -> tuple[list[str], list[str]]:
    """Interleave ``docs`` ({source: passages}); returns (texts, source name of each text)."""
    order = {name: i for i, name in enumerate(docs)}
    queues = {}
    for name, items in docs.items():
        items = list(items)
        random.Random(f"{seed}:{name}").shuffle(items)  # corpus.py uses the same order for a source alone
        queues[name] = items
    pos = dict.fromkeys(docs, 0)
    taken = dict.fromkeys(docs, 0)
    kind_chars = {kinds[n]: 0 for n in docs}
    live_in_kind = {k: sum(1 for n in docs if kinds[n] == k) for k in kind_chars}
    heap = [(0.0, order[n], n) for n in docs if weights.get(n, 0) > 0 and queues[n]]
    for n in docs:
        if not (weights.get(n, 0) > 0 and queues[n]):
            live_in_kind[kinds[n]] -= 1
    heapq.heapify(heap)
    seen: set[bytes] = set()
    texts: list[str] = []
    labels: list[str] = []
    total = 0
    while heap:
        _, _, name = heapq.heappop(heap)
        text = None
        while pos[name] < len(queues[name]):
            cand = queues[name][pos[name]]
            pos[name] += 1
            k = _key(cand)
            if cand.strip() and k not in seen:
                seen.add(k)
                text = cand
                break
        if text is None:  # this source has run out
            live_in_kind[kinds[name]] -= 1
            continue
        new_total = total + len(text)
        if any(live_in_kind[k] == 0 and 0 < c < min_kind * new_total for k, c in kind_chars.items()):
            break
        if new_total > warmup_chars and taken[name] + len(text) > max_source * new_total:
            live_in_kind[kinds[name]] -= 1  # retired: it would pass its cap
            continue
        texts.append(text)
        labels.append(name)
        taken[name] += len(text)
        kind_chars[kinds[name]] += len(text)
        total = new_total
        if min_chars is not None and total >= min_chars:
            break
        heapq.heappush(heap, (taken[name] / weights[name], order[name], name))
    return texts, labels
