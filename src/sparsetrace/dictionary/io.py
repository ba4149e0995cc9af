"""Save and load our own dictionary folders (safetensors + JSON config), atomically, with sha256 manifests.

Nothing here unpickles: only safetensors files are read. Choosing between our format and other tools'
(SAELens, sparsify) is :mod:`sparsetrace.dictionary.load`'s job; this module knows only its own.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import ConfigError, DictionaryFileError
from ..util.hashing import sha256_file
from .model import DictionaryConfig, SparseDictionary

WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
MANIFEST = "manifest.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_failed(path: Path, exc: BaseException) -> ConfigError:
    why = getattr(exc, "strerror", None) or str(exc)
    return ConfigError(f"cannot write '{path}' ({why}); free some disk space or choose another output folder")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file via temp file + fsync + rename so readers never see half a file.

    Write failures (disk full, read-only file system, ...) raise :class:`ConfigError` naming the path.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise write_failed(path, e) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        with _suppress():
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise write_failed(path, e) from None
        raise


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


def write_folder_atomically(dest: Path, files: dict[str, bytes | dict[str, torch.Tensor] | str]) -> None:
    """Write ``files`` into a temp folder beside ``dest``, fsync, add a manifest, then swap it in.

    Values: bytes or str (written as is), or a tensor dict (written as safetensors). Write failures
    (disk full, read-only file system, ...) raise :class:`ConfigError` naming ``dest``; ``dest`` is
    then left as it was.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    except OSError as e:
        raise write_failed(dest, e) from None
    try:
        sums = {}
        for name, content in files.items():
            p = tmp / name
            if isinstance(content, dict):
                save_file({k: v.detach().contiguous().cpu() for k, v in content.items()}, str(p))
            else:
                data = content.encode("utf-8") if isinstance(content, str) else content
                with open(p, "wb") as f:
                    f.write(data)
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
            sums[name] = sha256_file(p)
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump({"files": sums}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        # keep any extra files that already live in dest (train_log.jsonl, metrics.json, ...)
        if dest.exists():
            for extra in dest.iterdir():
                if extra.name not in files and extra.name != MANIFEST and extra.is_file():
                    shutil.copy2(extra, tmp / extra.name)
            old = dest.with_name(f".{dest.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, SafetensorError)):
            raise write_failed(dest, e) from None
        raise


def state_tensors(d: SparseDictionary) -> dict[str, torch.Tensor]:
    out = {"W_enc": d.W_enc.data, "b_enc": d.b_enc.data, "W_dec": d.W_dec.data, "b_dec": d.b_dec.data}
    if d.W_skip is not None:
        out["W_skip"] = d.W_skip.data
    if d.log_threshold is not None:
        out["threshold"] = d.log_threshold.data.exp()
    if d.batch_threshold is not None:
        out["batch_threshold"] = d.batch_threshold.reshape(1)
    return out


def save_dictionary(d: SparseDictionary, folder: str | Path) -> Path:
    folder = Path(folder)
    write_folder_atomically(
        folder,
        {WEIGHTS: state_tensors(d), CONFIG: json.dumps(d.cfg.to_dict(), indent=2)},
    )
    return folder


def verify_manifest(folder: Path) -> None:
    man = folder / MANIFEST
    if not man.exists():
        return
    try:
        sums = json.loads(man.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise DictionaryFileError(f"manifest {man} is corrupt ({e}); expected JSON with a 'files' map") from None
    if not isinstance(sums, dict):
        raise DictionaryFileError(f"manifest {man} is corrupt: 'files' is not a map of file name -> sha256")
    for name, digest in sums.items():
        if not isinstance(digest, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise DictionaryFileError(
                f"manifest {man} is corrupt: entry {name!r}: {digest!r} is not a file name -> sha256 pair"
            )
        p = folder / name
        if not p.is_file():
            raise DictionaryFileError(f"{p} is listed in the manifest but missing")
        if sha256_file(p) != digest:
            raise DictionaryFileError(f"{p} does not match its sha256 in {man}: the file is corrupt or truncated")


def load_native(path: str | Path, *, device: str | torch.device = "cpu") -> SparseDictionary:
    """Load one of our dictionary folders (``config.json`` + ``weights.safetensors``, manifest-checked).

    Use :func:`sparsetrace.dictionary.load.load_dictionary` for a folder of any supported format."""
    path = Path(path)
    verify_manifest(path)
    try:
        cfg_dict = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DictionaryFileError(f"{path / CONFIG} is missing") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise DictionaryFileError(f"{path / CONFIG} is not valid JSON ({e})") from None
    except OSError as e:
        raise DictionaryFileError(f"{path / CONFIG} cannot be read ({e.strerror or e})") from None
    fmt = cfg_dict.get("format") if isinstance(cfg_dict, dict) else None
    if not isinstance(fmt, str) or fmt.split("/")[0] != "sparsetrace-dictionary":
        raise DictionaryFileError(
            f"{path / CONFIG} is not a sparsetrace dictionary config (format={fmt!r}); "
            f"expected 'sparsetrace-dictionary/1'"
        )
    try:
        cfg = DictionaryConfig.from_dict(cfg_dict)
    except (ConfigError, TypeError) as e:
        raise DictionaryFileError(f"{path / CONFIG} has invalid fields ({e})") from None
    try:
        tensors = load_file(str(path / WEIGHTS), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DictionaryFileError(f"{path / WEIGHTS} is corrupt or truncated ({e})") from None
    return from_tensors(cfg, tensors, source=str(path)).to(device)


def from_tensors(cfg: DictionaryConfig, tensors: dict[str, torch.Tensor], *, source: str) -> SparseDictionary:
    expected = {
        "W_enc": (cfg.n_features, cfg.d_in),
        "b_enc": (cfg.n_features,),
        "W_dec": (cfg.n_features, cfg.d_out),
        "b_dec": (cfg.d_out,),
    }
    if cfg.kind == "skip_transcoder":
        expected["W_skip"] = (cfg.d_out, cfg.d_in)
    if cfg.activation == "jumprelu":
        expected["threshold"] = (cfg.n_features,)
    for name, shape in expected.items():
        if name not in tensors:
            raise DictionaryFileError(f"{source}: tensor '{name}' is missing; expected shape {list(shape)}")
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise DictionaryFileError(
                f"{source}: tensor '{name}' has shape {list(t.shape)}; expected {list(shape)} from the config"
            )
        if not t.is_floating_point():
            raise DictionaryFileError(f"{source}: tensor '{name}' has dtype {t.dtype}; expected a floating-point dtype")
        if not torch.isfinite(t).all():
            raise DictionaryFileError(f"{source}: tensor '{name}' contains NaN or inf")
    bt = tensors.get("batch_threshold")
    if bt is not None and (bt.numel() != 1 or not bt.is_floating_point() or not torch.isfinite(bt).all()):
        raise DictionaryFileError(f"{source}: tensor 'batch_threshold' must be one finite float, got {list(bt.shape)}")
    d = SparseDictionary(cfg)
    with torch.no_grad():
        d.W_enc.copy_(tensors["W_enc"])
        d.b_enc.copy_(tensors["b_enc"])
        d.W_dec.copy_(tensors["W_dec"])
        d.b_dec.copy_(tensors["b_dec"])
        if d.W_skip is not None:
            d.W_skip.copy_(tensors["W_skip"])
        if d.log_threshold is not None:
            d.log_threshold.copy_(tensors["threshold"].clamp_min(1e-12).log())
        if d.batch_threshold is not None and "batch_threshold" in tensors:
            d.batch_threshold.copy_(tensors["batch_threshold"].reshape(()))
    return d.eval()


def check_matches_model(d: SparseDictionary, model_id: str, d_model: int, n_layers: int, *, strict_id: bool = True) -> None:
    """Refuse a dictionary trained on another model (id or width mismatch)."""
    cfg = d.cfg
    if cfg.d_in != d_model or cfg.d_out != d_model:
        raise DictionaryFileError(
            f"dictionary for layer {cfg.layer} has d_in={cfg.d_in}, d_out={cfg.d_out}; "
            f"model '{model_id}' has d_model={d_model}"
        )
    if not (0 <= cfg.layer < n_layers):
        raise DictionaryFileError(f"dictionary layer {cfg.layer} is out of range for '{model_id}' (0..{n_layers - 1})")
    if strict_id and cfg.model_id and model_id and cfg.model_id != model_id:
        raise DictionaryFileError(
            f"dictionary was trained on model '{cfg.model_id}', not '{model_id}'; pass the model it was trained on"
        )


def find_dictionaries(run_dir: str | Path) -> list[Path]:
    """Dictionary folders inside a run folder (or the folder itself if it is one)."""
    run_dir = Path(run_dir)
    if run_dir.suffix.lower() in PICKLE_SUFFIXES:
        raise DictionaryFileError(
            f"refusing to load {run_dir}: pickle-based files can execute code; expected a run folder or a "
            f"dictionary folder with {CONFIG} + {WEIGHTS} (safetensors)"
        )
    if run_dir.is_file() and run_dir.name == WEIGHTS:
        run_dir = run_dir.parent
    if not run_dir.exists():
        raise DictionaryFileError(f"'{run_dir}' does not exist; expected a run folder or a dictionary folder")
    if not run_dir.is_dir():
        raise DictionaryFileError(f"'{run_dir}' is a file; expected a run folder or a dictionary folder")
    if (run_dir / WEIGHTS).exists() or (run_dir / "cfg.json").exists():
        return [run_dir]
    found = sorted(p.parent for p in run_dir.glob(f"*/{WEIGHTS}") if not p.parent.name.startswith("."))
    found += sorted(p.parent for p in run_dir.glob("*/cfg.json") if p.parent not in found)
    if not found:
        raise DictionaryFileError(f"no dictionaries found in '{run_dir}'; expected sub-folders with {WEIGHTS}")
    return found
