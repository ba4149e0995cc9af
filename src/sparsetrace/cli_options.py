"""One place where every command-line value is checked, before any command body (or model) runs.

Each option's value passes a rule chosen by its type, unless :data:`RULES` names a different one:

* integers are counts: ``>= 1`` and at most :data:`MAX_COUNT`;
* floats are positive, finite and at most :data:`MAX_REAL`;
* text that names something (a model, a corpus, a prompt, a path) is non-blank.

:func:`install` wraps every parameter of the click command tree built from the typer app, so a new option
is covered without writing a check for it. A bad value raises :class:`~sparsetrace.errors.ConfigError`,
which the CLI prints as one ``error:`` line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["MAX_COUNT", "MAX_REAL", "RULES", "Rule", "check_value", "clear_or_refuse", "install", "parse_layers", "parse_target_l0",
           "refuse_existing", "rule_for"]

MAX_COUNT = 10**9
MAX_REAL = 1e6


@dataclass(frozen=True)
class Rule:
    """Accepted values: ``lo <= v <= hi`` (``lo < v`` when ``lo_open``); text: non-blank unless ``blank``."""

    lo: float | None = 1
    hi: float | None = MAX_COUNT
    lo_open: bool = False
    blank: bool = False  # text: whitespace-only accepted (a token such as " " is real); "" never is
    what: str = ""  # the expected value, in words, for the error line

    def expected(self) -> str:
        if self.what:
            return self.what
        lo = "" if self.lo is None else f"{'>' if self.lo_open else '>='} {self.lo:g}"
        hi = "" if self.hi is None else f"<= {self.hi:g}"
        return "a finite number " + " and ".join(x for x in (lo, hi) if x)

    def accepts(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or value <= self.hi


COUNT = Rule(1, MAX_COUNT, what=f"an integer >= 1 (at most {MAX_COUNT:,})")
REAL = Rule(0.0, MAX_REAL, lo_open=True, what=f"a number > 0 (finite, at most {MAX_REAL:g})")
FRACTION = Rule(0.0, 1.0, lo_open=True, what="a fraction in (0, 1]")
INDEX = Rule(0, 100_000, what="an integer >= 0")

# Options whose range differs from their type's default, by option name (or "command.option").
RULES: dict[str, Rule] = {
    "seed": Rule(0, 2**32 - 1, what="an integer in [0, 2**32 - 1]"),
    "layer": INDEX,
    "template": INDEX,
    "checkpoint_every": Rule(0, MAX_COUNT, what="an integer >= 0 (0: no checkpoints)"),
    "align.n_windows": Rule(0, 1_000_000, what="an integer >= 0 (0: no firing densities)"),
    "n_windows": Rule(1, 1_000_000, what="an integer >= 1 (at most 1,000,000)"),
    "n_tokens": Rule(1, 10**10, what="an integer >= 1 (at most 10,000,000,000)"),
    "context": Rule(2, 1_000_000, what="an integer >= 2 (at most 1,000,000)"),
    "max_new_tokens": Rule(1, 100_000, what="an integer >= 1 (at most 100,000)"),
    "port": Rule(1, 65535, what="a TCP port in [1, 65535]"),
    "node_threshold": FRACTION,
    "edge_threshold": FRACTION,
    "threshold": FRACTION,
    # a huge rate is caught by training's divergence check (one error line, last checkpoint kept)
    "lr": Rule(0.0, 1e30, lo_open=True, what="a finite learning rate > 0 (at most 1e30)"),
    "epochs": Rule(0.0, 10_000.0, lo_open=True, what="a finite number of passes in (0, 10000]"),
    "scale": Rule(-1000.0, 1000.0, what="a finite number in [-1000, 1000] (0: no steering)"),
    "max_memory": Rule(0.0, 100_000.0, lo_open=True, what="a finite number of GB in (0, 100000]"),
    "upstream_seconds": Rule(0.0, MAX_REAL, what="a finite number of seconds >= 0 (0: off)"),
    "preact_coef": Rule(0.0, MAX_REAL, what="a finite number >= 0 (0: off)"),
    "target": Rule(blank=True),
    "contrast": Rule(blank=True),
}


def rule_for(command: str, name: str, kind: type) -> Rule:
    """The rule for option ``name`` of ``command`` whose values are of type ``kind`` (int, float or str)."""
    rule = RULES.get(f"{command}.{name}") or RULES.get(name)
    if rule is not None:
        return rule
    return REAL if kind is float else COUNT


def _flag(param) -> str:
    opts = [o for o in (getattr(param, "opts", None) or []) if o.startswith("--")]
    if opts:
        return opts[0]
    return (param.name or "value").upper()


def check_value(command: str, param, raw: Any, value: Any) -> None:
    """Raise ConfigError when ``raw`` (as typed) / ``value`` (converted) breaks the option's rule."""
    flag = _flag(param)
    raws = raw if isinstance(raw, (tuple, list)) else [raw]
    for r in raws:
        if isinstance(r, str):
            rule = rule_for(command, param.name or "", str)
            if r == "" or (not rule.blank and not r.strip()):
                raise ConfigError(f"{flag} is empty; expected a non-blank value")
    values = value if isinstance(value, (tuple, list)) else [value]
    for v in values:
        if v is None or isinstance(v, (bool, str, Path)):
            continue
        if isinstance(v, (int, float)):
            rule = rule_for(command, param.name or "", float if isinstance(v, float) else int)
            if not rule.accepts(v):
                shown = f"{v:g}" if isinstance(v, float) else str(v)
                raise ConfigError(f"{flag} {shown} is invalid; expected {rule.expected()}")


