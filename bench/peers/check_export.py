"""Export sparsetrace dictionaries to SAELens / sparsify folders and load them IN the peer packages.

    HF_HUB_OFFLINE=1 bench/.venv-peers/bin/python bench/peers/check_export.py [--json out.json]

For each dictionary kind/activation the peer can represent: build one of ours (seeded, non-zero
biases), write it with ``export_saelens`` / ``export_sparsify``, load it with
``sae_lens.SAE.load_from_disk`` / ``sparsify.SparseCoder.load_from_disk``, and compare the peer's
output and feature activations with ours on a seeded input. Exits non-zero if any max abs
difference exceeds 1e-5.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from sparsetrace.dictionary.interop import export_saelens, export_sparsify  # noqa: E402
from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary  # noqa: E402

TOL = 1e-5
D, N = 64, 256


def ours(kind: str, activation: str, seed: int, d_out: int = D) -> SparseDictionary:
    hp = {"sae": ("resid_pre", "resid_pre")}.get(kind, ("mlp_in", "mlp_out"))
    cfg = DictionaryConfig(kind=kind, d_in=D, d_out=d_out if kind != "sae" else D, n_features=N,
                           activation=activation, k=8 if activation in ("topk", "batchtopk") else None,
                           layer=3, hookpoint_in=hp[0], hookpoint_out=hp[1], model_id="gpt2")
    d = SparseDictionary(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        d.b_enc.copy_(0.1 * torch.randn(N, generator=g) - 0.05)
        d.b_dec.copy_(0.5 * torch.randn(cfg.d_out, generator=g))
        d.W_dec.mul_(0.5 + torch.rand(N, 1, generator=g))
        if d.W_skip is not None:
            d.W_skip.copy_(0.05 * torch.randn(cfg.d_out, D, generator=g))
        if d.log_threshold is not None:
            d.log_threshold.copy_((0.05 + 0.2 * torch.rand(N, generator=g)).log())
        if d.batch_threshold is not None:
            d.batch_threshold.fill_(0.15)
    return d.eval()


def compare(name: str, d: SparseDictionary, y_peer: torch.Tensor, f_peer: torch.Tensor, x: torch.Tensor) -> dict:
    with torch.no_grad():
        y, f = d(x), d.features(x)
    r = {"case": name, "max_abs_y": float((y - y_peer).abs().max()), "max_abs_features": float((f - f_peer).abs().max()),
         "active_per_row": float((f != 0).float().sum(-1).mean())}
    r["ok"] = r["max_abs_y"] <= TOL and r["max_abs_features"] <= TOL
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    from sae_lens import SAE
    from sparsify import SparseCoder

    x = torch.randn(16, D, generator=torch.Generator().manual_seed(7)) * 2
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("sae", "relu"), ("sae", "topk"), ("sae", "jumprelu"), ("sae", "batchtopk"),
                 ("transcoder", "relu"), ("transcoder", "jumprelu"), ("skip_transcoder", "relu"),
                 ("skip_transcoder", "jumprelu")]
        for i, (kind, act) in enumerate(cases):
            d = ours(kind, act, seed=40 + i, d_out=48 if kind == "transcoder" else D)
            folder = export_saelens(d, Path(tmp) / f"saelens_{kind}_{act}")
            peer = SAE.load_from_disk(folder, device="cpu").eval()
            with torch.no_grad():
                f_peer, y_peer = peer.encode(x), peer(x)
            results.append(compare(f"sae-lens {type(peer).__name__} <- {kind}/{act}", d, y_peer, f_peer, x))
        for i, kind in enumerate(("sae", "transcoder", "skip_transcoder")):
            d = ours(kind, "topk", seed=80 + i)
            folder = export_sparsify(d, Path(tmp) / f"sparsify_{kind}" / "layers.3")
            peer = SparseCoder.load_from_disk(folder, device="cpu").eval()
            with torch.no_grad():
                out = peer(x)
            f_peer = torch.zeros(16, N).scatter_(1, out.latent_indices, out.latent_acts)
            results.append(compare(f"sparsify SparseCoder <- {kind}/topk", d, out.sae_out, f_peer, x))
    # the committed fixtures (written by the peers) loaded by sparsetrace
    from safetensors.torch import load_file

    from sparsetrace.dictionary.load import load_dictionary

    fix = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "peers"
    for ref_file in sorted(fix.rglob("reference.safetensors")):
        ref = load_file(str(ref_file))
        d = load_dictionary(ref_file.parent)
        name = f"fixture {ref_file.parent.relative_to(fix)} -> sparsetrace"
        results.append(compare(name, d, ref["y"], ref["features"], ref["x"]))
    report = {"sae-lens": version("sae-lens"), "eai-sparsify": version("eai-sparsify"), "torch": torch.__version__,
              "tolerance": TOL, "results": results}
    for r in results:
        print(f"{'ok ' if r['ok'] else 'BAD'} {r['case']:<62} max|dy|={r['max_abs_y']:.2e} "
              f"max|df|={r['max_abs_features']:.2e} active/row={r['active_per_row']:.1f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
