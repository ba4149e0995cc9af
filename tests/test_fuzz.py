"""Property and fuzz tests: parsers and loaders of user-supplied files fail only with clean errors.

- ``TrainConfig.from_dict`` / ``DictionaryConfig.from_dict`` on arbitrary dicts: a config or a
  ``ConfigError``, never ``TypeError`` / ``ValueError`` / ``KeyError``;
- the dictionary loader on random and mutated ``weights.safetensors`` / ``config.json`` /
  ``manifest.json``: a dictionary or a ``DictionaryFileError``;
- the graph JSON loader (``Graph.load``), the Neuronpedia importer and the report builder's graph
  reader on mutated graph JSON: a graph or a ``SparsetraceError`` (the report skips with a warning).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import struct
import tempfile
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsetrace.dictionary.io import CONFIG, MANIFEST, WEIGHTS, save_dictionary
from sparsetrace.dictionary.load import load_dictionary
from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary
from sparsetrace.errors import ConfigError, DictionaryFileError, SparsetraceError
from sparsetrace.train.config import TrainConfig

# modest by default; SPARSETRACE_FUZZ_EXAMPLES=2000 fuzzes deeper
FUZZ = settings(max_examples=int(os.environ.get("SPARSETRACE_FUZZ_EXAMPLES", "60")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow], database=None)

# ------------------------------------------------------------------------------------------ values
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, 2, 3, -1, 64, 2**31, 2**63])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0.0, -0.0, 0.5, 1e-30, 1e30, 1e308, math.nan, math.inf, -math.inf])
    | st.text(max_size=12)
    | st.sampled_from(["", "relu", "topk", "sae", "transcoder", "mlp_in", "resid_pre", "tiny-llama", "float16"])
)
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

_TRAIN_KEYS = [f.name for f in fields(TrainConfig)]
_DICT_KEYS = [f.name for f in fields(DictionaryConfig)]


def _config_dicts(keys: list[str]):
    """Dicts mostly over the known keys (so values reach validation), sometimes with unknown keys."""
    known = st.dictionaries(st.sampled_from(keys), json_values, max_size=len(keys))
    foreign = st.dictionaries(st.text(max_size=8) | st.sampled_from(keys), json_values, max_size=4)
    return known | foreign


def _mutated(base: dict, keys: list[str]):
    """A valid config with one to three fields replaced, removed or added."""
    return st.lists(
        st.tuples(st.sampled_from([*keys, "unknown_key"]), st.sampled_from(["set", "del"]), json_values),
        min_size=1,
        max_size=3,
    ).map(lambda ops: _apply(base, ops))


def _apply(base: dict, ops) -> dict:
    d = copy.deepcopy(base)
    for key, op, value in ops:
        if op == "del":
            d.pop(key, None)
        else:
            d[key] = value
    return d


_VALID_TRAIN = TrainConfig(model="tiny-llama", layers=[1], corpus="x.txt").to_dict()
_VALID_DICT = DictionaryConfig(kind="transcoder", d_in=8, d_out=8, n_features=16, activation="topk", k=4).to_dict()


@FUZZ
@given(st.one_of(_config_dicts(_TRAIN_KEYS), _mutated(_VALID_TRAIN, _TRAIN_KEYS), json_values))
def test_train_config_from_dict_raises_only_config_error(d):
    try:
        cfg = TrainConfig.from_dict(d)
    except ConfigError:
        return
    # what is accepted is usable: the derived quantities compute without error
    assert cfg.total_steps >= 1
    assert all(isinstance(h, str) for h in cfg.hookpoints)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@FUZZ
@given(st.one_of(_config_dicts(_DICT_KEYS), _mutated(_VALID_DICT, _DICT_KEYS), json_values))
def test_dictionary_config_from_dict_raises_only_config_error(d):
    try:
        cfg = DictionaryConfig.from_dict(d)
    except ConfigError:
        return
    assert cfg.n_features > 0 and cfg.d_in > 0 and cfg.d_out > 0


def test_config_examples_found_by_fuzzing():
    """Inputs that used to raise TypeError/AttributeError instead of ConfigError."""
    bad_train = [
        [],  # not a dict
        {"layers": 3},
        {"layers": ["1"]},
        {"target_l0": "8"},
        {"k": "4", "activation": "topk"},
        {"lr": None},
        {1: 2, "a": 3},  # unknown keys of mixed types (sorting them raised TypeError)
        {"hookpoint": ["mlp_in"], "kind": "sae"},
        {"hookpoint": "mlp_mid", "kind": "sae"},
        {"epochs": math.nan},
        {"context": 1},
        {"activation": "topk", "k": 9, "n_features": 8},
        {"epochs": 1e308},  # total_steps raised OverflowError
    ]
    for d in bad_train:
        with pytest.raises(ConfigError):
            TrainConfig.from_dict(d)
    bad_dict = [
        [],
        {"kind": "sae"},  # required fields missing
        {**_VALID_DICT, "k": "4"},
        {**_VALID_DICT, "activation": {"a": 1}},
        {**_VALID_DICT, "layer": "x"},
        {**_VALID_DICT, "d_in": True},
        {**_VALID_DICT, "input_scale": math.nan},
    ]
    for d in bad_dict:
        with pytest.raises(ConfigError):
            DictionaryConfig.from_dict(d)


# ------------------------------------------------------------------------------------------ dictionary files
_KINDS = [
    ("sae", "relu"),
    ("transcoder", "topk"),
    ("skip_transcoder", "jumprelu"),
    ("transcoder", "batchtopk"),
]


@functools.lru_cache(maxsize=1)
def _valid_folders() -> dict[str, dict[str, bytes]]:
    """The bytes of valid small dictionary folders, one per (kind, activation)."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="fuzz-valid-") as tmp:
        for kind, act in _KINDS:
            cfg = DictionaryConfig(kind=kind, d_in=8, d_out=8, n_features=16, activation=act,
                                   k=4 if act in ("topk", "batchtopk") else None, model_id="tiny-llama", layer=1)
            folder = save_dictionary(SparseDictionary(cfg, seed=0), Path(tmp) / f"{kind}-{act}")
            load_dictionary(folder)  # the originals load
            out[f"{kind}-{act}"] = {p.name: p.read_bytes() for p in folder.iterdir()}
    return out


