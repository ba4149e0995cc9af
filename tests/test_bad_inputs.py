"""Bad-input matrix: every user mistake ends in one clean ``error: ...`` line, never a traceback.

CLI cases run the real command line (``python -m sparsetrace.cli ...``), one subprocess per case,
offline, on the tiny test model ``tiny-llama`` with a small corpus. All subprocesses are started
together on first use (a few at a time) so the whole file stays well under a minute and a half on a
loaded 2-core machine. For each case we assert: a non-zero exit status, stderr is exactly one line
starting with ``error:``, it names the bad value and what was expected, and there is no traceback.

Where the CLI does not reach a check (yet), the library function is called and the
``SparsetraceError`` subclass is asserted.

How "cannot write" is produced (tests run as root, so ``chmod`` does not stop writes):

- ``--out <regular file>/sub``: the parent is a regular file (ENOTDIR);
- ``--out /proc/sparsetrace-test/out``: a folder under ``/proc`` cannot be created;
- a full disk: a 64 KiB tmpfs mounted under the test's tmp dir (skipped when mounting is not
  permitted), used as the output folder and as the activation cache folder.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from sparsetrace.dictionary.io import save_dictionary
from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary
from sparsetrace.errors import (
    ConfigError,
    DataError,
    DictionaryFileError,
    HookpointError,
    SparsetraceError,
    TrainingDiverged,
)

CLI_TIMEOUT = 240
WORKERS = 2
TEXTS = [
    "Once upon a time there was a little fox who lived in the woods near a river.",
    "The quick brown fox jumps over the lazy dog, and then it runs far away home.",
    "Mary and John went to the store. John gave a drink to Mary because she was thirsty.",
    "In 1732 the war began, and it lasted until the year 1748 when peace returned.",
]


# ============================================================================================ fixtures
def _corpus_text() -> str:
    return "\n\n".join(f"{t} Story number {i}. " * 3 for i in range(15) for t in TEXTS)


def _write_dictionary(folder: Path, *, d_model: int = 64, layer: int = 1, model_id: str = "tiny-llama") -> Path:
    cfg = DictionaryConfig(kind="transcoder", d_in=d_model, d_out=d_model, n_features=2 * d_model, layer=layer,
                           hookpoint_in="mlp_in", hookpoint_out="mlp_out", model_id=model_id)
    return save_dictionary(SparseDictionary(cfg, seed=0), folder)


def _make_files(root: Path) -> dict[str, Path]:
    """Every input file the CLI cases need."""
    f: dict[str, Path] = {}
    f["corpus"] = root / "corpus.txt"
    f["corpus"].write_text(_corpus_text(), encoding="utf-8")
    f["empty"] = root / "empty.txt"
    f["empty"].write_bytes(b"")
    f["latin1"] = root / "latin1.txt"
    f["latin1"].write_bytes("Un café au lait, s'il vous plaît. ".encode("latin-1") * 20)
    f["a_file"] = root / "a-regular-file"
    f["a_file"].write_text("not a folder\n")

    # a valid run trained on tiny-llama (a dictionary folder written the way training writes it)
    f["run"] = root / "run"
    _write_dictionary(f["run"] / "L01_transcoder")
    # the same, but with d_model 32 (a dictionary for another model of the same name)
    f["run32"] = root / "run32"
    _write_dictionary(f["run32"] / "L01_transcoder", d_model=32)

    weights = (f["run"] / "L01_transcoder" / "weights.safetensors").read_bytes()
    config = (f["run"] / "L01_transcoder" / "config.json").read_bytes()

    def dict_folder(name: str, w: bytes | None, c: bytes | None = config, manifest: bytes | None = None) -> Path:
        d = root / name / "L01_transcoder"
        d.mkdir(parents=True)
        if w is not None:
            (d / "weights.safetensors").write_bytes(w)
        if c is not None:
            (d / "config.json").write_bytes(c)
        if manifest is not None:
            (d / "manifest.json").write_bytes(manifest)
        return d.parent

    corrupt = bytearray(weights)
    corrupt[8:40] = b"\xff" * 32  # garbage in the safetensors JSON header
    f["corrupt"] = dict_folder("corrupt", bytes(corrupt))
    flipped = bytearray(weights)
    flipped[-5] ^= 0x40  # one bit in the tensor data: only the sha256 manifest can notice
    manifest = (f["run"] / "L01_transcoder" / "manifest.json").read_bytes()
    f["corrupt_sha"] = dict_folder("corrupt-sha", bytes(flipped), manifest=manifest)
    f["truncated"] = dict_folder("truncated", weights[: len(weights) // 2])
    f["bad_manifest"] = dict_folder("bad-manifest", weights, manifest=b'{"files": ')
    saelens_like = json.dumps({"architecture": "standard", "d_in": 64, "d_sae": 128, "hook_name": "x"}).encode()
    f["foreign_config"] = dict_folder("foreign-config", weights, c=saelens_like)

    f["bad_heldout"] = root / "bad-heldout"
    shutil.copytree(f["run"], f["bad_heldout"])
    (f["bad_heldout"] / "heldout_tokens.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")

    f["pickle"] = root / "sae.pt"
    torch.save({"W_enc": torch.zeros(2, 2)}, f["pickle"])

    f["bad_resume"] = root / "bad-resume"
    f["bad_resume"].mkdir()
    (f["bad_resume"] / "train_config.json").write_text('{"model": "tiny-llama", "layers": [1')
    f["report"] = root / "report"
    f["report"].mkdir()
    return f


@dataclass
class Case:
    """One CLI invocation and what its single error line must contain."""

    args: list[str]
    expect: list[str]  # substrings (case-insensitive): the bad value and what was expected
    note: str = ""
    xfail: str | None = None  # a known bug outside this engineer's files (fix proposed)
    env: dict[str, str] = field(default_factory=dict)


def _train(f: dict[str, Path], out: Path, *extra: str) -> list[str]:
    base = ["train", "--model", "tiny-llama", "--layers", "1", "--corpus", str(f["corpus"]), "--n-tokens", "500",
            "--epochs", "1", "--context", "32", "--batch-size", "64", "--expansion", "2", "--out", str(out)]
    # later flags win: the case's flags are appended
    return [*base, *extra]


def _cases(f: dict[str, Path], root: Path, port: int) -> dict[str, Case]:
    o = root / "out"
    return {
        # 1-2: models
        "unknown_model": Case(_train(f, o / "1", "--model", "no-such-model"),
                              ["'no-such-model'", "known short name", "tiny-llama"]),
        "hub_model_offline": Case(_train(f, o / "2", "--model", "someorg/some-model"),
                                  ["'someorg/some-model'", "offline"]),
        # 3-4: hookpoints and layers
        "unknown_hookpoint": Case(_train(f, o / "3", "--kind", "sae", "--hookpoint", "mlp_mid"),
                                  ["mlp_mid", "expected one of", "resid_pre"]),
        "layer_out_of_range": Case(_train(f, o / "4", "--layers", "99"), ["layer 99", "expected 0..3"]),
        # 5: dictionary does not match the model
        "evaluate_other_model": Case(["evaluate", str(f["run"]), "--model", "tiny-gpt2", "--corpus", str(f["corpus"]),
                                      "--n-windows", "2"], ["'tiny-llama'", "'tiny-gpt2'"]),
        "evaluate_other_d_model": Case(["evaluate", str(f["run32"]), "--corpus", str(f["corpus"]), "--n-windows", "2"],
                                       ["d_in=32", "d_model=64"]),
        # 6-8: dictionary files
        "corrupt_safetensors": Case(["evaluate", str(f["corrupt"])], ["weights.safetensors", "corrupt"]),
        "corrupt_sha256": Case(["evaluate", str(f["corrupt_sha"])], ["weights.safetensors", "sha256"]),
        "truncated_safetensors": Case(["evaluate", str(f["truncated"])], ["weights.safetensors", "truncated"]),
        "pickle_refused": Case(["evaluate", str(f["pickle"])], ["sae.pt", "refusing", "safetensors"]),
        "corrupt_manifest": Case(["evaluate", str(f["bad_manifest"])], ["manifest.json", "corrupt", "expected"]),
        "foreign_config": Case(["evaluate", str(f["foreign_config"])], ["config.json", "expected 'sparsetrace-dictionary"]),
        "corrupt_heldout_tokens": Case(["evaluate", str(f["bad_heldout"])],
                                       ["heldout_tokens.safetensors", "corrupt", "--corpus"]),
        "missing_run_folder": Case(["evaluate", str(root / "no-such-run")], ["no-such-run", "expected a run folder"]),
        # 9: NaN loss
        "nan_loss": Case(_train(f, o / "9", "--lr", "1e30", "--checkpoint-every", "1"),
                         ["finite loss", "step", "checkpoint", str(o / "9")]),
        # 10, 12: corpora
        "empty_corpus": Case(_train(f, o / "10", "--corpus", str(f["empty"])), ["empty.txt", "no text"]),
        "non_utf8_corpus": Case(_train(f, o / "12", "--corpus", str(f["latin1"])),
                                ["latin1.txt", "not utf-8", "expected utf-8"]),
        # 13: invalid config values
        "negative_l1": Case(_train(f, o / "13a", "--l1", "-1"), ["--l1", "-1", "expected a number > 0"]),
        "k_above_n_features": Case(_train(f, o / "13b", "--activation", "topk", "--k", "1000", "--n-features", "64"),
                                   ["--k 1000", "n-features 64", "expected k <= n_features"]),
        "target_l0_zero": Case(_train(f, o / "13c", "--target-l0", "0"), ["--target-l0 0", "expected a number > 0"]),
        "unknown_activation": Case(_train(f, o / "13d", "--activation", "gelu"), ["'gelu'", "expected one of"]),
        "unknown_preset": Case(["run", "--preset", "nope", "--model", "tiny-llama", "--out", str(o / "13e")],
                               ["'nope'", "expected one of", "quick"]),
        "unknown_model_dtype": Case(["run", "--model-dtype", "float16", "--model", "tiny-llama", "--out", str(o / "13f")],
                                    ["--model-dtype 'float16'", "expected float32 or bfloat16"]),
        "resume_corrupt_train_config": Case(_train(f, f["bad_resume"], "--resume"),
                                            ["train_config.json", "not json"]),
        # 14: cannot write the output
        "out_parent_is_a_file": Case(_train(f, f["a_file"] / "sub"), ["a-regular-file/sub", "not writable", "--out"]),
        "out_under_proc": Case(_train(f, Path("/proc/sparsetrace-test/out")),
                               ["/proc/sparsetrace-test/out", "not writable", "--out"]),
        # 15: port in use
        "port_in_use": Case(["serve", str(f["report"]), "--port", str(port)],
                            [f"port {port}", "already in use", "--port"]),
        # usage errors found by typer itself
        "non_numeric_option": Case(_train(f, o / "u1", "--lr", "abc"), ["'--lr'", "valid number"]),
        "unknown_command": Case(["trian"], ["'trian'", "train"]),
        # --debug shows the traceback instead (checked separately below)
    }


# The CLI cases run in processes forked from one "zygote": a fresh interpreter that has imported
# torch, transformers and the library (but not sparsetrace.cli) once. Each case is one forked child
# that runs ``sparsetrace.cli`` as ``__main__`` with runpy, exactly like ``python -m sparsetrace.cli``,
# with its own argv, stdout, stderr and exit status. This avoids paying ~2-4 s of torch/transformers
# import per case, which would push the file past 90 s on a loaded 2-core box. Two cases also run as
# real ``python -m sparsetrace.cli`` subprocesses, and the zygote's own stderr must stay empty (an
# import-time warning would also reach users' stderr).
_ZYGOTE = r"""
import json, os, runpy, signal, sys, time, traceback
for mod in ("torch", "numpy", "typer", "safetensors.torch", "transformers",
            "transformers.models.llama.modeling_llama", "transformers.models.gpt2.modeling_gpt2",
            "sparsetrace.train.pipeline", "sparsetrace.evaluate.job", "sparsetrace.report.server"):
    __import__(mod)
