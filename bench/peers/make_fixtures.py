"""Make small dictionary fixtures with the REAL peer packages (SAELens, sparsify).

Run with the peer venv (bench/peers/setup_venv.sh):

    HF_HUB_OFFLINE=1 bench/.venv-peers/bin/python bench/peers/make_fixtures.py [--out tests/fixtures/peers]

Every fixture is written by the peer's own save function (SAELens ``SAE.save_model``, sparsify
``SparseCoder.save_to_disk`` / ``TrainConfig.save_json``). Next to it we store, computed by the peer
itself, ``reference.safetensors`` with a fixed input ``x`` [16, d_in], the peer's output ``y`` and its
dense feature activations ``features``, plus ``SOURCE.txt`` naming package, version and function.

Weights are random with a fixed seed (d_in 64, 256 features) with non-zero biases and decoder rows
of non-unit norm, so bias folding and norm handling are exercised.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

D_IN = 64
N_FEATURES = 256
N_ROWS = 16
ROOT = Path(__file__).resolve().parents[2]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(seed: int, d: int = D_IN) -> torch.Tensor:
    return torch.randn(N_ROWS, d, generator=_gen(10_000 + seed))


def _source(folder: Path, package: str, function: str, notes: str) -> None:
    text = (
        f"package: {package}=={version(package)}\n"
        f"torch: {torch.__version__}\n"
        f"python: {sys.version.split()[0]}\n"
        f"written by: {function}\n"
        f"reference: x = seeded randn [{N_ROWS}, d_in]; y and features computed by {package} itself\n"
        f"script: bench/peers/make_fixtures.py\n"
        f"notes: {notes}\n"
    )
    (folder / "SOURCE.txt").write_text(text, encoding="utf-8")


def _reference(folder: Path, x: torch.Tensor, y: torch.Tensor, features: torch.Tensor) -> None:
    save_file(
        {"x": x.contiguous(), "y": y.detach().contiguous(), "features": features.detach().contiguous()},
        str(folder / "reference.safetensors"),
    )


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


# ---------------------------------------------------------------------------------------- SAELens
def _fill_saelens(sae, seed: int, *, d_out: int | None = None, threshold: bool = False, skip: bool = False):
    """Random weights in SAELens' own layout (W_enc [d_in, d_sae], W_dec [d_sae, d_out])."""
    g = _gen(seed)
    d_out = d_out or D_IN
    with torch.no_grad():
        w_dec = torch.randn(N_FEATURES, d_out, generator=g)
        # decoder rows of norm 0.5..1.5 (not unit) to exercise norm handling
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True) * (0.5 + torch.rand(N_FEATURES, 1, generator=g))
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(torch.randn(D_IN, N_FEATURES, generator=g) / D_IN**0.5)
        sae.b_enc.copy_(0.2 * torch.randn(N_FEATURES, generator=g) - 0.3)
        sae.b_dec.copy_(0.5 * torch.randn(d_out, generator=g))
        if threshold:
            sae.threshold.copy_(0.1 + 0.4 * torch.rand(N_FEATURES, generator=g))
        if skip:
            sae.W_skip.copy_(0.05 * torch.randn(d_out, D_IN, generator=g))
    return sae.eval()