@pytest.fixture()
def valid_folders():
    return _valid_folders()


def _load_from(files: dict[str, bytes | None]) -> None:
    with tempfile.TemporaryDirectory(prefix="fuzz-dict-") as tmp:
        folder = Path(tmp) / "d"
        folder.mkdir()
        for name, data in files.items():
            if data is not None:
                (folder / name).write_bytes(data)
        try:
            d = load_dictionary(folder)
        except DictionaryFileError:
            return
        # accepted: the weights really are usable
        x = torch.randn(3, d.cfg.d_in)
        assert torch.isfinite(d(x)).all()


def _mutate_bytes(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for kind, pos, value in ops:
        if not b:
            b = bytearray(value)
            continue
        i = pos % len(b)
        if kind == "flip":
            b[i] ^= 1 << (value[0] % 8) if value else 0xFF
        elif kind == "set":
            b[i : i + len(value)] = value
        elif kind == "insert":
            b[i:i] = value
        elif kind == "delete":
            del b[i : i + 1 + len(value)]
        elif kind == "truncate":
            del b[i:]
    return bytes(b)


byte_ops = st.lists(
    st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]), st.integers(0, 10**6),
              st.binary(max_size=8)),
    min_size=1,
    max_size=4,
)
folder_names = st.sampled_from([f"{k}-{a}" for k, a in _KINDS])


@FUZZ
@given(name=folder_names, target=st.sampled_from([WEIGHTS, CONFIG, MANIFEST]), ops=byte_ops,
       keep_manifest=st.booleans())