assert "sparsetrace.cli" not in sys.modules
workers, timeout = int(sys.argv[1]), float(sys.argv[2])
specs = json.loads(sys.stdin.read())
running = {}


def child(spec):
    code = 1
    try:
        for fd, path in ((1, spec["stdout"]), (2, spec["stderr"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.argv = ["sparsetrace", *spec["args"]]
        try:
            runpy.run_module("sparsetrace.cli", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def report(name, rc, timed_out=False):
    sys.stdout.write(json.dumps({"name": name, "rc": rc, "timed_out": timed_out}) + "\n")
    sys.stdout.flush()


queue = list(specs)
while queue or running:
    while queue and len(running) < workers:
        spec = queue.pop(0)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(spec)
        running[pid] = (spec["name"], time.monotonic())
    pid, status = os.waitpid(-1, os.WNOHANG)
    if pid:
        name, _ = running.pop(pid)
        report(name, os.waitstatus_to_exitcode(status))
        continue
    for pid, (name, t0) in list(running.items()):
        if time.monotonic() - t0 > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            running.pop(pid)
            report(name, -9, True)
    time.sleep(0.02)
"""


class _Runner:
    """Starts every CLI case once in the background (see above); tests collect the results."""

    def __init__(self, root: Path):
        self.root = root
        self.files = _make_files(root)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(1)
        self.port = self._sock.getsockname()[1]
        self.cases = _cases(self.files, root, self.port)
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "SPARSETRACE_CACHE": str(root / "cache"),
            "SPARSETRACE_NO_PROGRESS": "1",
        }
        for k in ("SPARSETRACE_DEBUG", "PYTHONWARNINGS"):
            self.env.pop(k, None)
        logs = root / "logs"
        logs.mkdir()
        self._results: dict[str, dict] = {}
        self._cond = threading.Condition()
        self._zygote_err = open(logs / "zygote.stderr", "w+")  # noqa: SIM115 - closed in close()
        self.zygote = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE, str(WORKERS), str(CLI_TIMEOUT)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._zygote_err, env=self.env, cwd=root, text=True)
        specs = [{"name": n, "args": c.args, "stdout": str(logs / f"{n}.out"), "stderr": str(logs / f"{n}.err")}
                 for n, c in self.cases.items()]
        self.zygote.stdin.write(json.dumps(specs))
        self.zygote.stdin.close()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        # two cases through the real entry point as well, side by side with the zygote
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cli-real")
        self.real: dict[str, Future] = {
            "_debug": self.pool.submit(self.run, ["--debug", "train", "--target-l0", "0",
                                                  "--out", str(root / "out" / "debug")]),
            "target_l0_zero": self.pool.submit(self.run, self.cases["target_l0_zero"].args),
        }

    def _read(self) -> None:
        for line in self.zygote.stdout:
            row = json.loads(line)
            with self._cond:
                self._results[row["name"]] = row
                self._cond.notify_all()
        with self._cond:
            self._results.setdefault("_zygote_exit", {"rc": self.zygote.wait()})
            self._cond.notify_all()

    def result(self, name: str) -> subprocess.CompletedProcess:
        with self._cond:
            ok = self._cond.wait_for(lambda: name in self._results or "_zygote_exit" in self._results,
                                     timeout=CLI_TIMEOUT * (1 + len(self.cases) // WORKERS))
        assert ok and name in self._results, f"no result for case {name!r}; zygote: {self.zygote_stderr()}"
        row = self._results[name]
        assert not row["timed_out"], f"case {name!r} ran longer than {CLI_TIMEOUT} s"
        logs = self.root / "logs"
        return subprocess.CompletedProcess(["sparsetrace", *self.cases[name].args], row["rc"],
                                           (logs / f"{name}.out").read_text(), (logs / f"{name}.err").read_text())

    def zygote_stderr(self) -> str:
        self._zygote_err.flush()
        return Path(self._zygote_err.name).read_text()

    def run(self, args: list[str]) -> subprocess.CompletedProcess:
        """One real ``python -m sparsetrace.cli`` subprocess."""
        return subprocess.run([sys.executable, "-m", "sparsetrace.cli", *args], env=self.env, cwd=self.root,
                              capture_output=True, text=True, timeout=CLI_TIMEOUT)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.zygote.poll() is None:
            self.zygote.kill()
        self.zygote.wait()
        self._zygote_err.close()
        self._sock.close()


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    r = _Runner(tmp_path_factory.mktemp("bad-inputs"))
    yield r
    r.close()


CASE_NAMES = [
    "unknown_model", "hub_model_offline", "unknown_hookpoint", "layer_out_of_range", "evaluate_other_model",
    "evaluate_other_d_model", "corrupt_safetensors", "corrupt_sha256", "truncated_safetensors", "pickle_refused",
    "corrupt_manifest", "foreign_config", "corrupt_heldout_tokens", "missing_run_folder", "nan_loss", "empty_corpus", "non_utf8_corpus",
    "negative_l1", "k_above_n_features", "target_l0_zero", "unknown_activation", "unknown_preset",
    "unknown_model_dtype",    "resume_corrupt_train_config", "out_parent_is_a_file", "out_under_proc", "port_in_use", "non_numeric_option",
    "unknown_command",
]


def assert_clean_error(proc: subprocess.CompletedProcess, expect: list[str], progress_lines: bool = False) -> str:
    """One `error: ...` line on stderr, naming the expected strings. With progress_lines, the command may first
    have logged what it was doing (e.g. "loading model ...") on stderr; the error must still be the one last line."""
    cmd = " ".join(map(str, proc.args)) if isinstance(proc.args, list) else proc.args
    assert "Traceback" not in proc.stderr, f"{cmd}\n{proc.stderr}"
    assert proc.returncode != 0, f"{cmd} exited 0\n{proc.stdout}"
    lines = proc.stderr.splitlines()
    if progress_lines:
        assert lines and not any(x.startswith("error") for x in lines[:-1]), f"{cmd}:\n{proc.stderr}"
        lines = lines[-1:]
    assert len(lines) == 1, f"{cmd}: stderr should be one line, got {len(lines)}:\n{proc.stderr}"
    line = lines[0]
    assert line.startswith("error: "), f"{cmd}: {line!r}"
    for s in expect:
        assert s.lower() in line.lower(), f"{cmd}: {s!r} not in {line!r}"
    return line


@pytest.mark.parametrize("name", CASE_NAMES)
def test_cli_bad_input(runner, name):
    case = runner.cases[name]
    proc = runner.result(name)
    if case.xfail:
        try:
            assert_clean_error(proc, case.expect)
        except AssertionError as e:
            pytest.xfail(f"{case.xfail}: {str(e).splitlines()[0]}")
        return
    line = assert_clean_error(proc, case.expect)
    assert proc.returncode == 2, line


def test_case_list_is_complete(runner):
    assert sorted(CASE_NAMES) == sorted(runner.cases)


def test_real_entry_point_same_as_forked(runner):
    """``python -m sparsetrace.cli`` in a fresh interpreter gives the same result as the forked child."""
    real = runner.real["target_l0_zero"].result()
    forked = runner.result("target_l0_zero")
    assert (real.returncode, real.stderr, real.stdout) == (forked.returncode, forked.stderr, forked.stdout)


def test_zygote_imports_are_silent(runner):
    """Nothing is printed while importing torch/transformers/sparsetrace (users would see it too)."""
    for name in CASE_NAMES:
        runner.result(name)
    assert runner.zygote_stderr() == ""


def test_cli_debug_shows_traceback(runner):
    proc = runner.real["_debug"].result()
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr and "--target-l0" in proc.stderr


def test_cli_nan_loss_keeps_last_checkpoint(runner):
    """Whatever the stderr formatting, the diverged run keeps its last good checkpoint and no dictionary."""
    proc = runner.result("nan_loss")
    out = runner.root / "out" / "9"
    assert proc.returncode == 2, proc.stderr
    assert "TrainingDiverged" not in proc.stderr and "Traceback" not in proc.stderr
    ckpt = out / ".checkpoints" / "L01_transcoder"
    assert (ckpt / "state.safetensors").is_file() and (ckpt / "manifest.json").is_file()
    assert not (out / "L01_transcoder" / "weights.safetensors").exists()
    step = json.loads((ckpt / "state.json").read_text())["step"]
    assert f"step {step}" in proc.stderr


def test_cli_nan_stderr_would_be_one_line_without_warning(runner):
    """The NaN case's one error line names the loss, the kept checkpoint and --resume."""
    proc = runner.result("nan_loss")
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    # the loss at --lr 1e30 is inf or nan depending on the order of the step's arithmetic; either is named
    assert ("nan" in errors[0] or "inf" in errors[0]) and "finite loss" in errors[0]
    assert "--resume" in errors[0] and ".checkpoints" in errors[0]


def _trace_command():
    import typer.main

    from sparsetrace.cli import app

    cmd = typer.main.get_command(app)
    sub = getattr(cmd, "commands", {}).get("trace")
    assert sub is not None, "`sparsetrace trace` is missing from the CLI"
    return sub


def _trace_args(runner, prompt: str, target: str | None) -> list[str]:
    sub = _trace_command()
    args: list[str] = ["trace"]
    for p in sub.params:
        # typer vendors its own click, so compare the kind by name rather than by class
        opt = getattr(p, "param_type_name", "") == "option"
        flag = p.opts[0] if opt else None
        value: str | None = None
        if p.name == "prompt":
            value = prompt
        elif p.name == "target":
            value = target
        elif p.name == "model":
            value = "tiny-llama"
        elif p.name in ("run_dir", "run", "dictionaries", "transcoders", "dicts"):
            value = str(runner.files["run"])
        else:
            assert not p.required, f"`sparsetrace trace` has a required parameter {p.name!r} this test does not know"
        if value is None:
            continue
        args += [flag, value] if opt else [value]
    return args


def test_cli_trace_prompt_too_long(runner):
    proc = runner.run(_trace_args(runner, "hello world " * 300, " world"))
    assert_clean_error(proc, ["256"], progress_lines=True)


def test_cli_trace_target_not_single_token(runner):
    proc = runner.run(_trace_args(runner, "When Mary and John went to the store, John gave a drink to", " Mary had"))
    assert_clean_error(proc, ["' Mary had'", "single token"], progress_lines=True)


# ============================================================================================ library level
@pytest.fixture(scope="module")
def lm():
    from sparsetrace.model.adapter import LanguageModel

    return LanguageModel.load("tiny-llama")


def test_lib_prompt_longer_than_context(lm):
    with pytest.raises(DataError, match=r"tokens long; this model's context is 256 tokens"):
        lm.tokenize("hello world " * 300)
    with pytest.raises(DataError, match="empty"):
        lm.tokenize("   ")


def test_lib_target_not_single_token(lm):
    with pytest.raises(DataError, match=r"' Mary had'.*expected a single token"):
        lm.single_token_id(" Mary had")


def test_lib_unknown_hookpoint_and_layer(lm):
    from sparsetrace.model.hookpoints import Hookpoint

    with pytest.raises(HookpointError, match="'mlp_mid'.*expected one of"):
        lm.check(Hookpoint("mlp_mid", 1))
    with pytest.raises(HookpointError, match=r"layer 99.*expected 0\.\.3"):
        lm.check(Hookpoint("mlp_in", 99))
    with pytest.raises(HookpointError, match="NAME.LAYER"):
        Hookpoint.parse("mlp_in")


def test_lib_nan_activations_name_the_hookpoint(lm, tmp_path):
    """A model whose weights produce NaN: harvest stops with a DataError naming the hookpoint."""
    from sparsetrace.data.store import harvest
    from sparsetrace.model.adapter import LanguageModel
    from sparsetrace.model.hookpoints import Hookpoint

    model = copy.deepcopy(lm.model)
    with torch.no_grad():
        next(model.model.layers[2].mlp.parameters()).fill_(float("nan"))
    bad = LanguageModel(model, lm.tokenizer, "tiny-llama-nan")
    windows = torch.randint(0, 200, (4, 16))
    hps = [Hookpoint("mlp_in", 1), Hookpoint("mlp_out", 2)]
    with pytest.raises(DataError, match=r"NaN/inf\) at hookpoint mlp_out\.2"):
        harvest(bad, windows, hps, cache_dir=tmp_path / "cache", progress=False)
    assert not any((tmp_path / "cache").glob("*.partial")), "the half-written cache was not removed"


def _train_cfg(corpus: Path, **kw):
    from sparsetrace.train.config import TrainConfig

    base = dict(model="tiny-llama", layers=[1], corpus=str(corpus), context=32, n_tokens=500, epochs=1.0,
                batch_size=64, expansion=2, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture()
def corpus(tmp_path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(_corpus_text(), encoding="utf-8")
    return p


@pytest.mark.filterwarnings("error:Converting a tensor with requires_grad=True")
def test_lib_nan_loss_raises_training_diverged(lm, tmp_path, corpus):
    from sparsetrace.train.pipeline import run_training

    out = tmp_path / "run"
    cfg = _train_cfg(corpus, lr=1e30, checkpoint_every=1)
    with pytest.raises(TrainingDiverged) as info:
        run_training(cfg, out, lm=lm, progress=False, cache_dir=tmp_path / "cache")
    msg = str(info.value)
    ckpt = out / ".checkpoints" / "L01_transcoder"
    step = json.loads((ckpt / "state.json").read_text())["step"]
    assert "nan" in msg and f"(step {step})" in msg and str(out / ".checkpoints") in msg and "--resume" in msg
    assert not (out / "L01_transcoder" / "weights.safetensors").exists()


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(l1_init=-1.0), r"--l1 \(initial λ\) -1.0 is invalid; expected a number > 0"),
        (dict(target_l0=0), "--target-l0 0 is invalid"),
        (dict(activation="topk", k=1000, n_features=64), "--k 1000 is larger than --n-features 64"),
        (dict(kind="sae", hookpoint="mlp_mid"), "--hookpoint 'mlp_mid' is unknown"),
        (dict(layers=[-1]), "layer -1 is out of range"),
        (dict(layers=[]), "--layers is empty"),
        (dict(lr=float("nan")), "--lr nan is invalid"),
        (dict(context=1), "--context 1"),
        (dict(batch_size=0), "--batch-size 0"),
    ],
)
def test_lib_invalid_config_values(kw, match, corpus):
    with pytest.raises(ConfigError, match=match):
        _train_cfg(corpus, **kw).validate()


def test_lib_k_above_expansion_features_fails_before_harvest(lm, tmp_path, corpus, monkeypatch):
    """With n_features from --expansion, k is checked once d_model is known, before any harvesting."""
    from sparsetrace.train import pipeline

    def no_harvest(*a, **k):
        raise AssertionError("harvest should not run")

    monkeypatch.setattr(pipeline, "harvest", no_harvest)
    with pytest.raises(ConfigError, match="--k 1000 is larger than n_features=128"):
        pipeline.run_training(_train_cfg(corpus, activation="topk", k=1000), tmp_path / "run", lm=lm, progress=False)


def test_lib_batch_larger_than_tokens(lm, tmp_path, corpus):
    from sparsetrace.train.pipeline import run_training

    with pytest.raises(DataError, match="batch size 100000 is larger than the .* harvested tokens"):
        run_training(_train_cfg(corpus, batch_size=100000), tmp_path / "run", lm=lm, progress=False,
                     cache_dir=tmp_path / "cache")


def test_lib_corpus_errors(tmp_path):
    from sparsetrace.data.corpus import load_texts
    from sparsetrace.data.tokens import tokenize_windows

    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="contains no text"):
        load_texts(str(tmp_path / "empty.txt"))
    with pytest.raises(DataError, match="contains no text"):
        load_texts(str(tmp_path / "blank.txt"))
    with pytest.raises(DataError, match="not UTF-8: byte 0xe9 at offset 3"):
        load_texts(str(tmp_path / "latin1.txt"))
    with pytest.raises(DataError, match="line 2 has no string field"):
        load_texts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(DataError, match="unsupported extension '.csv'"):
        load_texts(str(tmp_path / "data.csv"))
    with pytest.raises(DataError, match="does not exist"):
        load_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="matched no files"):
        load_texts(str(tmp_path / "*.nothing"))
    with pytest.raises(DataError, match="unknown corpus 'austenn'"):
        load_texts("austenn")
    from sparsetrace.model.zoo import ByteTokenizer

    with pytest.raises(DataError, match="only 3 tokens"):
        tokenize_windows(ByteTokenizer(), ["ab"], 32)


def test_lib_dictionary_file_errors(tmp_path):
    from sparsetrace.dictionary.io import find_dictionaries
    from sparsetrace.dictionary.load import load_dictionary

    folder = _write_dictionary(tmp_path / "ok" / "L01_transcoder")
    with pytest.raises(DictionaryFileError, match="refusing to load .*model.bin"):
        load_dictionary(tmp_path / "model.bin")
    with pytest.raises(DictionaryFileError, match="refusing to load .*sae.pt"):
        find_dictionaries(tmp_path / "sae.pt")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DictionaryFileError, match="is a file; expected a run folder"):
        find_dictionaries(tmp_path / "notes.txt")
    assert find_dictionaries(folder / "weights.safetensors") == [folder]
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "manifest.json").unlink()
    for key, value, match in [
        ("format", 1, "format=1"),
        ("n_features", "128", "n_features='128' is invalid"),
        ("layer", -2, "layer=-2 is invalid"),
        ("n_features", 10**12, r"tensor 'W_enc' has shape \[128, 64\]; expected \[1000000000000, 64\]"),
    ]:
        (folder / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(DictionaryFileError, match=match):
            load_dictionary(folder)


def test_lib_manifest_cannot_point_outside(tmp_path):
    from sparsetrace.dictionary.load import load_dictionary

    folder = _write_dictionary(tmp_path / "d")
    (folder / "manifest.json").write_text(json.dumps({"files": {"../../etc/passwd": "0" * 64}}))
    with pytest.raises(DictionaryFileError, match="not a file name"):
        load_dictionary(folder)


# ------------------------------------------------------------------------------------------ a full disk
@pytest.fixture()
def full_disk(tmp_path):
    """A 64 KiB tmpfs (skipped when this process may not mount)."""
    mnt = tmp_path / "tiny-fs"
    mnt.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs root and mount(8) for a tiny tmpfs")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0777", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_lib_full_output_disk(lm, tmp_path, corpus, full_disk):
    from sparsetrace.train.pipeline import run_training

    with pytest.raises(ConfigError, match=r"cannot write '.*run.*' \(.*No space left on device"):
        run_training(_train_cfg(corpus), full_disk / "run", lm=lm, progress=False, cache_dir=tmp_path / "cache")
    leftovers = [p.name for p in (full_disk / "run").iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, leftovers


def test_lib_full_cache_disk(lm, full_disk):
    """Harvesting into a full disk used to die with SIGBUS (a sparse memmap); now it is a clean error."""
    from sparsetrace.data.store import harvest
    from sparsetrace.model.hookpoints import Hookpoint

    windows = torch.randint(0, 200, (64, 32))
    with pytest.raises(ConfigError, match="cannot write the activation cache .*SPARSETRACE_CACHE"):
        harvest(lm, windows, [Hookpoint("mlp_in", 1), Hookpoint("mlp_out", 1)], cache_dir=full_disk, progress=False)
    assert not list(full_disk.iterdir())


def test_lib_port_in_use(tmp_path):
    from sparsetrace.report.server import make_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(SparsetraceError, match=f"port {port} on 127.0.0.1 is already in use"):
            make_server(tmp_path, port=port)
    with pytest.raises(SparsetraceError, match="non-loopback"):
        make_server(tmp_path, host="0.0.0.0", port=0)


# ------------------------------------------------------------------------------------------ caches and archives
def test_lib_corrupt_activation_cache_is_rebuilt(lm, tmp_path):
    """A damaged cache (bad meta.json, truncated .npy) is a DataError and harvest rebuilds it."""
    from sparsetrace.data.store import ActivationCache, harvest
    from sparsetrace.model.hookpoints import Hookpoint

    windows = torch.randint(0, 200, (4, 16))
    hps = [Hookpoint("mlp_in", 1), Hookpoint("mlp_out", 1)]
    cache = harvest(lm, windows, hps, cache_dir=tmp_path, progress=False)
    folder, reference = cache.folder, cache.get("mlp_out.1", slice(None)).clone()
    del cache
    npy = folder / "mlp_out.1.npy"
    npy.write_bytes(npy.read_bytes()[: npy.stat().st_size // 2])
    with pytest.raises(DataError, match="activation cache .* is corrupt"):
        ActivationCache(folder)
    rebuilt = harvest(lm, windows, hps, cache_dir=tmp_path, progress=False)
    assert torch.equal(rebuilt.get("mlp_out.1", slice(None)), reference)
    (folder / "meta.json").write_text('{"model_id": 3}')
    with pytest.raises(DataError, match="unreadable meta.json"):
        ActivationCache(folder)


def _ar_member(name: str, body: bytes) -> bytes:
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(body):<10}`\n".encode()
    assert len(header) == 60
    return header + body + (b"\n" if len(body) % 2 else b"")


def test_lib_deb_extraction_refuses_unsafe_members(tmp_path, monkeypatch):
    """The pure-Python .deb reader (used without dpkg-deb) skips absolute, '..' and link members."""
    import io
    import tarfile

    from sparsetrace.data import corpus

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        def add(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, target: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, target, len(data) if kind == tarfile.REGTYPE else 0
            info.mode = 0o4755  # setuid: must not survive
            tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("./usr/share/ok.txt", b"fine")
        add("../escape.txt")
        add("/tmp/sparsetrace-absolute.txt")
        add("./usr/link", kind=tarfile.SYMTYPE, target="/etc")
        add("./usr/hard", kind=tarfile.LNKTYPE, target="/etc/passwd")
        add("./usr/../../escape2.txt")
    deb = tmp_path / "pkg.deb"
    deb.write_bytes(b"!<arch>\n" + _ar_member("debian-binary", b"2.0\n") + _ar_member("data.tar.gz", buf.getvalue()))
    dest = tmp_path / "root" / "dest"
    dest.mkdir(parents=True)
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)  # force the Python path, not dpkg-deb
    corpus._extract_deb(deb, dest)
    found = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() or p.is_symlink())
    assert found == ["pkg.deb", "root/dest/usr/share/ok.txt"], found
    assert not Path("/tmp/sparsetrace-absolute.txt").exists()
    assert not (dest / "usr" / "share" / "ok.txt").stat().st_mode & 0o4000


def _copy_ckpt(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    if src.exists():
        shutil.copytree(src, dst)


def test_lib_kill_between_layer_checkpoints_then_resume(lm, tmp_path, corpus):
    """kill -9 after layer 1's checkpoint but before layer 2's leaves them one interval apart.

    The run must still resume and end bit-identical to an uninterrupted run (test_train's kill -9 test
    hits this window only by chance)."""
    from safetensors.torch import load_file

    from sparsetrace.train.pipeline import run_training

    cfg = _train_cfg(corpus, layers=[1, 2], n_tokens=2000, epochs=3.0, batch_size=128, checkpoint_every=10)
    kw = dict(lm=lm, progress=False, cache_dir=tmp_path / "cache")
    run_training(cfg, tmp_path / "full", **kw)
    run_training(cfg, tmp_path / "at30", stop_at_step=30, **kw)
    run_training(cfg, tmp_path / "cut", stop_at_step=40, **kw)
    ck, old = tmp_path / "cut" / ".checkpoints", tmp_path / "at30" / ".checkpoints"
    # layer 2 still holds its step-30 checkpoint (and, where kept, its previous one)
    for name in ("L02_transcoder", "L02_transcoder.prev"):
        _copy_ckpt(old / name, ck / name)
    run_training(cfg, tmp_path / "cut", resume=True, **kw)
    for layer in (1, 2):
        a = load_file(str(tmp_path / "full" / f"L{layer:02d}_transcoder" / "weights.safetensors"))
        b = load_file(str(tmp_path / "cut" / f"L{layer:02d}_transcoder" / "weights.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), layer
