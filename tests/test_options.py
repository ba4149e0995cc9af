"""Every option of every command, walked from the CLI itself, refuses hostile values the same way: a non-zero
exit, one ``error:`` line naming the option, no traceback, no model loaded and no hang.

New options are covered without editing this file: the walk reads the click parameters of the typer app.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from sparsetrace import cli as cli_mod
from sparsetrace.cli_options import rule_for

INT_VALUES = ["0", "-1", "-3", str(2**63), "1" + "0" * 30, "1e308", "nan", ""]
FLOAT_VALUES = ["0", "-1", "-3", "nan", "inf", "-inf", "1e308", "-1e308", ""]
TEXT_VALUES = ["", "   "]
SECONDS_PER_CALL = 10


def _kind(param) -> type | None:
    desc = getattr(param, "type_descriptor", None)
    ann = getattr(desc, "annotation", None)
    if ann is None:  # a plain click parameter (older typer)
        ann = {"integer": int, "float": float, "text": str, "path": Path}.get(getattr(param.type, "name", ""))
    if ann in (int, float, str, Path):
        return ann
    if "Path" in str(ann):  # list[Path]
        return Path
    return None


def _flag(param) -> str | None:
    if getattr(param, "param_type_name", "") != "option":
        return None
    return next(o for o in param.opts if o.startswith("--"))


def _accepted(command: str, param, kind: type, raw: str) -> bool:
    """True when the option's declared rule takes ``raw`` (then it is no hostile value for this option)."""
    try:
        value = kind(raw)
    except (ValueError, OverflowError):
        return False
    rule = rule_for(command, param.name, kind)
    if kind is str:
        return raw != "" and (rule.blank or bool(raw.strip()))
    return rule.accepts(value)


def _cases(tmp: Path):
    root = cli_mod.command()
    for name, sub in sorted(root.commands.items()):
        for param in sub.params:
            kind = _kind(param)
            if kind is None:
                continue
            values = {int: INT_VALUES, float: FLOAT_VALUES}.get(kind, TEXT_VALUES)
            for raw in values:
                if kind in (int, float) and _accepted(name, param, kind, raw):
                    continue
                if kind in (str, Path) and _accepted(name, param, str, raw):
                    continue
                yield name, sub, param, raw


def _argv(name: str, sub, tested, raw: str, tmp: Path) -> list[str]:
    """``name`` with ``raw`` for the tested parameter and values that parse for every other required one."""
    args: list[str] = [name]
    for p in sub.params:
        if p is tested:
            value = raw
        elif p.required:
            value = {int: "1", float: "1.0", str: "x"}.get(_kind(p), str(tmp))
            value = "1:0" if p.name == "feature" else value
        else:
            continue
        flag = _flag(p)
        args += [flag, value] if flag else [value]
    return args


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    def hang(signum, frame):
        raise TimeoutError(f"`sparsetrace {' '.join(argv)}` took over {SECONDS_PER_CALL} s")

    old_argv, old_handler = sys.argv, signal.signal(signal.SIGALRM, hang)
    sys.argv = ["sparsetrace", *argv]
    signal.alarm(SECONDS_PER_CALL)
    code = 0
    try:
        cli_mod.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_handler)
        sys.argv = old_argv
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture()
def no_model(monkeypatch):
    """Validation happens before any model loads: loading one fails the test."""
    from sparsetrace.model.adapter import LanguageModel

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(LanguageModel, "load", classmethod(refuse))


def test_every_option_refuses_hostile_values(tmp_path, capsys, no_model):
    tried: dict[str, int] = {}
    for name, sub, param, raw in _cases(tmp_path):
        flag = _flag(param)
        argv = _argv(name, sub, param, raw, tmp_path)
        code, out, err = _run(capsys, argv)
        errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert code != 0, (argv, out, err)
        assert len(errors) == 1 and "Traceback" not in err + out, (argv, err)
        assert (flag or param.name.upper()) in errors[0] or "invalid value" in errors[0].lower(), (argv, errors)
        tried[f"{name} {flag or param.name}"] = tried.get(f"{name} {flag or param.name}", 0) + 1
    n_values = sum(tried.values())
    print(f"\n{len(tried)} options x hostile values: {n_values} calls")
    # every numeric option of these commands is walked (a sample that must be present)
    for must in ("evaluate --n-windows", "steer --scale", "trace --node-threshold", "train --lr", "serve --port",
                 "trace --prompt", "train --model"):
        assert must in tried, must
    assert n_values >= 200


@pytest.mark.parametrize("argv, expected", [
    (["evaluate", "RUN", "--n-windows", "0"], "--n-windows 0"),
    (["evaluate", "RUN", "--n-windows", "-3"], "--n-windows -3"),
    (["steer", "-d", "RUN", "--feature", "6:12", "--prompt", "Hello", "--scale", "nan"], "--scale nan"),
    (["steer", "-d", "RUN", "--feature", "6:12", "--prompt", "Hello", "--scale", "inf"], "--scale inf"),
    (["trace", "-d", "RUN", "--prompt", "", "--target", " x"], "--prompt is empty"),
    (["trace", "-d", "RUN", "--target", " x"], "--target ' x' needs --prompt"),
    (["trace", "-d", "RUN", "--task", "ioi", "--target", " x"], "--target ' x' needs --prompt"),
    (["trace", "-d", "RUN", "--prompt", "The cat"], "--prompt needs --target"),
])
def test_reported_cases(argv, expected, tmp_path, capsys, no_model):
    argv = [str(tmp_path) if a == "RUN" else a for a in argv]
    code, out, err = _run(capsys, argv)
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert len([ln for ln in err.splitlines() if ln.startswith("error: ")]) == 1


def test_defaults_pass_their_own_rules(tmp_path, capsys):
    """Every command's --help parses (defaults are checked too, so a rule stricter than a default shows here)."""
    for name in cli_mod.command().commands:
        code, out, err = _run(capsys, [name, "--help"])
        assert code == 0 and "error" not in err, (name, err)