def make_saelens(out: Path) -> list[str]:
    import sae_lens
    from sae_lens import (
        SAE,
        JumpReLUSAE,
        JumpReLUSAEConfig,
        JumpReLUSkipTranscoder,
        JumpReLUSkipTranscoderConfig,
        SkipTranscoder,
        SkipTranscoderConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
        Transcoder,
        TranscoderConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    def meta(hook, hook_out=None, model="gpt2"):
        m = SAEMetadata(model_name=model, hook_name=hook, hook_head_index=None, prepend_bos=True, context_size=128)
        if hook_out is not None:
            m.hook_name_out = hook_out
        return m

    specs = [
        (
            "saelens_standard",
            StandardSAE,
            StandardSAEConfig(d_in=D_IN, d_sae=N_FEATURES, apply_b_dec_to_input=True,
                              metadata=meta("blocks.6.hook_resid_pre")),
            {},
            "StandardSAE (ReLU), apply_b_dec_to_input=True",
        ),
        (
            "saelens_topk",
            TopKSAE,
            TopKSAEConfig(d_in=D_IN, d_sae=N_FEATURES, k=8, apply_b_dec_to_input=True,
                          rescale_acts_by_decoder_norm=True, metadata=meta("blocks.4.hook_resid_post")),
            {},
            "TopKSAE k=8, apply_b_dec_to_input=True, rescale_acts_by_decoder_norm=True",
        ),
        (
            "saelens_jumprelu",
            JumpReLUSAE,
            JumpReLUSAEConfig(d_in=D_IN, d_sae=N_FEATURES, apply_b_dec_to_input=False,
                              metadata=meta("blocks.2.hook_mlp_out", model="gemma-2-2b")),
            {"threshold": True},
            "JumpReLUSAE, apply_b_dec_to_input=False",
        ),
        (
            "saelens_transcoder",
            Transcoder,
            TranscoderConfig(d_in=D_IN, d_sae=N_FEATURES, d_out=48, apply_b_dec_to_input=False,
                             metadata=meta("blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out")),
            {"d_out": 48},
            "Transcoder (ReLU), d_out=48 to catch transposes",
        ),
        (
            "saelens_skip_transcoder",
            SkipTranscoder,
            SkipTranscoderConfig(d_in=D_IN, d_sae=N_FEATURES, d_out=D_IN, apply_b_dec_to_input=False,
                                 metadata=meta("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")),
            {"skip": True},
            "SkipTranscoder (ReLU + W_skip)",
        ),
        (
            "saelens_jumprelu_skip_transcoder",
            JumpReLUSkipTranscoder,
            JumpReLUSkipTranscoderConfig(d_in=D_IN, d_sae=N_FEATURES, d_out=D_IN, apply_b_dec_to_input=False,
                                         metadata=meta("blocks.5.ln2.hook_normalized", "blocks.5.hook_mlp_out",
                                                       model="gemma-2-2b")),
            {"skip": True, "threshold": True},
            "JumpReLUSkipTranscoder (JumpReLU + W_skip)",
        ),
    ]
    made = []
    for i, (name, cls, cfg, fill, notes) in enumerate(specs):
        folder = _fresh(out / name)
        sae = _fill_saelens(cls(cfg), seed=100 + i, **fill)
        sae.save_model(folder)
        # reload with SAELens' own loader, so the reference is what a SAELens user gets from the folder
        loaded = SAE.load_from_disk(folder, device="cpu")
        x = _x(i)
        with torch.no_grad():
            features = loaded.encode(x)
            y = loaded(x)
            y_direct = sae(x)
        assert torch.equal(y, y_direct), f"{name}: reloaded SAELens model differs from the saved one"
        _reference(folder, x, y, features)
        _source(folder, "sae-lens", f"sae_lens.{cls.__name__}.save_model (sae_lens {sae_lens.__version__})",
                notes + "; reference from SAE.load_from_disk(folder) encode()/forward()")
        made.append(name)
        print(f"{name}: features active per row {float((features != 0).float().sum(-1).mean()):.1f}")
    return made


# --------------------------------------------------------------------------------------- sparsify
def make_sparsify(out: Path) -> list[str]:
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.__main__ import RunConfig

    specs = [
        ("sparsify_topk", "layers.6", dict(transcode=False, skip_connection=False), "EleutherAI/pythia-70m",
         "SparseCoder TopK SAE k=8 on the output of layers.6 (resid_post)"),
        ("sparsify_transcoder", "layers.3.mlp", dict(transcode=True, skip_connection=False),
         "HuggingFaceTB/SmolLM2-135M", "SparseCoder transcoder (transcode=True) k=8 on layers.3.mlp"),
        ("sparsify_skip_transcoder", "layers.2.mlp", dict(transcode=True, skip_connection=True),
         "HuggingFaceTB/SmolLM2-135M", "SparseCoder skip transcoder (transcode=True, skip_connection=True) k=8"),
    ]
    made = []
    for i, (name, hookpoint, flags, model, notes) in enumerate(specs):
        run = _fresh(out / name)
        cfg = SparseCoderConfig(num_latents=N_FEATURES, k=8, **flags)
        torch.manual_seed(200 + i)
        sae = SparseCoder(D_IN, cfg, device="cpu")
        g = _gen(300 + i)
        with torch.no_grad():
            if flags["transcode"]:  # sparsify initialises a transcoder decoder at zero; give it content
                sae.W_dec.copy_(torch.randn(N_FEATURES, D_IN, generator=g) / D_IN**0.5)
            else:
                sae.W_dec.mul_(0.5 + torch.rand(N_FEATURES, 1, generator=g))
            sae.encoder.bias.copy_(0.2 * torch.randn(N_FEATURES, generator=g) - 0.1)
            sae.b_dec.copy_(0.5 * torch.randn(D_IN, generator=g))
            if sae.W_skip is not None:
                sae.W_skip.copy_(0.05 * torch.randn(D_IN, D_IN, generator=g))
        sae.eval()
        folder = run / hookpoint
        sae.save_to_disk(folder)
        # the run-level config.json sparsify's trainer writes (names the model)
        RunConfig(sae=cfg, model=model, hookpoints=[hookpoint], run_name=name).save_json(str(run / "config.json"))
        loaded = SparseCoder.load_from_disk(folder, device="cpu")
        x = _x(50 + i)
        with torch.no_grad():
            outp = loaded(x)
            features = torch.zeros(N_ROWS, N_FEATURES).scatter_(1, outp.latent_indices, outp.latent_acts)
            y = outp.sae_out
        _reference(folder, x, y, features)
        _source(folder, "eai-sparsify",
                "sparsify.SparseCoder.save_to_disk (+ sparsify.__main__.RunConfig.save_json for ../config.json)",
                notes + "; reference from SparseCoder.load_from_disk(folder)(x).sae_out / latent_acts")
        made.append(f"{name}/{hookpoint}")
        print(f"{name}/{hookpoint}: ok")
    return made


# ------------------------------------------------------------------------- trained by the peers
def _synthetic_batches(seed: int, n_batches: int, batch: int = 512, n_atoms: int = 128, active: int = 4):
    """Sparse sums of ground-truth directions plus noise: data a dictionary can learn in a few hundred
    steps, so the trained weights are structured (not the random init)."""
    g = _gen(seed)
    atoms = torch.randn(n_atoms, D_IN, generator=g)
    atoms = atoms / atoms.norm(dim=-1, keepdim=True)
    out = []
    for _ in range(n_batches):
        idx = torch.randint(0, n_atoms, (batch, active), generator=g)
        coef = torch.rand(batch, active, generator=g) * 2 + 0.5
        x = torch.einsum("bk,bkd->bd", coef, atoms[idx]) + 0.05 * torch.randn(batch, D_IN, generator=g)
        out.append(x)
    return out


def make_trained(out: Path, steps: int = 300) -> list[str]:
    """One dictionary trained by each peer's own training code, then saved by its own save function."""
    import itertools

    import sae_lens
    from sae_lens import SAE, StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.sae_trainer import SAETrainer
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.__main__ import RunConfig
    from sparsify.sign_sgd import SignSGD

    made = []
    # --- sae-lens: StandardTrainingSAE trained by SAETrainer.step (the body of SAETrainer.fit)
    torch.manual_seed(400)
    data = _synthetic_batches(401, steps)
    meta = SAEMetadata(model_name="gpt2", hook_name="blocks.6.hook_resid_pre", hook_head_index=None,
                       prepend_bos=True, context_size=128)
    cfg = StandardTrainingSAEConfig(d_in=D_IN, d_sae=N_FEATURES, l1_coefficient=2.0, metadata=meta)
    sae = StandardTrainingSAE(cfg)
    tcfg = SAETrainerConfig(total_training_samples=512 * steps, train_batch_size_samples=512, lr=3e-3, lr_end=3e-4,
                            device="cpu", autocast=False)
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=itertools.cycle(data))
    first = last = None
    for i in range(steps):
        trainer.maybe_reset_sparsity()
        o = trainer.step(data[i])
        trainer.n_training_steps += 1
        mse = float((o.losses["mse_loss"] if "mse_loss" in o.losses else o.loss).detach())
        first = mse if first is None else first
        last = mse
    name = "saelens_trained"
    folder = _fresh(out / name)
    sae.eval()
    sae.save_model(folder)
    loaded = SAE.load_from_disk(folder, device="cpu")
    x = _x(60)
    with torch.no_grad():
        features, y = loaded.encode(x), loaded(x)
    _reference(folder, x, y, features)
    _source(folder, "sae-lens", f"sae_lens.SAETrainer.step x {steps} on a StandardTrainingSAE, then save_model "
            f"(sae_lens {sae_lens.__version__})",
            f"trained on synthetic sparse data (bench/peers/make_fixtures.py:_synthetic_batches); mse loss "
            f"{first:.4f} -> {last:.4f}; reference from SAE.load_from_disk(folder) encode()/forward()")
    made.append(name)
    print(f"{name}: mse {first:.4f} -> {last:.4f}, L0 {float((features > 0).float().sum(-1).mean()):.1f}")

    # --- sparsify: SparseCoder trained with its default optimizer (ScheduleFree SignSGD) and FVU loss,
    #     the per-batch body of sparsify.Trainer.fit
    torch.manual_seed(500)
    data = _synthetic_batches(501, steps)
    scfg = SparseCoderConfig(num_latents=N_FEATURES, k=8)
    coder = SparseCoder(D_IN, scfg, device="cpu", dtype=torch.float32)
    opt = ScheduleFreeWrapper(SignSGD([dict(params=coder.parameters(), lr=5e-3)]), momentum=0.95)
    opt.train()
    first = last = None
    for i in range(steps):
        x = data[i]
        coder.set_decoder_norm_to_unit_norm()
        o = coder(x=x, y=x, dead_mask=None, total_variance=(x - x.mean(0)).pow(2).sum())
        o.fvu.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        first = float(o.fvu) if first is None else first
        last = float(o.fvu)
    opt.eval()  # schedule-free: the evaluation weights
    coder.eval()
    name, hookpoint = "sparsify_trained", "layers.4"
    run = _fresh(out / name)
    folder = run / hookpoint
    coder.save_to_disk(folder)
    RunConfig(sae=scfg, model="EleutherAI/pythia-70m", hookpoints=[hookpoint], run_name=name).save_json(
        str(run / "config.json"))
    loaded = SparseCoder.load_from_disk(folder, device="cpu")
    x = _x(61)
    with torch.no_grad():
        o = loaded(x)
        features = torch.zeros(N_ROWS, N_FEATURES).scatter_(1, o.latent_indices, o.latent_acts)
    _reference(folder, x, o.sae_out, features)
    _source(folder, "eai-sparsify", f"sparsify SignSGD + ScheduleFreeWrapper steps x {steps} on SparseCoder "
            "(the body of sparsify.Trainer.fit, loss fvu), then SparseCoder.save_to_disk",
            f"TopK k=8 trained on synthetic sparse data; fvu {first:.4f} -> {last:.4f}; reference from "
            "SparseCoder.load_from_disk(folder)(x)")
    made.append(f"{name}/{hookpoint}")
    print(f"{name}/{hookpoint}: fvu {first:.4f} -> {last:.4f}")
    return made


