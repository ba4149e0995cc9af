"""Attribution graphs: sparsetrace vs circuit-tracer 0.5.0 on SmolLM2-135M-Instruct (CPU, float32).

    bench/.venv-peers/bin/python bench/bench_attribute_peer.py [--cases trained,all30] [--repeat 3]
        [--repeat-all30 2] [--max-feature-nodes 3000] [--batch-size N] [--peer-batch-size 32]
        [--reference trained] [--ours-python python3] [--keep] [--out bench/out/attribute_peer.json]

Same prompt (``bench_attribute.PROMPT``, the same token ids with BOS for both), same model weights, same
transcoders, same ``max_feature_nodes``, same target rule (top logits covering 95%, at most 10).

Cases:

- ``trained``: the trained transcoders of layers 3 and 6 (``--trained``, default ``runs/default``).
  circuit-tracer needs a ``TranscoderSet`` with one transcoder per layer 0..max, all of one width, and
  its activation caching encodes at every model layer, so it gets *zero* transcoders on the other 28
  layers (``W_enc = b_enc = W_dec = b_dec = 0``: no feature ever fires, the error node is the whole MLP
  output), which is exactly how sparsetrace treats a layer without a transcoder.
- ``all30``: random transcoders (4608 features) on all 30 layers, seeded and calibrated to ~32 active
  features per token (``bench_attribute.random_transcoders``), the same weights for both tools.

How circuit-tracer is run here (offline, local model folder, local transcoders). Its documented loaders
cannot: ``ReplacementModel.from_pretrained*`` with the TransformerLens backend calls
``HookedTransformer.from_pretrained``, which only accepts TransformerLens's official model names (SmolLM2
is not one of its 247; a local folder path is rejected with ``ValueError: ... not found``); the nnsight
backend fails to import (``ModuleNotFoundError: nnsight.intervention.tracing`` with nnsight 0.8.1); and
transformers 4.57.3 in the peer venv cannot read the cached tokenizer (``Tokenizer class
TokenizersBackend does not exist``) and reads ``rope_theta`` as 10000 instead of the 100000 in the
folder's transformers-5 ``rope_parameters``. So the peer worker builds the model by hand from public
pieces: a ``HookedTransformerConfig`` written from ``config.json`` (Llama, GQA 9/3 heads, RMSNorm, RoPE
base 100000), weights converted with TransformerLens's ``convert_llama_weights``, circuit-tracer's
``TransformerLensReplacementModel.from_config`` with a ``TranscoderSet`` of ``SingleLayerTranscoder``
(ReLU) built in memory from our saved weights (our dictionaries fold their input/output normalisation
into ``W_enc``/``W_dec``/``b_dec``, so ``relu(x W_enc^T + b_enc) W_dec + b_dec`` on the raw ``mlp_in`` is
the whole forward, as in circuit-tracer's ``encode``/``decode``), hooks ``mlp.hook_in`` -> ``mlp.hook_out``,
and a ``PreTrainedTokenizerFast`` from ``tokenizer.json``. Its logits are checked against ours.

Timing: both tools stay loaded in their own process (ours with ``--ours-python``, the python with
sparsetrace and transformers 5; the peer with the peer venv) and run one full attribution per step,
alternately (who goes first alternates by rep), ``--repeat`` times (``--repeat-all30`` for all30); the
table reports the fastest and the median. Batch sizes: ours its default (``auto_batch_size``, 128 targets
per backward for this 24-token prompt); circuit-tracer ``--peer-batch-size`` 32, the fastest of a sweep
on the trained case (its default 512: 146 s and +8.9 GB; 128: about 70 s; 8..64: 43..49 s, load 5-6).
Timed: ours ``attribute(lm, ids, dicts, prune=False)`` (replacement model, clean and recorded forwards,
all rows, node assembly, influence and scores; no pruning), circuit-tracer
``attribute(ids, model)`` (its precompute forward, batched forward, rows, dense graph; it computes no
influence or scores). Threads: ``--threads`` (default 2) in both; ours drops to 1 thread when the machine
is oversubscribed (its ``auto_threads``: 1-minute load > 1.5 x CPUs) and the peer worker applies the same
rule before each of its runs. Memory: a thread samples each worker's RSS (/proc/self/statm) every 5 ms
during the timed calls; reported are the peak RSS during attribution and its rise over the RSS before
the call (the graph and autograd state the call allocates), plus the process's ``ru_maxrss``.

Edge agreement: the full (unpruned) graphs of both are matched by node identity: feature
(layer, position, feature), error (layer, position), embedding (position), logit (token id); an edge is
(source node, target node). Compared are all edges whose source and target nodes exist in both graphs
(features visited by both; either side's missing edge counts as 0), except edges from the BOS-position
error nodes: circuit-tracer zeroes all transcoder activations *and* the error vectors at position 0
(``zero_positions``), so its BOS MLP outputs are no source at all, while ours keeps BOS features and
errors as nodes; this changes neither tool's other edges (each edge is a direct effect in the same
frozen linear model). Conventions are otherwise the same: edge weight = source activation x virtual
weight, feature targets are encoder pre-activations without ``b_enc``, logit targets are logit minus
mean logit (``W_U[t] - mean W_U``), attention patterns and norm scales frozen, MLP outputs constant.
Reported per pair of graphs: the per-edge relative difference ``|a - b| / max(|a|, |b|)`` (max, median,
99.9th percentile, and max over the edges of at least 10% / 1% of the largest weight into the same
target), and the row-relative difference ``|a - b| / max |w into that target|`` (max), which is the
headline: float32 noise in a target's gradient is a fixed fraction of that target's edge scale, so small
edges (cancellations) have large per-edge relative differences in either tool. To show that, the
``--reference`` cases also build ours in float64 (model and transcoders, same inputs) and compare both
float32 graphs with it.

The last line is the speed ratio (circuit-tracer seconds / ours, fastest runs) of the slowest-ratio case.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import READY, STEP, Served, emit, fmt, machine_line, median, peer_python, run_worker, table  # noqa: E402

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
MODEL_DIR = Path("~/.cache/sparsetrace/models/smollm2-135m").expanduser()
KIND = {"embedding": 0, "feature": 1, "error": 2, "logit": 3}


# ------------------------------------------------------------------------------------------ shared
def node_codes(kind, layer, pos, idx):
    """One int64 per node: kind (2 bits) | layer + 1 (6 bits) | position (14 bits) | feature / token (20 bits)."""
    import numpy as np

    kind, layer, pos, idx = (np.asarray(x, dtype=np.int64) for x in (kind, layer, pos, idx))
    return (kind << 40) | ((layer + 1) << 34) | (pos << 20) | idx


class RssSampler:
    """Samples this process's resident set size every ``interval`` seconds while active."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self.start = 0
        self._stop = threading.Event()
        self._t: threading.Thread | None = None

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.start = self.peak = self.rss()
        self._stop.clear()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        assert self._t is not None
        self._t.join()
        self.peak = max(self.peak, self.rss())