def test_loader_mutated_bytes(name, target, ops, keep_manifest):
    files = dict(_valid_folders()[name])
    files[target] = _mutate_bytes(files[target], ops)
    if not keep_manifest and target != MANIFEST:
        files[MANIFEST] = None  # no manifest: the mutation reaches the safetensors / JSON parsers
    _load_from(files)


@FUZZ
@given(name=folder_names, weights=st.binary(max_size=300), config=st.none() | st.binary(max_size=200))
def test_loader_random_bytes(name, weights, config):
    files = dict(_valid_folders()[name])
    files[MANIFEST] = None
    files[WEIGHTS] = weights
    if config is not None:
        files[CONFIG] = config
    _load_from(files)


def _split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join_safetensors(header, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


@FUZZ
@given(name=folder_names, ops=st.lists(st.tuples(st.integers(0, 50), st.sampled_from(["dtype", "shape", "offsets",
                                                                                      "drop", "value"]),
                                                  json_values), min_size=1, max_size=3))
def test_loader_mutated_safetensors_header(name, ops):
    """Structured mutations of the safetensors header (dtype, shape, data offsets, missing tensors)."""
    files = dict(_valid_folders()[name])
    files[MANIFEST] = None
    header, body = _split_safetensors(files[WEIGHTS])
    names = sorted(k for k in header if k != "__metadata__")
    for idx, field, value in ops:
        t = names[idx % len(names)]
        if field == "drop":
            header.pop(t, None)
        elif isinstance(header.get(t), dict):
            if field == "value":
                header[t] = value
            elif field == "dtype":
                header[t]["dtype"] = value if idx % 2 else ["F16", "I64", "BOOL", "U8", "F64", "BF16", "C64"][idx % 7]
            else:
                header[t][field] = value
    files[WEIGHTS] = _join_safetensors(header, body)
    _load_from(files)


@FUZZ
@given(name=folder_names, ops=st.lists(st.tuples(st.sampled_from(_DICT_KEYS + ["other"]), json_values),
                                       min_size=1, max_size=3))
def test_loader_mutated_config_json(name, ops):
    files = dict(_valid_folders()[name])
    files[MANIFEST] = None
    cfg = json.loads(files[CONFIG])
    for key, value in ops:
        cfg[key] = value
    files[CONFIG] = json.dumps(cfg).encode()
    _load_from(files)


@FUZZ
@given(name=folder_names, manifest=json_values)
def test_loader_foreign_manifest(name, manifest):
    files = dict(_valid_folders()[name])
    files[MANIFEST] = json.dumps(manifest).encode()
    _load_from(files)


def test_loader_nan_and_integer_tensors(valid_folders, tmp_path):
    """NaN weights and non-float tensors are refused with the tensor named."""
    from safetensors.torch import load, save

    for mutate, match in ((lambda t: t.fill_(math.nan), "NaN"), (lambda t: t.to(torch.int32), "dtype")):
        files = dict(valid_folders["sae-relu"])
        files[MANIFEST] = None
        tensors = load(files[WEIGHTS])
        tensors["W_enc"] = mutate(tensors["W_enc"].clone())
        files[WEIGHTS] = save(tensors)
        folder = tmp_path / f"d-{match}"
        folder.mkdir()
        for n, data in files.items():
            if data is not None:
                (folder / n).write_bytes(data)
        with pytest.raises(DictionaryFileError, match=f"W_enc.*{match}"):
            load_dictionary(folder)


def test_loader_deeply_nested_json(valid_folders, tmp_path):
    folder = tmp_path / "deep"
    folder.mkdir()
    for n, data in valid_folders["sae-relu"].items():
        if n != MANIFEST:
            (folder / n).write_bytes(data)
    (folder / CONFIG).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DictionaryFileError):
        load_dictionary(folder)


