"""Shared helpers for the benchmark scripts (stdlib + torch only, so peer workers can import it too).

The peer workers run inside ``bench/.venv-peers`` (its own transformers), so nothing here imports
``sparsetrace``. Each measurement runs in a fresh subprocess (clean peak RSS, no allocator state carried
over) and prints one JSON line prefixed with ``RESULT``; the driver interleaves ours and the peers
rep by rep so that load from other processes on a shared box hits both sides alike.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEER_PYTHON = BENCH / ".venv-peers" / "bin" / "python"
RESULT_TAG = "RESULT "
READY = "READY"
STEP = "STEP "


# ------------------------------------------------------------------------------------------ timing
def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_loop(step: Callable[[int], object], warmup: int, steps: int, device: str) -> list[float]:
    """Run ``step(i)`` ``warmup`` times untimed, then ``steps`` times; return per-step seconds."""
    for i in range(warmup):
        step(i)
    sync(device)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        step(warmup + i)
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_device_mb(device: str) -> float | None:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def emit(result: dict) -> None:
    print(RESULT_TAG + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------ data
def random_activations(n_batches: int, batch: int, d: int, seed: int, *, device: str = "cpu"):
    """A pool of activation batches, identical in every process (same torch version, same seed).

    Not isotropic noise: a random low-rank-ish mixture with a mean offset and heavy-ish tails, so the
    per-feature firing pattern is closer to real residual-stream activations than N(0, I).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(4 * d, d, generator=g) / d**0.5
    mean = torch.randn(d, generator=g) * 0.5
    out = []
    for _ in range(n_batches):
        z = torch.randn(batch, 4 * d, generator=g)
        z = z * (torch.rand(batch, 4 * d, generator=g) < 0.25)  # sparse latent causes
        out.append((z @ basis + mean).contiguous().to(device))
    return out


def l0_shift(pre, target_l0: float) -> float:
    """The constant t such that ``pre - t`` has ``target_l0`` positive entries per row on average."""
    import torch

    flat = pre.reshape(-1)
    n_keep = max(1, min(flat.numel() - 1, int(round(target_l0 * pre.shape[0]))))
    return float(torch.topk(flat, n_keep + 1, sorted=True).values[-2:].mean())


# ------------------------------------------------------------------------------------------ processes
def peer_python() -> Path:
    if not PEER_PYTHON.exists():
        raise SystemExit(
            f"peer venv missing: {PEER_PYTHON} (create it with: bash bench/peers/setup_venv.sh)"
        )
    return PEER_PYTHON


def run_worker(python: str | Path, script: Path, args: list[str], *, timeout: float = 3600,
               env: dict | None = None) -> dict:
    """Run ``python script args`` and return its RESULT json (or {'error': ...})."""
    e = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
         "SPARSIFY_DISABLE_TRITON": "1", **(env or {})}
    t = time.perf_counter()
    try:
        proc = subprocess.run([str(python), str(script), *args], capture_output=True, text=True,
                              timeout=timeout, env=e, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            res["wall_s"] = time.perf_counter() - t
            return res
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
    return {"error": f"rc={proc.returncode}: " + " | ".join(tail)}


class Served:
    """A worker process driven one step at a time (``step`` / ``done`` on stdin), so that several
    processes - ours and a peer, each with its own python - can alternate single steps and see the same
    machine load. The worker answers ``READY`` after setup, ``STEP <seconds>`` per step and a RESULT
    line after ``done``; other output is ignored, stderr goes to a temp file (shown on failure)."""

    def __init__(self, python: str | Path, script: Path, args: list[str], *, env: dict | None = None):
        import tempfile

        e = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
             "SPARSIFY_DISABLE_TRITON": "1", **(env or {})}
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([str(python), str(script), *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err, text=True, env=e, cwd=str(ROOT))
        self.error: str | None = None

    def _read(self, tag: str) -> str | None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(tag):
                return line[len(tag):].strip()
        self.err.seek(0)
        tail = self.err.read().strip().splitlines()[-6:]
        self.error = self.error or f"rc={self.proc.poll()}: " + " | ".join(tail)
        return None

    def _send(self, cmd: str) -> bool:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            self.error = self.error or "worker exited"
            return False

    def wait_ready(self) -> bool:
        return self._read(READY) is not None

    def step(self) -> float | None:
        if self.error or not self._send("step"):
            return None
        out = self._read(STEP)
        return float(out) if out is not None else None

    def finish(self, timeout: float = 120) -> dict:
        if self.error is None and self._send("done"):
            out = self._read(RESULT_TAG)
            res = json.loads(out) if out is not None else {"error": self.error}
        else:
            res = {"error": self.error}
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.err.close()
        return res


def fmt(x: float | None, nd: int = 0) -> str:
    if x is None or x != x:  # None or NaN
        return "n/a"
    return f"{x:,.{nd}f}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "| " + " | ".join("-" * w for w in widths) + " |"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def machine_line() -> str:
    import platform

    import torch

    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return (f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
            f"torch threads {torch.get_num_threads()}, load avg {load:.1f}")


def python_exe() -> str:
    return sys.executable
