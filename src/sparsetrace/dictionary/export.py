"""``sparsetrace export``: a run's dictionaries in another toolkit's on-disk layout.

- ``circuit-tracer``: one transcoder set (``config.yaml`` + ``layer_{i}.safetensors``), see
  :mod:`.export_circuit_tracer`; or, for a run with a cross-layer transcoder (``RUN/clt``), circuit-tracer's
  CLT layout (``config.yaml`` + ``W_enc_{i}`` / ``W_dec_{i}.safetensors``), see :mod:`.export_clt`;
- ``saelens``: one SAELens folder per dictionary, ``OUT/<dictionary folder name>`` (:func:`.interop.export_saelens`);
- ``sparsify``: one sparsify folder per dictionary, named after the hooked module as sparsify names it
  (``OUT/layers.6.mlp`` for a transcoder, ``OUT/layers.6`` for a resid_post SAE), plus ``OUT/config.json``
  recording the model (:func:`.interop.export_sparsify`).

The output folder is built beside ``OUT`` and swapped in when complete; an existing ``OUT`` is replaced only
with ``overwrite=True``, and never when it is (or holds) the run being exported.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ConfigError, DictionaryFileError
from ..util.manifest import replace_folder, write_manifest
from .interop import export_saelens, export_sparsify
from .io import WEIGHTS, check_matches_model, find_dictionaries
from .load import load_dictionary
from .model import SparseDictionary

TARGETS = ("circuit-tracer", "saelens", "sparsify")
GRAPH_TARGETS = ("neuronpedia", "circuit-tracer")  # a graph.json: circuit-tracer's / Neuronpedia's graph JSON


def check_target(to: str, *, graph: bool = False) -> str:
    """``to`` for a run (``graph=False``) or for a graph.json (``graph=True``)."""
    ok = GRAPH_TARGETS if graph else TARGETS
    if to not in ok:
        what = "a graph.json" if graph else "a run"
        also = (f" (a run takes {', '.join(TARGETS)})" if graph and to in TARGETS else
                f" (a graph.json takes {', '.join(GRAPH_TARGETS)})" if not graph and to in GRAPH_TARGETS else "")
        raise ConfigError(f"--to '{to}' is unknown for {what}; expected one of {', '.join(ok)}{also}")
    return to


def check_out(out: Path, overwrite: bool, *, protect: Path | list[Path] = (), kind: str = "folder") -> None:
    """Refuse an existing ``out`` without ``overwrite``, a file where a folder is expected (or the reverse),
    and an ``out`` that is one of ``protect`` or holds one (replacing it would delete the input)."""
    out = Path(out)
    o = out.resolve()
    for p in [protect] if isinstance(protect, Path) else protect:
        r = Path(p).resolve()
        if o == r or o in r.parents:
            raise ConfigError(f"--out {out} is the input {p} or holds it; choose another output folder")
    if not out.exists() and not out.is_symlink():
        return
    if kind == "folder" and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; expected a folder (or a path that does not exist)")
    if kind == "folder" and not out.is_symlink() and not any(out.iterdir()):
        return  # an empty folder made ready for the export: nothing in it to lose
    if kind == "file" and out.is_dir():
        raise ConfigError(f"--out {out} is a folder; expected a file path")
    if not overwrite:
        raise ConfigError(f"--out {out} already exists; pass --overwrite to replace it, or choose another path")


def sparsify_name(d: SparseDictionary) -> str:
    """The Hugging Face module path sparsify would hook for this dictionary (its folder name)."""
    c = d.cfg
    if c.kind != "sae" or c.hookpoint_out == "mlp_out":
        return f"layers.{c.layer}.mlp"
    if c.hookpoint_out == "resid_post":
        return f"layers.{c.layer}"
    if c.hookpoint_out == "resid_pre" and c.layer > 0:
        return f"layers.{c.layer - 1}"  # the previous block's output
    if c.hookpoint_out == "attn_out":
        return f"layers.{c.layer}.self_attn"
    raise DictionaryFileError(
        f"cannot name the {c.hookpoint_out} SAE at layer {c.layer} as a sparsify hookpoint (a module output); "
        "expected resid_post, resid_pre (layer > 0), attn_out or mlp_out")


def _model_shape(dicts: list[SparseDictionary], model: str | None, n_layers: int | None) -> tuple[int, int]:
    """(n_layers, d_model): from ``n_layers`` and the dictionaries, or by loading the model (and checking
    every dictionary fits it)."""
    if n_layers is not None:
        if n_layers <= 0:
            raise ConfigError(f"--n-layers {n_layers} is invalid; expected the model's number of layers (> 0)")
        return n_layers, dicts[0].cfg.d_in
    from ..model.adapter import LanguageModel

    name = model or next((d.cfg.model_id for d in dicts if d.cfg.model_id), "")
    if not name:
        raise ConfigError("the dictionaries record no model; pass --model NAME or --n-layers N")
    lm = LanguageModel.load(name)
    for d in dicts:
        check_matches_model(d, lm.model_id, lm.d_model, lm.n_layers, strict_id=model is None)
    n, dm = lm.n_layers, lm.d_model
    del lm
    return n, dm


def _write_circuit_tracer(dicts, tmp: Path, *, n_layers: int, d_model: int, progress: bool) -> None:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from .export_circuit_tracer import check_dictionaries, circuit_tracer_files

    check_dictionaries(dicts, n_layers, d_model)  # refusals before the progress bar starts
    files = circuit_tracer_files(dicts, n_layers=n_layers, d_model=d_model)
    for name, content in tqdm(files, total=n_layers + 1, desc="circuit-tracer layers", disable=not progress,
                              unit="file"):
        p = tmp / name
        if isinstance(content, str):
            p.write_text(content, encoding="utf-8")
        else:
            save_file(content, str(p))
    write_manifest(tmp, {"format": "circuit-tracer transcoder_set"}, name="manifest.json")


def _write_clt(clt, tmp: Path, *, progress: bool) -> None:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from .export_clt import clt_files

    for name, content in tqdm(clt_files(clt), total=2 * clt.n_layers + 1, desc="circuit-tracer CLT files",
                              disable=not progress, unit="file"):
        p = tmp / name
        if isinstance(content, str):
            p.write_text(content, encoding="utf-8")
        else:
            save_file(content, str(p))
    write_manifest(tmp, {"format": "circuit-tracer cross_layer_transcoder"}, name="manifest.json")


def _find_clt_to_export(run: Path, to: str, n_layers: int | None):
    """The run's CLT when it is what ``to`` should export (circuit-tracer), else None; refuses a CLT-only run
    for the per-dictionary formats."""
    from .clt import find_clt, load_clt

    folder = find_clt(run) if run.is_dir() else None
    if folder is None:
        return None, None
    if to != "circuit-tracer":
        if folder == run or not any(run.glob(f"*/{WEIGHTS}")):
            raise ConfigError(f"--to {to} cannot take the cross-layer transcoder in {folder}: {to} has no CLT "
                              "format; expected --to circuit-tracer")
        return None, None  # a run with both: the per-layer dictionaries go to saelens / sparsify
    clt = load_clt(folder)
    if n_layers is not None and n_layers != clt.n_layers:
        raise ConfigError(f"--n-layers {n_layers} does not match the CLT in {folder} ({clt.n_layers} layers)")
    return clt, folder


def _write_sparsify(dicts, tmp: Path) -> list[Path]:
    names = [sparsify_name(d) for d in dicts]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DictionaryFileError(f"two dictionaries hook the same sparsify module {dup[0]}; export them separately")
    out = [export_sparsify(d, tmp / n) for d, n in zip(dicts, names, strict=True)]
    model_id = next((d.cfg.model_id for d in dicts if d.cfg.model_id), "")
    run_cfg = {"model": model_id, "hookpoints": names, "sae": {}, "exported_by": "sparsetrace"}
    (tmp / "config.json").write_text(json.dumps(run_cfg, indent=2), encoding="utf-8")
    return out


def export_run(run: str | Path, to: str, out: str | Path, *, overwrite: bool = False, model: str | None = None,
               n_layers: int | None = None, progress: bool = False) -> list[Path]:
    """Export the dictionaries of ``run`` (a run folder, one dictionary folder, or a CLT folder) to ``out``;
    returns the written folders (``[out]`` for circuit-tracer, one per dictionary otherwise). A run with a
    CLT (``RUN/clt``) exports that CLT to circuit-tracer (as ``load_replacement`` picks it); its per-layer
    dictionaries, if any, go to saelens / sparsify (or export one of them by its own folder)."""
    check_target(to)
    run, out = Path(run), Path(out)
    clt, clt_folder = _find_clt_to_export(run, to, n_layers)
    paths = [clt_folder] if clt is not None else find_dictionaries(run)
    check_out(out, overwrite, protect=[run, *paths])
    if clt is not None:
        from .export_clt import check_clt

        check_clt(clt)  # refuse before anything is written
    dicts = [] if clt is not None else [load_dictionary(p) for p in paths]
    shape = None
    if to == "circuit-tracer" and clt is None:
        from .export_circuit_tracer import check_dictionaries

        check_dictionaries(dicts, None, None)  # kinds and activations, before loading the model
        shape = _model_shape(dicts, model, n_layers)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as e:
        raise ConfigError(f"cannot create --out {out}: {e.strerror or e}") from None
    try:
        if clt is not None:
            _write_clt(clt, tmp, progress=progress)
            written = [out]
        elif to == "circuit-tracer":
            _write_circuit_tracer(dicts, tmp, n_layers=shape[0], d_model=shape[1], progress=progress)
            written = [out]
        elif to == "saelens":
            names = [p.name or "dictionary" for p in paths]
            written = [export_saelens(d, tmp / n) for d, n in zip(dicts, names, strict=True)]
            written = [out / w.name for w in written]
        else:
            written = [out / w.name for w in _write_sparsify(dicts, tmp)]
        os.chmod(tmp, 0o755)
        replace_folder(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise ConfigError(f"could not write --out {out}: {e.strerror or e}") from None
        raise
    return written