# ------------------------------------------------------------------------------------------ graph JSON
def _valid_graph() -> dict:
    nodes = [
        {"node_id": "E@0", "kind": "embedding", "layer": -1, "position": 0, "token": "The", "token_id": 464},
        {"node_id": "E@1", "kind": "embedding", "layer": -1, "position": 1, "token": " cat", "token_id": 3797},
        {"node_id": "L0/F3@1", "kind": "feature", "layer": 0, "position": 1, "feature": 3, "hookpoint": "mlp_out.0",
         "activation": 1.5, "influence": 0.4, "label": "cats", "token": " cat"},
        {"node_id": "L1/F7@1", "kind": "feature", "layer": 1, "position": 1, "feature": 7, "hookpoint": "mlp_out.1",
         "activation": 0.7, "influence": 0.2, "label": None, "token": " cat"},
        {"node_id": "L1/ERR@1", "kind": "error", "layer": 1, "position": 1, "hookpoint": "mlp_out.1", "token": " cat"},
        {"node_id": "LOGIT/318@1", "kind": "logit", "layer": 2, "position": 1, "token": " is", "token_id": 318,
         "activation": 3.1, "prob": 0.42},
    ]
    links = [
        {"source": "E@1", "target": "L0/F3@1", "weight": 0.9},
        {"source": "L0/F3@1", "target": "L1/F7@1", "weight": 0.5},
        {"source": "E@0", "target": "L1/F7@1", "weight": -0.1},
        {"source": "L1/F7@1", "target": "LOGIT/318@1", "weight": 1.2},
        {"source": "L1/ERR@1", "target": "LOGIT/318@1", "weight": 0.3},
    ]
    meta = {"prompt": "The cat", "prompt_tokens": ["The", " cat"], "prompt_token_ids": [464, 3797],
            "model": "tiny-gpt2", "n_layers": 2, "targets": [{"token": " is", "token_id": 318, "prob": 0.42}],
            "scores": {"replacement": 0.8, "completeness": 0.9}, "node_threshold": 0.8, "edge_threshold": 0.98}
    return {"format": "sparsetrace-graph/1", "metadata": meta, "nodes": nodes, "links": links}