def _wrap(command: str, param) -> None:
    if getattr(param, "_sparsetrace_checked", False):
        return
    original = param.process_value

    def process_value(ctx, value, _orig=original, _param=param, _cmd=command):
        converted = _orig(ctx, value)
        check_value(_cmd, _param, value, converted)
        return converted

    param.process_value = process_value
    param._sparsetrace_checked = True


def install(command, name: str = "") -> Any:
    """Check every parameter of ``command`` and of its subcommands; returns ``command``."""
    for param in getattr(command, "params", []):
        _wrap(name, param)
    for sub_name, sub in (getattr(command, "commands", None) or {}).items():
        install(sub, sub_name)
    return command


def refuse_existing(paths: list[Path], *, how: str = "pass --overwrite to replace them") -> None:
    """Raise ConfigError when any of ``paths`` exists: earlier results are never replaced silently."""
    found = [Path(p) for p in paths if Path(p).exists()]
    if found:
        names = ", ".join(str(p) for p in found[:3]) + (" ..." if len(found) > 3 else "")
        raise ConfigError(f"results already exist ({names}); {how}")


def clear_or_refuse(results: list[Path], overwrite: bool, *, folder: Path | None = None,
                    how: str = "pass --overwrite to replace them or choose another output folder") -> None:
    """Earlier results are never replaced silently: refuse, or with --overwrite remove them (``folder`` whole)."""
    if not overwrite:
        refuse_existing(results, how=how)
        return
    if folder is not None and any(Path(p).exists() for p in results):
        import shutil

        from .util.cache import log

        log(f"--overwrite: removing {folder}")
        shutil.rmtree(folder)
        return
    for p in results:
        if Path(p).is_file():
            Path(p).unlink()


def parse_layers(text: str) -> list[int] | str:
    """``all``, a list, ranges, or both: ``3,6``, ``0-29``, ``0-3,6,10-12``; "all" stays "all" (resolved
    against the model's depth once it is loaded). A bad part is named in one error line."""
    expected = "expected all, layer numbers and ranges like 3,6 or 0-29 or 0-3,6,10-12"
    if text.strip().lower() == "all":
        return "all"
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part[1:]:
            a, b = (x.strip() for x in part.split("-", 1))
            if not (a.isdigit() and b.isdigit()):
                raise ConfigError(f"--layers '{text}' is invalid ('{part}'); {expected}")
            if int(b) < int(a):
                raise ConfigError(f"--layers '{text}' has a reversed range '{part}'; expected FIRST-LAST with "
                                  f"FIRST <= LAST, e.g. {b}-{a}")
            out.extend(range(int(a), int(b) + 1))
        elif part.lstrip("-").isdigit():
            out.append(int(part))
        else:
            raise ConfigError(f"--layers '{text}' is invalid ('{part}'); {expected}")
    return out


def parse_target_l0(text: str) -> float | list[float]:
    """``--target-l0``: one number, or a comma list with one number per layer (same order as --layers)."""
    expected = f"expected a number > 0 (at most {MAX_REAL:g}), or a comma list with one per layer, e.g. 32 or 16,32"
    parts = [p.strip() for p in str(text).split(",")]
    values: list[float] = []
    for part in parts:
        try:
            v = float(part)
        except ValueError:
            raise ConfigError(f"--target-l0 {text} is invalid ('{part}' is not a number); {expected}") from None
        if not (math.isfinite(v) and 0 < v <= MAX_REAL):
            raise ConfigError(f"--target-l0 {text} is invalid; {expected}")
        values.append(v)
    return values[0] if len(values) == 1 else values


def progress_enabled() -> bool:
    """Progress bars unless ``SPARSETRACE_NO_PROGRESS=1`` (the test suite sets it)."""
    import os

    return os.environ.get("SPARSETRACE_NO_PROGRESS") != "1"