# ---------------------------------------------------------------------------------- graphs (JSON)
def make_graphs(out: Path) -> list[str]:
    """A Neuronpedia graph JSON written by circuit-tracer's own writer (create_nodes /
    create_used_nodes_and_edges / build_model on a small synthetic circuit_tracer.graph.Graph),
    and a small sparsetrace-graph/1 JSON for the export direction."""
    import json

    import circuit_tracer
    from circuit_tracer.attribution.targets import LogitTarget
    from circuit_tracer.graph import Graph, prune_graph
    from circuit_tracer.utils.create_graph_files import build_model, create_nodes, create_used_nodes_and_edges
    from circuit_tracer.utils.tl_nnsight_mapping import UnifiedConfig

    g = _gen(500)
    n_layers, tokens = 2, [1, 17, 42, 9]
    n_pos = len(tokens)
    active = torch.tensor([[0, 0, 3], [0, 1, 7], [0, 2, 11], [1, 2, 5], [1, 3, 7], [1, 3, 250]])
    n_feat, n_err, n_logit = len(active), n_layers * n_pos, 2
    n = n_feat + n_err + n_pos + n_logit
    # layer of each node (tokens -1, logits n_layers) so edges only go upstream -> downstream
    layer = torch.cat([active[:, 0], torch.arange(n_layers).repeat_interleave(n_pos),
                       torch.full((n_pos,), -1), torch.full((n_logit,), n_layers)])
    A = torch.randn(n, n, generator=g) * (layer[:, None] > layer[None, :])
    cfg = UnifiedConfig(n_layers=n_layers, d_model=8, d_head=4, n_heads=2, d_mlp=32, d_vocab=300,
                        tokenizer_name="synthetic", model_name="synthetic", original_architecture="synthetic")
    graph = Graph(input_string="a b c d", input_tokens=torch.tensor(tokens), active_features=active,
                  adjacency_matrix=A, cfg=cfg, selected_features=torch.arange(n_feat),
                  activation_values=torch.rand(n_feat, generator=g) + 0.5,
                  logit_targets=[LogitTarget(" yes", 77), LogitTarget(" no", 78)],
                  logit_probabilities=torch.tensor([0.6, 0.3]), scan="synthetic-scan")

    class Tok:  # stands in for the HF tokenizer circuit-tracer would download
        def decode(self, t):
            return f"t{int(t)}"

    node_mask, edge_mask, scores = prune_graph(graph, node_threshold=0.95, edge_threshold=0.99)
    nodes = create_nodes(graph, node_mask, Tok(), scores)
    used_nodes, used_edges = create_used_nodes_and_edges(graph, nodes, edge_mask)
    model = build_model(graph, used_nodes, used_edges, "synthetic-graph", "synthetic-scan", 0.95, Tok())
    folder = _fresh(out / "circuit_tracer_graph")
    (folder / "graph.json").write_text(model.model_dump_json(indent=2), encoding="utf-8")
    _source(folder, "circuit-tracer",
            f"circuit_tracer.utils.create_graph_files.create_nodes / create_used_nodes_and_edges / build_model "
            f"(circuit_tracer {getattr(circuit_tracer, '__version__', version('circuit-tracer'))}) + "
            f"Model.model_dump_json",
            "synthetic Graph (2 layers, 4 tokens, 6 features, 2 logit targets), pruned with prune_graph(0.95, 0.99); "
            "graph.json is the Neuronpedia file create_graph_files would write")

    ours = {
        "format": "sparsetrace-graph/1",
        "metadata": {"model": "stories260k", "prompt": "The cat sat", "prompt_tokens": ["<s>", "The", " cat", " sat"],
                     "prompt_token_ids": [1, 450, 6635, 3290],
                     "targets": [{"token": " on", "token_id": 373, "prob": 0.41},
                                 {"token": " down", "token_id": 1623, "prob": 0.12}],
                     "node_threshold": 0.8, "edge_threshold": 0.98,
                     "scores": {"replacement": 0.71, "completeness": 0.9}, "n_layers": 3},
        "nodes": [], "links": [],
    }
    toks = ours["metadata"]["prompt_tokens"]
    for p in range(4):
        ours["nodes"].append({"node_id": f"E@{p}", "kind": "embedding", "layer": -1, "position": p, "feature": None,
                              "hookpoint": None, "activation": None, "influence": 0.1 * p, "label": None,
                              "token": toks[p]})
    feats = [(0, 12, 1, "cat-ish"), (1, 7, 2, None), (2, 31, 3, "sitting"), (2, 4, 3, "position 3 noun")]
    for layer, f, p, label in feats:
        ours["nodes"].append({"node_id": f"L{layer}/F{f}@{p}", "kind": "feature", "layer": layer, "position": p,
                              "feature": f, "hookpoint": "mlp_in", "activation": 1.5 + f / 10, "influence": 0.3,
                              "label": label, "token": toks[p]})
    ours["nodes"].append({"node_id": "L1/ERR@3", "kind": "error", "layer": 1, "position": 3, "feature": None,
                          "hookpoint": "mlp_in", "activation": None, "influence": 0.05, "label": None, "token": toks[3]})
    for t in ours["metadata"]["targets"]:
        ours["nodes"].append({"node_id": f"LOGIT/{t['token_id']}@3", "kind": "logit", "layer": 3, "position": 3,
                              "feature": None, "hookpoint": None, "activation": None, "influence": 1.0,
                              "label": None, "token": t["token"]})
    ids = [nd["node_id"] for nd in ours["nodes"]]
    lay = {nd["node_id"]: nd["layer"] for nd in ours["nodes"]}
    w = torch.randn(len(ids), len(ids), generator=_gen(501))
    for i, s in enumerate(ids):
        for j, t in enumerate(ids):
            if lay[s] < lay[t] and (i + j) % 2 == 0:
                ours["links"].append({"source": s, "target": t, "weight": round(float(w[i, j]), 6)})
    (out / "graph_sparsetrace_small.json").write_text(json.dumps(ours, indent=1), encoding="utf-8")
    print(f"circuit_tracer_graph: {len(used_nodes)} nodes, {len(used_edges)} links; "
          f"graph_sparsetrace_small.json: {len(ours['nodes'])} nodes, {len(ours['links'])} links")
    return ["circuit_tracer_graph"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "peers")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    made = make_saelens(args.out) + make_sparsify(args.out) + make_trained(args.out) + make_graphs(args.out)
    for name in made:
        size = sum(p.stat().st_size for p in (args.out / name.split("/")[0]).rglob("*") if p.is_file())
        print(f"  {name}: {size / 1024:.0f} KiB")
        assert size < 300 * 1024, f"{name} is {size} bytes; keep fixtures under 300 KB"


if __name__ == "__main__":
    main()