def auto_threads(n: int) -> int:
    """sparsetrace's rule (attribute.threads.auto_threads), applied to the peer too."""
    return 1 if n > 1 and os.getloadavg()[0] > 1.5 * (os.cpu_count() or 1) else n


def serve(run_once, finish, state: dict) -> None:
    """Worker loop: READY, then one timed ``run_once()`` per ``step`` line (the previous run's graph in
    ``state`` is dropped first, outside the measurement), ``finish()`` on ``done``."""
    import gc

    print(READY, flush=True)
    times, mems = [], []
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            state.clear()
            gc.collect()
            with RssSampler() as s:
                t = time.perf_counter()
                info = run_once()
                dt = time.perf_counter() - t
            times.append(dt)
            mems.append({"peak_mb": s.peak / 2**20, "rise_mb": (s.peak - s.start) / 2**20, **(info or {})})
            print(f"{STEP}{dt}", flush=True)
        elif cmd == "done":
            break
    res = finish()
    res.update(times=times, runs=mems, ru_maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               python=sys.executable)
    emit(res)


# ------------------------------------------------------------------------------------------ ours
def worker_ours(a) -> None:
    import numpy as np
    import torch
    import transformers
    from bench_attribute import PROMPT, random_transcoders
    from safetensors.torch import save_file

    from sparsetrace.attribute import attribute
    from sparsetrace.dictionary.io import find_dictionaries
    from sparsetrace.dictionary.load import load_dictionary
    from sparsetrace.model.adapter import LanguageModel

    torch.set_num_threads(a.threads)
    lm = LanguageModel.load("smollm2-135m")
    ids = lm.tokenize(PROMPT)
    if a.case == "trained":
        dicts = [load_dictionary(p) for p in find_dictionaries(a.trained)]
    else:
        dicts = random_transcoders(lm)
    work = Path(a.workdir)
    tensors = {}
    for d in dicts:
        c = d.cfg
        if c.kind != "transcoder" or c.activation != "relu" or (c.hookpoint_in, c.hookpoint_out) != ("mlp_in", "mlp_out"):
            raise SystemExit(f"layer {c.layer}: {c.kind}/{c.activation} {c.hookpoint_in}->{c.hookpoint_out}; "
                             "this benchmark gives circuit-tracer plain ReLU transcoders mlp_in -> mlp_out only")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            tensors[f"L{c.layer}.{name}"] = getattr(d, name).detach().float().contiguous().clone()
    with torch.no_grad():
        clean = lm.model(ids).logits[0, -1].float()
    tensors["ids"] = ids[0].clone()
    tensors["clean_logits"] = clean.contiguous()
    save_file(tensors, str(work / "inputs.safetensors"))
    batch = a.batch_size or None
    state = {}

    def run_once():
        g = attribute(lm, ids, dicts, max_feature_nodes=a.max_feature_nodes, batch_size=batch, prune=False)
        state["g"] = g
        return {"threads": g.metadata["num_threads"], "batch_size": g.metadata["batch_size"]}

    def finish():
        g = state.pop("g")
        nodes = g.nodes
        codes = node_codes([KIND[n.kind] for n in nodes], [n.layer for n in nodes], [n.position for n in nodes],
                           [(n.token_id if n.kind == "logit" else n.feature) or 0 for n in nodes])
        src, dst, w = g.edges.numpy()
        np.savez(work / "edges_ours.npz", nodes=codes, src=codes[src], dst=codes[dst], w=w.astype(np.float32))
        m = g.metadata
        return {"who": "ours", "n_active": m["n_active_features"], "n_feature_rows": m["n_feature_rows"],
                "n_logits": len(m["targets"]), "targets": [t["token"] for t in m["targets"]],
                "n_nodes": len(nodes), "n_edges": len(g.edges), "exactness": m["exactness"],
                "timings": m["timings"], "transformers": transformers.__version__, "torch": torch.__version__}

    serve(run_once, finish, state)


