"""``hf:NAME[:split]``: a Hugging Face dataset (needs the optional ``datasets`` package and the hub)."""

from __future__ import annotations

from ...errors import DataError

__all__ = ["load_hf"]


def load_hf(spec: str) -> list[str]:
    rest = spec[3:]
    name, _, split = rest.partition(":")
    if not name:
        raise DataError(f"corpus '{spec}' names no dataset; expected hf:<dataset>[:split]")
    try:
        import datasets  # noqa: F401
        from datasets import load_dataset
    except ImportError:
        raise DataError(f"corpus '{spec}' needs the 'datasets' package (pip install datasets)") from None
    try:
        ds = load_dataset(name, split=split or "train")
    except (
        Exception
    ) as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"corpus '{spec}' could not be loaded (the Hugging Face hub may be unreachable offline): {first}"
        ) from None
    columns = list(getattr(ds, "column_names", []) or [])
    column = "text" if "text" in columns else None
    if column is None:
        features = getattr(ds, "features", {}) or {}
        for c in columns:
            if getattr(features.get(c), "dtype", None) in ("string", "large_string"):
                column = c
                break
    if column is None:
        raise DataError(f"corpus '{spec}' has no text column (columns: {', '.join(columns) or 'none'})")
    return [t for t in ds[column] if isinstance(t, str) and t.strip()]
