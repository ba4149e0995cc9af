"""The hand-written dense ReLU step (train/dense_relu.py) computes the loss, gradients and firing counts
of the plain autograd step (encode, decode, l1_penalty), in float64 exactly and in bfloat16 closely."""

import pytest
import torch

from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary
from sparsetrace.train.config import TrainConfig
from sparsetrace.train.dense_relu import dense_relu_forward
from sparsetrace.train.trainer import LayerTrainer


def _dictionary(kind: str, d_in: int = 20, d_out: int = 28, n: int = 300) -> SparseDictionary:
    d_out = d_in if kind == "sae" else d_out
    cfg = DictionaryConfig(kind=kind, d_in=d_in, d_out=d_out, n_features=n, activation="relu", layer=0,
                           hookpoint_in="mlp_in" if kind != "sae" else "resid_pre",
                           hookpoint_out="mlp_out" if kind != "sae" else "resid_pre", model_id="test")
    sd = SparseDictionary(cfg, seed=5).double()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        sd.b_enc.normal_(std=0.5, generator=g)  # about half the features fire: the dense regime
        sd.b_dec.normal_(generator=g)
        sd.W_dec.mul_(torch.rand(n, 1, generator=g, dtype=torch.float64) + 0.5)  # rows of unequal norm
        if sd.W_skip is not None:
            sd.W_skip.normal_(std=0.1, generator=g)
    return sd


def _loss(sd, x, y, lam, fused: bool, dtype=torch.float32):
    if fused:
        y_hat, l1, counts, code = dense_relu_forward(x, sd.W_enc, sd.b_enc, sd.W_dec, sd.b_dec, dtype)
        if sd.W_skip is not None:
            y_hat = y_hat + x @ sd.W_skip.t()
    else:
        c = sd.encode(x)
        y_hat, l1, counts, code = sd.decode(c, x), sd.l1_penalty(c), (c.dense > 0).sum(0), c.dense
    loss = (y_hat - y).pow(2).sum(-1).mean() / y.shape[-1] + lam * l1 / y.shape[-1]
    return loss, counts, code


@pytest.mark.parametrize("kind", ["sae", "transcoder", "skip_transcoder"])
def test_fused_step_equals_autograd_step(kind):
    torch.manual_seed(0)
    sd = _dictionary(kind)
    x = torch.randn(96, sd.cfg.d_in, dtype=torch.float64)
    y = x if kind == "sae" else torch.randn(96, sd.cfg.d_out, dtype=torch.float64)
    out = {}
    for fused in (False, True):
        sd.zero_grad(set_to_none=True)
        loss, counts, code = _loss(sd, x, y, 0.7, fused)
        loss.backward()
        out[fused] = (float(loss.detach()), counts, {k: p.grad.clone() for k, p in sd.named_parameters()})
    frac = float(out[False][1].sum()) / (96 * 300)
    assert 0.2 < frac < 0.8, frac  # really the dense regime
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-12)
    assert torch.equal(out[True][1], out[False][1].to(torch.long))
    assert set(out[True][2]) == set(out[False][2])
    for k, g in out[False][2].items():
        torch.testing.assert_close(out[True][2][k], g, rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("n_rows", [200, 600])  # one and several 256-row blocks
def test_bfloat16_step_is_close_and_counts_exact(n_rows):
    torch.manual_seed(1)
    sd = _dictionary("transcoder").float()
    x = torch.randn(n_rows, sd.cfg.d_in)
    y = torch.randn(n_rows, sd.cfg.d_out)
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        sd.zero_grad(set_to_none=True)
        loss, counts, code = _loss(sd, x, y, 0.7, True, dtype)
        loss.backward()
        grads[dtype] = {k: p.grad.clone() for k, p in sd.named_parameters()}
        if dtype == torch.bfloat16:
            assert code.dtype == torch.bfloat16
            # the counts are exact counts of the bf16 code's non-zeros, however many rows
            assert torch.equal(counts, (code > 0).sum(0))
            assert int(counts.max()) > 256 or n_rows <= 256
    for k, g in grads[torch.float32].items():
        rel = float((grads[torch.bfloat16][k] - g).norm() / g.norm())
        assert rel < 0.05, (k, rel)


def test_trainer_bfloat16_option_trains():
    torch.manual_seed(2)
    stats = {}
    for cd in ("float32", "bfloat16"):
        tcfg = TrainConfig(kind="sae", hookpoint="resid_pre", layers=[0], target_l0=8.0, n_features=256,
                           batch_size=256, n_tokens=256 * 60, compute_dtype=cd, sparse_relu=False)
        tr = LayerTrainer(tcfg, 0, 32, "test", 1.0, 1.0)
        g = torch.Generator().manual_seed(3)
        basis = torch.randn(64, 32, generator=g)
        first = last = None
        for _ in range(60):
            coef = torch.rand(256, 64, generator=g) * (torch.rand(256, 64, generator=g) < 0.06)
            s = tr.train_step(coef @ basis, coef @ basis)
            first = first if first is not None else s.fvu
            last = s
        stats[cd] = last
        assert last.fvu < 0.5 * first, (cd, first, last.fvu)
    assert abs(stats["bfloat16"].fvu - stats["float32"].fvu) < 0.1, stats


def test_compute_dtype_is_checked():
    from sparsetrace.errors import ConfigError

    with pytest.raises(ConfigError, match="float16"):
        TrainConfig(compute_dtype="float16").validate()


def test_enclosing_autocast_means_bfloat16_with_exact_counts():
    torch.manual_seed(3)
    sd = _dictionary("sae").float()
    x = torch.randn(600, sd.cfg.d_in)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_hat, l1, counts, code = dense_relu_forward(x, sd.W_enc, sd.b_enc, sd.W_dec, sd.b_dec)
    assert code.dtype == torch.bfloat16 and y_hat.dtype == torch.float32
    assert torch.equal(counts, (code > 0).sum(0))
    loss = y_hat.pow(2).mean() + l1
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in (sd.W_enc, sd.b_enc, sd.W_dec, sd.b_dec))