# ------------------------------------------------------------------------------------------ circuit-tracer
def build_peer_model(work: Path, n_layers_hint: int | None = None, transcoders=None):
    """circuit-tracer's TransformerLens replacement model of the cached SmolLM2 folder with our transcoders
    (built from ``work/inputs.safetensors``, or ``transcoders``: a TranscoderSet already loaded)."""
    import torch
    import torch.nn.functional as F
    from circuit_tracer.transcoder import SingleLayerTranscoder, TranscoderSet
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    from transformers import PreTrainedTokenizerFast

    hf = json.loads((MODEL_DIR / "config.json").read_text())
    tok_cfg = json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
    rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta")
    if not rope:
        raise SystemExit("config.json has no rope_theta")
    d, L = hf["hidden_size"], hf["num_hidden_layers"]
    cfg = HookedTransformerConfig(
        d_model=d, d_head=hf.get("head_dim") or d // hf["num_attention_heads"], n_heads=hf["num_attention_heads"],
        d_mlp=hf["intermediate_size"], n_layers=L, n_ctx=2048, eps=hf["rms_norm_eps"], d_vocab=hf["vocab_size"],
        act_fn=hf["hidden_act"], n_key_value_heads=hf["num_key_value_heads"], normalization_type="RMS",
        positional_embedding_type="rotary", rotary_adjacent_pairs=False, rotary_dim=hf.get("head_dim") or d // hf["num_attention_heads"],
        rotary_base=float(rope), final_rms=True, gated_mlp=True, original_architecture="LlamaForCausalLM",
        model_name="SmolLM2-135M-Instruct", device="cpu", dtype=torch.float32, default_prepend_bos=False)
    # transformers 4.57 cannot load this tokenizer_config (TokenizersBackend): build the fast tokenizer from
    # tokenizer.json and save it, so TransformerLens (which reloads it by name_or_path) finds a loadable copy
    tok = PreTrainedTokenizerFast(tokenizer_file=str(MODEL_DIR / "tokenizer.json"),
                                  **{k: tok_cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in tok_cfg})
    tok.save_pretrained(str(work / "tokenizer"))
    tok = PreTrainedTokenizerFast.from_pretrained(str(work / "tokenizer"))

    t = load_file(str(work / "inputs.safetensors"))
    if transcoders is not None:
        return _peer_model(cfg, transcoders, tok, convert_llama_weights), t
    n_feat = {t[k].shape[0] for k in t if k.endswith(".W_enc")}
    if len(n_feat) != 1:
        raise SystemExit(f"circuit-tracer's TranscoderSet needs one width for all layers, got {sorted(n_feat)}")
    n = n_feat.pop()
    zero_w, zero_b = torch.zeros(n, d), torch.zeros(n)  # shared by every layer without a transcoder
    zero_bd = torch.zeros(d)
    tcs = {}
    for layer in range(L):
        with torch.device("meta"):
            tc = SingleLayerTranscoder(d, n, F.relu, layer, dtype=torch.float32)
        p = f"L{layer}."
        sd = ({k: t[p + k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")} if p + "W_enc" in t
              else {"W_enc": zero_w, "b_enc": zero_b, "W_dec": zero_w, "b_dec": zero_bd})
        tc.load_state_dict(sd, assign=True)
        tcs[layer] = tc
    ts = TranscoderSet(tcs, feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out")
    return _peer_model(cfg, ts, tok, convert_llama_weights), t


def _peer_model(cfg, ts, tok, convert_llama_weights):
    """circuit-tracer's replacement model with the cached SmolLM2 weights converted to TransformerLens."""
    import torch
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )
    from transformers import AutoModelForCausalLM

    model = TransformerLensReplacementModel.from_config(cfg, ts, tokenizer=tok)
    hf_model = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32)  # weights only
    sd = {}
    for k, v in convert_llama_weights(hf_model, cfg).items():
        k = k.replace(".mlp.", ".mlp.old_mlp.") if ".mlp." in k else k  # circuit-tracer wraps mlp / unembed
        sd[k.replace("unembed.", "unembed.old_unembed.")] = v
    res = model.load_state_dict(sd, strict=False)
    params = {k for k, _ in model.named_parameters()}
    missing = [k for k in res.missing_keys if k in params and not k.startswith("transcoders.")]
    if missing or res.unexpected_keys:
        raise SystemExit(f"weight conversion: missing {missing[:5]}, unexpected {res.unexpected_keys[:5]}")
    del hf_model, sd
    return model


def worker_peer(a) -> None:
    import gc
    from importlib.metadata import version

    import numpy as np
    import torch
    from circuit_tracer import attribute

    torch.set_num_threads(a.threads)
    work = Path(a.workdir)
    model, t = build_peer_model(work)
    gc.collect()
    ids = t["ids"].long()
    with torch.no_grad():
        logits = model(ids[None])[0, -1]
    clean = t["clean_logits"]
    logit_diff = float((logits - clean).abs().max())
    state = {}

    def run_once():
        n = auto_threads(a.threads)
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            state["g"] = attribute(ids, model, max_feature_nodes=a.max_feature_nodes, batch_size=a.peer_batch_size)
        finally:
            torch.set_num_threads(old)
        return {"threads": n, "batch_size": a.peer_batch_size}

    def finish():
        g = state.pop("g")
        A = g.adjacency_matrix
        n_pos, n_layers = len(g.input_tokens), g.cfg.n_layers
        sel = g.active_features[g.selected_features]  # (layer, pos, feature)
        n_sel = sel.shape[0]
        logit_ids = [lt.vocab_idx for lt in g.logit_targets]
        kind = [1] * n_sel + [2] * (n_layers * n_pos) + [0] * n_pos + [3] * len(logit_ids)
        layer = sel[:, 0].tolist() + [i // n_pos for i in range(n_layers * n_pos)] + [-1] * n_pos + [n_layers] * len(logit_ids)
        pos = (sel[:, 1].tolist() + [i % n_pos for i in range(n_layers * n_pos)] + list(range(n_pos))
               + [n_pos - 1] * len(logit_ids))
        idx = sel[:, 2].tolist() + [0] * (n_layers * n_pos + n_pos) + logit_ids
        codes = node_codes(kind, layer, pos, idx)
        assert codes.shape[0] == A.shape[0] == A.shape[1], (codes.shape, A.shape)
        r, c = A.nonzero(as_tuple=True)
        w = A[r, c].numpy().astype(np.float32)
        np.savez(work / "edges_peer.npz", nodes=codes, src=codes[c.numpy()], dst=codes[r.numpy()], w=w)
        return {"who": "circuit-tracer", "n_active": int(g.active_features.shape[0]), "n_feature_rows": int(n_sel),
                "n_logits": len(logit_ids), "targets": [lt.token_str for lt in g.logit_targets],
                "n_nodes": int(A.shape[0]), "n_edges": int(w.size), "dense_matrix_mb": A.numel() * 4 / 2**20,
                "logit_max_abs_diff_vs_ours": logit_diff,
                "versions": {k: version(k) for k in ("circuit-tracer", "transformer-lens", "transformers", "torch")}}

    serve(run_once, finish, state)


# ------------------------------------------------------------------------------------------ agreement
def compare(work: Path, first: str = "ours", second: str = "peer") -> dict:
    """Agreement of ``edges_{first}.npz`` and ``edges_{second}.npz`` (see the module docstring)."""
    import numpy as np

    o, p = np.load(work / f"edges_{first}.npz"), np.load(work / f"edges_{second}.npz")
    common = np.intersect1d(o["nodes"], p["nodes"])
    bos_err = node_codes(2, np.arange(-1, 63), 0, 0)  # error nodes at position 0, any layer
    sources = np.setdiff1d(common, bos_err)

    def keep(e):
        m = np.isin(e["src"], sources) & np.isin(e["dst"], common)
        return e["src"][m], e["dst"][m], e["w"][m].astype(np.float64)

    os_, od, ow = keep(o)
    ps, pd, pw = keep(p)
    dst_all, inv = np.unique(np.concatenate([od, pd]), return_inverse=True)
    assert dst_all.size < 2**21
    ko = os_ * 2**21 + inv[: od.size]  # source code < 2^42, so the (source, target) key fits in int64
    kp = ps * 2**21 + inv[od.size:]
    keys, where = np.unique(np.concatenate([ko, kp]), return_inverse=True)
    a = np.zeros(keys.size)
    b = np.zeros(keys.size)
    a[where[: ko.size]] = ow
    b[where[ko.size:]] = pw
    mag = np.maximum(np.abs(a), np.abs(b))
    diff = np.abs(a - b)
    rel = diff / np.maximum(mag, 1e-30)
    row = keys % 2**21  # target index
    row_max = np.zeros(dst_all.size)
    np.maximum.at(row_max, row, mag)
    of_row = mag / row_max[row]
    out = {
        "common_feature_nodes": int(((common >> 40) == 1).sum()),
        "first_feature_nodes": int(((o["nodes"] >> 40) == 1).sum()),
        "second_feature_nodes": int(((p["nodes"] >> 40) == 1).sum()),
        "targets_compared": int(dst_all.size), "edges_compared": int(keys.size),
        "only_first": int(((a != 0) & (b == 0)).sum()), "only_second": int(((a == 0) & (b != 0)).sum()),
        "max_rel_diff": float(rel.max()), "median_rel_diff": float(np.median(rel)),
        "p999_rel_diff": float(np.quantile(rel, 0.999)),
        "max_row_rel_diff": float((diff / row_max[row]).max()),  # |a - b| / largest |w| into that target
    }
    for name, lo in (("10pct", 0.1), ("1pct", 0.01)):
        m = of_row >= lo
        out[f"edges_ge_{name}_of_row"] = int(m.sum())
        out[f"max_rel_diff_ge_{name}_of_row"] = float(rel[m].max())
    return out


def worker_ref64(a) -> None:
    """Ours in float64 (model and transcoders) on the same inputs: a reference for both float32 graphs."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from sparsetrace.attribute import attribute
    from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary
    from sparsetrace.model.adapter import LanguageModel

    torch.set_num_threads(a.threads)
    work = Path(a.workdir)
    lm = LanguageModel.load("smollm2-135m", dtype=torch.float64)
    t = load_file(str(work / "inputs.safetensors"))
    dicts = []
    for layer in sorted(int(k[1:].split(".")[0]) for k in t if k.endswith(".W_enc")):
        w = {k: t[f"L{layer}.{k}"] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
        n, d = w["W_enc"].shape
        cfg = DictionaryConfig(kind="transcoder", d_in=d, d_out=w["W_dec"].shape[1], n_features=n, layer=layer,
                               model_id=lm.model_id)
        sd = SparseDictionary(cfg)
        with torch.no_grad():
            for k, v in w.items():
                getattr(sd, k).copy_(v)
        dicts.append(sd.double().eval())
    t0 = time.perf_counter()
    g = attribute(lm, t["ids"].long()[None], dicts, max_feature_nodes=a.max_feature_nodes, prune=False,
                  batch_size=a.batch_size or None)
    dt = time.perf_counter() - t0
    nodes = g.nodes
    codes = node_codes([KIND[n.kind] for n in nodes], [n.layer for n in nodes], [n.position for n in nodes],
                       [(n.token_id if n.kind == "logit" else n.feature) or 0 for n in nodes])
    src, dst, w = g.edges.numpy()
    np.savez(work / "edges_ref64.npz", nodes=codes, src=codes[src], dst=codes[dst], w=w)
    emit({"seconds": dt, "exactness": g.metadata["exactness"], "n_edges": len(g.edges)})


# ------------------------------------------------------------------------------------------ driver
def ours_python(arg: str | None) -> str:
    if arg:
        return arg
    if os.environ.get("SPARSETRACE_PYTHON"):
        return os.environ["SPARSETRACE_PYTHON"]
    if ".venv-peers" not in sys.executable:
        return sys.executable
    found = shutil.which("python3")
    if not found:
        raise SystemExit("no python3 on PATH for sparsetrace; pass --ours-python")
    return found


def run_case(a, case: str, work: Path) -> dict:
    here = Path(__file__).resolve()
    common_args = ["--case", case, "--workdir", str(work), "--max-feature-nodes", str(a.max_feature_nodes),
                   "--threads", str(a.threads), "--trained", a.trained]
    ours = Served(ours_python(a.ours_python), here,
                  ["--worker", "ours", *common_args, "--batch-size", str(a.batch_size or 0)],
                  env={"PYTHONPATH": str(BENCH)})
    if not ours.wait_ready():  # writes inputs.safetensors (token ids, clean logits, transcoder weights)
        return {"case": case, "error": f"ours: {ours.finish()['error']}"}
    peer = Served(peer_python(), here, ["--worker", "peer", *common_args,
                                        "--peer-batch-size", str(a.peer_batch_size)])
    if not peer.wait_ready():
        ours.finish()
        return {"case": case, "error": f"circuit-tracer: {peer.finish()['error']}"}
    procs = {"ours": ours, "circuit-tracer": peer}
    times = {k: [] for k in procs}
    for rep in range(a.repeat_all30 if case == "all30" else a.repeat):
        order = list(procs) if rep % 2 == 0 else list(procs)[::-1]
        for who in order:
            times[who].append(procs[who].step())
            print(f"  {case} rep {rep} {who}: {fmt(times[who][-1], 2)} s (load {os.getloadavg()[0]:.1f})", flush=True)
    res = {"case": case, "ours": ours.finish(), "circuit-tracer": peer.finish()}
    for who in procs:
        if "error" in res[who]:
            res["error"] = f"{who}: {res[who]['error']}"
            return res
    res["agreement"] = compare(work, "ours", "peer")
    if case in a.reference.split(","):
        ref = run_worker(ours_python(a.ours_python), here,
                         ["--worker", "ref64", *common_args, "--batch-size", str(a.batch_size or 0)], timeout=1800)
        res["reference_fp64"] = ref
        if "error" not in ref:
            res["agreement_ours_vs_fp64"] = compare(work, "ours", "ref64")
            res["agreement_peer_vs_fp64"] = compare(work, "peer", "ref64")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="trained,all30")
    ap.add_argument("--trained", default=str(ROOT / "runs" / "default"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--repeat-all30", type=int, default=2, help="repeats of the all30 case (5 min per pair)")
    ap.add_argument("--max-feature-nodes", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=0, help="ours (default: its auto_batch_size)")
    ap.add_argument("--peer-batch-size", type=int, default=32,
                    help="circuit-tracer targets per backward (default 32: its fastest here; its own default "
                         "512 took 146 s and +8.9 GB on the trained case, 128 about 70 s, 8..64 43..49 s)")
    ap.add_argument("--reference", default="trained",
                    help="cases that also get a float64 graph of ours as reference for both (comma list)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ours-python", default=None, help="python with sparsetrace (default: python3 on PATH)")
    ap.add_argument("--out", default=str(BENCH / "out" / "attribute_peer.json"))
    ap.add_argument("--keep", action="store_true", help="keep each case's work folder (inputs, both edge lists)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker == "ours":
        worker_ours(a)
        return 0
    if a.worker == "peer":
        worker_peer(a)
        return 0
    if a.worker == "ref64":
        worker_ref64(a)
        return 0

    import tempfile

    print(f"# bench_attribute_peer: max_feature_nodes={a.max_feature_nodes} repeat={a.repeat}/{a.repeat_all30} "
          f"peer batch={a.peer_batch_size} ({machine_line()})", flush=True)
    results = []
    for case in a.cases.split(","):
        if a.keep:
            tmp = tempfile.mkdtemp(prefix=f"attr_peer_{case}_")
            print(f"  {case}: inputs and edges kept in {tmp}", flush=True)
            results.append(run_case(a, case, Path(tmp)))
            continue
        with tempfile.TemporaryDirectory(prefix=f"attr_peer_{case}_") as tmp:
            results.append(run_case(a, case, Path(tmp)))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))

    rows, arows, ratios, worst = [], [], [], []
    for r in results:
        if "error" in r:
            print(f"{r['case']}: {r['error']}")
            continue
        for who in ("ours", "circuit-tracer"):
            x = r[who]
            runs = x["runs"]
            rows.append([r["case"], who, fmt(min(x["times"]), 2), fmt(median(x["times"]), 2),
                         "/".join(str(u["threads"]) for u in runs), str(runs[0]["batch_size"]),
                         str(x["n_active"]), str(x["n_feature_rows"] + x["n_logits"]), fmt(x["n_edges"]),
                         fmt(max(u["peak_mb"] for u in runs)), fmt(max(u["rise_mb"] for u in runs)),
                         fmt(x["ru_maxrss_mb"])])
        ratio = min(r["circuit-tracer"]["times"]) / min(r["ours"]["times"])
        ratios.append((r["case"], ratio))
        worst.append(r["agreement"]["max_row_rel_diff"])
        for label, key in (("ours vs ct", "agreement"), ("ours vs fp64", "agreement_ours_vs_fp64"),
                           ("ct vs fp64", "agreement_peer_vs_fp64")):
            g = r.get(key)
            if g is None:
                continue
            arows.append([r["case"], label,
                          f"{g['common_feature_nodes']}/{g['first_feature_nodes']}/{g['second_feature_nodes']}",
                          fmt(g["edges_compared"]), f"{g['only_first']}/{g['only_second']}",
                          f"{g['max_rel_diff']:.1e}", f"{g['median_rel_diff']:.1e}", f"{g['p999_rel_diff']:.1e}",
                          f"{g['max_rel_diff_ge_10pct_of_row']:.1e}", f"{g['max_rel_diff_ge_1pct_of_row']:.1e}",
                          f"{g['max_row_rel_diff']:.1e}"])
        print(f"{r['case']}: circuit-tracer logits vs ours (real model, last position): max abs diff "
              f"{r['circuit-tracer']['logit_max_abs_diff_vs_ours']:.1e}; ours exactness "
              f"{r['ours']['exactness']:.1e}; targets {r['ours']['targets']} / {r['circuit-tracer']['targets']}")
    print()
    print(table(["case", "tool", "best s", "median s", "threads", "batch", "active feats", "rows", "edges",
                 "peak RSS MB", "RSS rise MB", "ru_maxrss MB"], rows))
    print()
    print("edge agreement (rel = |a-b|/max(|a|,|b|) per edge; row rel = |a-b| / largest |w| into the same target)")
    print(table(["case", "pair", "features common/1st/2nd", "edges", "only 1st/2nd", "max rel", "median rel",
                 "p99.9 rel", "max rel >=10% row", "max rel >=1% row", "max row rel"], arows))
    if not ratios:
        print("attribution speed-up vs circuit-tracer: n/a (no case ran)")
        return 1
    case, ratio = min(ratios, key=lambda x: x[1])
    per = ", ".join(f"{c} {x:.1f}x" for c, x in ratios)
    print(f"attribution speed-up vs circuit-tracer: {ratio:.1f}x (slowest case {case}; {per}; "
          f"edge max rel diff {max(worst):.0e} of the target's largest edge)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
