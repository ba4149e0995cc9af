"""Dictionaries: every kind × activation, save/load round trip, refusal of bad files."""

import json

import pytest
import torch

from sparsetrace.dictionary.activations import _TopKEncode
from sparsetrace.dictionary.io import check_matches_model, save_dictionary
from sparsetrace.dictionary.load import load_dictionary
from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary
from sparsetrace.errors import ConfigError, DictionaryFileError

ACTS = ["relu", "topk", "batchtopk", "jumprelu"]
KINDS = ["sae", "transcoder", "skip_transcoder"]


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(tmp_path, kind, activation):
    cfg = DictionaryConfig(kind=kind, d_in=16, d_out=16, n_features=48, activation=activation, k=4, layer=2,
                           model_id="tiny-llama")
    d = SparseDictionary(cfg, seed=0)
    with torch.no_grad():
        d.b_enc.normal_()
        d.b_dec.normal_()
        if d.W_skip is not None:
            d.W_skip.normal_()
    x = torch.randn(10, 16)
    y = d(x)
    y.sum().backward()  # every activation is differentiable end to end
    save_dictionary(d, tmp_path / "dict")
    assert sorted(p.name for p in (tmp_path / "dict").iterdir()) == ["config.json", "manifest.json", "weights.safetensors"]
    d2 = load_dictionary(tmp_path / "dict")
    d.eval()
    assert torch.allclose(d(x), d2(x), atol=1e-6)
    assert d2.cfg == d.cfg


def test_topk_is_sparse_and_gradient_matches_dense():
    cfg = DictionaryConfig(kind="transcoder", d_in=12, d_out=12, n_features=40, activation="topk", k=5)
    d = SparseDictionary(cfg, seed=1).double()
    x = torch.randn(6, 12, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: _TopKEncode.apply(x, w, b, 5)[0], (x, d.W_enc, d.b_enc))
    assert (d.features(x) > 0).sum(-1).max() <= 5


def test_fold_normalisation_preserves_function():
    cfg = DictionaryConfig(kind="skip_transcoder", d_in=8, d_out=8, n_features=20, activation="relu")
    d = SparseDictionary(cfg, seed=2)
    with torch.no_grad():
        d.W_skip.normal_()
        d.b_dec.normal_()
    x = torch.randn(5, 8)
    s_in, s_out = 3.0, 0.5
    expected = d(x / s_in) * s_out
    d.fold_normalisation(s_in, s_out)
    assert torch.allclose(d(x), expected, atol=1e-5)


def test_invalid_configs():
    with pytest.raises(ConfigError, match="k=50"):
        DictionaryConfig(kind="sae", d_in=4, d_out=4, n_features=10, activation="topk", k=50).validate()
    with pytest.raises(ConfigError, match="kind 'mlp'"):
        DictionaryConfig(kind="mlp", d_in=4, d_out=4, n_features=10).validate()
    with pytest.raises(ConfigError, match="n_features"):
        DictionaryConfig(kind="sae", d_in=4, d_out=4, n_features=0).validate()


@pytest.fixture()
def saved(tmp_path):
    d = SparseDictionary(DictionaryConfig(kind="transcoder", d_in=64, d_out=64, n_features=128, layer=1,
                                          model_id="tiny-llama"), seed=0)
    return save_dictionary(d, tmp_path / "L01_transcoder")


def test_pickle_refused(tmp_path):
    p = tmp_path / "sae.pt"
    p.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(DictionaryFileError, match="pickle"):
        load_dictionary(p)


def test_corrupt_and_truncated(saved):
    w = saved / "weights.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(DictionaryFileError, match="sha256|corrupt|truncated"):
        load_dictionary(saved)
    (saved / "manifest.json").unlink()
    with pytest.raises(DictionaryFileError, match="corrupt or truncated"):
        load_dictionary(saved)
    w.write_bytes(b"garbage" * 10)
    with pytest.raises(DictionaryFileError, match="corrupt or truncated"):
        load_dictionary(saved)


def test_foreign_config(saved):
    (saved / "manifest.json").unlink()
    (saved / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(DictionaryFileError, match="not a sparsetrace dictionary"):
        load_dictionary(saved)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(DictionaryFileError, match="not valid JSON"):
        load_dictionary(saved)


def test_missing_and_mismatched(saved, tmp_path):
    with pytest.raises(DictionaryFileError, match="does not exist"):
        load_dictionary(tmp_path / "nope")
    d = load_dictionary(saved)
    with pytest.raises(DictionaryFileError, match="d_model=576"):
        check_matches_model(d, "tiny-llama", 576, 30)
    with pytest.raises(DictionaryFileError, match="trained on model 'tiny-llama'"):
        check_matches_model(d, "smollm2-135m", 64, 30)
    check_matches_model(d, "tiny-llama", 64, 4)