@st.composite
def mutated_json(draw, base):
    """``base`` with one to four random edits: a value replaced, a key deleted or added, an item dropped."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 4))):
        path: list = []
        cur = doc
        while isinstance(cur, (dict, list)) and cur and draw(st.integers(0, 3)) > 0:
            key = draw(st.sampled_from(sorted(cur, key=str) if isinstance(cur, dict) else list(range(len(cur)))))
            path.append(key)
            cur = cur[key]
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["replace", "delete", "add"]))
        if not path:
            if op == "replace":
                doc = draw(json_values)
            continue
        last = path[-1]
        if op == "replace":
            parent[last] = draw(json_values)
        elif op == "delete":
            del parent[last]
        elif isinstance(cur, dict):
            cur[draw(st.text(max_size=6) | st.sampled_from(["source", "target", "weight", "kind", "layer"]))] = draw(
                json_values)
        elif isinstance(cur, list):
            cur.append(draw(json_values))
    return doc


def _graph_module():
    from sparsetrace.attribute import graph_types as graph

    return graph


def test_valid_graph_loads(tmp_path):
    graph = _graph_module()
    p = tmp_path / "graph.json"
    p.write_text(json.dumps(_valid_graph()))
    g = graph.Graph.load(p)
    assert len(g.nodes) == 6 and len(g.edges) == 5


@FUZZ
@given(doc=mutated_json(_valid_graph()))
def test_graph_load_mutated(doc):
    graph = _graph_module()
    with tempfile.TemporaryDirectory(prefix="fuzz-graph-") as tmp:
        p = Path(tmp) / "graph.json"
        p.write_text(json.dumps(doc, allow_nan=True))
        try:
            g = graph.Graph.load(p)
        except SparsetraceError:
            return
        assert len(g.nodes) == len({n.node_id for n in g.nodes})


@FUZZ
@given(data=st.binary(max_size=200) | st.sampled_from([b"", b"{", b"\xff\xfe{}", b"null", b"[1, 2]", b'{"format": 1}']))
def test_graph_load_random_bytes(data):
    graph = _graph_module()
    with tempfile.TemporaryDirectory(prefix="fuzz-graph-") as tmp:
        p = Path(tmp) / "graph.json"
        p.write_bytes(data)
        with pytest.raises(SparsetraceError):
            graph.Graph.load(p)


def test_graph_load_deeply_nested(tmp_path):
    graph = _graph_module()
    p = tmp_path / "graph.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SparsetraceError):
        graph.Graph.load(p)


def _export_module():
    from sparsetrace.attribute import export

    return export


def _neuronpedia_doc() -> dict:
    return _export_module().to_neuronpedia(_valid_graph())


def test_from_neuronpedia_mutated():
    """Mutated Neuronpedia JSON: from_neuronpedia returns a consistent graph or raises GraphFormatError.

    Any other exception (KeyError, TypeError, ...) fails the test. The hypothesis test is defined inside
    so that the export module is imported (or the test skipped) only when it runs.
    """
    export = _export_module()

    @FUZZ
    @given(doc=mutated_json(_neuronpedia_doc()))
    def run(doc):
        try:
            g = export.from_neuronpedia(doc)
        except export.GraphFormatError:
            return
        ids = [n["node_id"] for n in g["nodes"]]
        assert len(ids) == len(set(ids))
        assert all(e["source"] in ids and e["target"] in ids for e in g["links"])

    run()


@pytest.mark.parametrize(("edit", "match"), [
    (lambda d: d.update(nodes={"a": 1}), r"nodes is dict; expected a list"),
    (lambda d: d["nodes"].append(3), r"nodes\[6\] is int; expected an object"),
    (lambda d: d["nodes"][2].update(node_id=[1]), r"nodes\[2\]\.node_id is list; expected a string"),
    (lambda d: d["nodes"][2].pop("layer"), r"node '0_3_1' is malformed \(no field 'layer'\)"),
    (lambda d: d["nodes"][2].update(ctx_idx="x"), r"node '0_3_1' is malformed \(invalid literal"),
    (lambda d: d["links"][0].update(weight=[]), r"links\[0\] is malformed"),
    (lambda d: d["links"][0].update(source="nope"), r"links\[0\] source 'nope' names no node"),
    (lambda d: d["metadata"].update(prompt_tokens=5), r"metadata\.prompt_tokens is int; expected a list"),
    (lambda d: d["metadata"]["sparsetrace"].update(n_layers="two"), r"metadata is malformed"),
])
def test_from_neuronpedia_names_what_is_wrong(edit, match):
    export = _export_module()
    doc = _neuronpedia_doc()
    edit(doc)
    with pytest.raises(export.GraphFormatError, match=match):
        export.from_neuronpedia(doc)


def test_neuronpedia_round_trip():
    back = _export_module().from_neuronpedia(_neuronpedia_doc())
    assert {n["node_id"] for n in back["nodes"]} == {n["node_id"] for n in _valid_graph()["nodes"]}


@FUZZ
@given(doc=mutated_json(_valid_graph()) | json_values)
def test_report_builder_skips_mutated_graph(doc):
    from sparsetrace.report.html import build_report

    with tempfile.TemporaryDirectory(prefix="fuzz-report-") as tmp:
        run = Path(tmp) / "run"
        (run / "circuits" / "c0").mkdir(parents=True)
        (run / "run.json").write_text(json.dumps({"model": "tiny-gpt2"}))
        (run / "circuits" / "c0" / "graph.json").write_text(json.dumps(doc, allow_nan=True))
        index = build_report([run], Path(tmp) / "report")
        assert index.is_file()
        text = (Path(tmp) / "report" / "data" / "report-data.js").read_text()
        assert text.startswith("window.SPARSETRACE_DATA=")


def test_report_builder_deeply_nested_graph(tmp_path):
    from sparsetrace.report.html import build_report

    run = tmp_path / "run"
    (run / "circuits" / "c0").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    (run / "circuits" / "c0" / "graph.json").write_text('{"nodes": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert build_report([run], tmp_path / "report").is_file()
