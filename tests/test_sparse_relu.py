"""The active-features-only ReLU step (train/sparse_relu.py) computes the same loss and gradients as the
dense step, and the trainer switches to it once L0 is low."""

import pytest
import torch

from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary
from sparsetrace.train.config import TrainConfig
from sparsetrace.train.sparse_relu import SPARSE_DENSITY, ActiveReluEncode
from sparsetrace.train.trainer import LayerTrainer, _Objective


def _dictionary(kind: str, d: int = 24, n: int = 384, bias: float = -0.9) -> SparseDictionary:
    cfg = DictionaryConfig(kind=kind, d_in=d, d_out=d, n_features=n, activation="relu", layer=0,
                           hookpoint_in="mlp_in" if kind != "sae" else "resid_pre",
                           hookpoint_out="mlp_out" if kind != "sae" else "resid_pre", model_id="test")
    sd = SparseDictionary(cfg, seed=3).double()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        sd.W_enc.mul_(4.0)
        sd.b_enc.fill_(bias)  # a few features active per row, as in a trained ReLU dictionary
        sd.b_dec.normal_(generator=g)
        if sd.W_skip is not None:
            sd.W_skip.normal_(std=0.1, generator=g)
    return sd


@pytest.mark.parametrize("kind", ["sae", "transcoder", "skip_transcoder"])
def test_active_step_equals_dense_step(kind):
    torch.manual_seed(0)
    x = torch.randn(64, 24, dtype=torch.float64)
    y = torch.randn(64, 24, dtype=torch.float64) if kind != "sae" else x
    lam = torch.tensor(0.3, dtype=torch.float64)
    dead = torch.zeros(384, dtype=torch.bool)
    grads, losses, l0s = [], [], []
    for active_only in (False, True):
        sd = _dictionary(kind)
        obj = _Objective(sd, aux_k_coef=0.0)
        loss, mse, code, err = obj(x, y, lam, dead, active_only)
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in sd.named_parameters()})
        losses.append(float(loss.detach()))
        l0s.append(float(code.l0()))
        if active_only:
            assert code.rows is not None  # the ragged code really was used
            dense = code.to_dense(384)
    ref = (_dictionary(kind).pre_activations(x)).relu()
    assert torch.equal(dense > 0, ref > 0)
    assert 1 < l0s[0] < 0.2 * 384, l0s  # sparse but not empty
    assert l0s[0] == l0s[1]
    assert losses[1] == pytest.approx(losses[0], rel=1e-12)
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-10, atol=1e-12, msg=k)


def test_active_encode_input_gradient():
    torch.manual_seed(1)
    x = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    b = torch.full((40,), -0.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: ActiveReluEncode.apply(x, w, b)[0], (x, w, b))


def test_trainer_switches_to_active_step_when_l0_is_low():
    tcfg = TrainConfig(kind="sae", hookpoint="resid_pre", layers=[0], target_l0=4.0, n_features=512,
                       batch_size=128, n_tokens=128 * 20)
    tr = LayerTrainer(tcfg, 0, 16, "test", 1.0, 1.0)
    with torch.no_grad():
        tr.dictionary.b_enc.fill_(-3.0)
    calls = []
    orig = tr.objective.forward

    def spy(*args):
        calls.append(args[-1])
        return orig(*args)

    tr.objective.forward = spy
    x = torch.randn(128, 16)
    for _ in range(3):
        tr.train_step(x, x)
    assert calls[0] is False  # no L0 measured yet: dense
    assert tr.controller.ema_l0 < SPARSE_DENSITY * 512
    assert calls[1:] == [True, True]
