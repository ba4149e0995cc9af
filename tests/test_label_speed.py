"""Label verification and steered logits reuse the key/value cache of the shared prefix (the last token
runs alone for the clean, control and steered passes); the results equal the full forward passes."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from sparsetrace.dictionary.model import DictionaryConfig, SparseDictionary  # noqa: E402
from sparsetrace.interpret.dashboards import compute_dashboards  # noqa: E402
from sparsetrace.interpret.labels import Label, label_features  # noqa: E402
from sparsetrace.interpret.steered import add_steered_logits  # noqa: E402
from sparsetrace.interpret.verify_labels import LabelVerifier, VerifyConfig, verify_labels  # noqa: E402
from sparsetrace.intervene.steering import clean_and_steered, steer_last  # noqa: E402
from sparsetrace.model import prefix_cache as dash_mod  # noqa: E402
from sparsetrace.model.adapter import LanguageModel  # noqa: E402
from sparsetrace.model.hookpoints import HOOKPOINTS, Hookpoint  # noqa: E402
from sparsetrace.model.prefix_cache import (  # noqa: E402
    PrefixCache,
    PrefixError,
    harvest,
    last_logits,
    run_sharing_prefix,
)

MODELS = ["tiny-llama", "tiny-gpt2"]
N_FEAT = 64
LAYER = 1


@pytest.fixture(scope="module", params=MODELS)
def setup(request):
    lm = LanguageModel.load(request.param)
    d = SparseDictionary(
        DictionaryConfig(kind="transcoder", d_in=lm.d_model, d_out=lm.d_model, n_features=N_FEAT, layer=LAYER,
                         model_id=request.param),
        seed=0,
    )
    with torch.no_grad():
        d.W_enc.mul_(4.0)
        d.b_enc.copy_(torch.linspace(-1.5, 0.0, N_FEAT))
    d = d.eval()
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, min(lm.vocab_size, 2000), (32, 32), generator=g)
    bos = lm.tokenizer.bos_token_id
    if bos is not None:
        windows[:, 0] = bos
    dash = compute_dashboards(lm, d, windows, features=list(range(0, N_FEAT, 3)), n_top=6, batch_windows=8,
                              width=10, per_bin=3)
    live = {f: x for f, x in dash.items() if x["top_examples"]}
    assert len(live) >= 4
    heldout = torch.randint(0, min(lm.vocab_size, 2000), (24, 32), generator=torch.Generator().manual_seed(5))
    return lm, d, windows, live, heldout


@pytest.fixture(autouse=True)
def fresh_check():
    """Every test starts with no model checked (or ruled out) for cache reuse."""
    dash_mod._PREFIX_OK.clear()
    yield
    dash_mod._PREFIX_OK.clear()


class _Lengths:
    """Records the sequence length (``seen``) and batch size (``rows``) of every forward pass."""

    def __init__(self, lm):
        self.seen: list[int] = []
        self.rows: list[int] = []

        def hook(_m, args):
            self.rows.append(int(args[0].shape[0]))
            self.seen.append(int(args[0].shape[1]))

        self.h = lm.arch.embed.register_forward_pre_hook(hook)

    def close(self):
        self.h.remove()


# tolerances: unrounded p-values 1e-5 relative; fields rounded to 4-5 decimals one unit of their last digit
_TOL = {"p_value": (1e-5, 1e-12), "empirical_p": (0, 1.1e-5), "mean_key": (0, 1.1e-5), "mean_control": (0, 1.1e-5)}


def _assert_same(a, b, path=""):
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(a, bool):
        rel, ab = _TOL.get(path.rsplit(".", 1)[-1], (1e-5, 1.1e-4))
        assert b == pytest.approx(a, rel=rel, abs=ab), f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def _contexts(lm, n=6, T=9, seed=3):
    ids = torch.randint(0, min(lm.vocab_size, 2000), (n, T), generator=torch.Generator().manual_seed(seed))
    bos = lm.tokenizer.bos_token_id
    if bos is not None:
        ids[:, 0] = bos
    return ids


@pytest.mark.parametrize("name", HOOKPOINTS)
def test_prefix_cache_matches_full_forward_at_every_hookpoint(setup, name):
    lm, d, *_ = setup
    ids = _contexts(lm)
    other = ids.clone()
    other[:, -1] = (other[:, -1] + 7) % min(lm.vocab_size, 2000)
    hp = Hookpoint(name, LAYER)
    pc = PrefixCache(lm, ids)
    n_cached = pc.cache.get_seq_length()
    delta = 3.0 * d.W_dec[5].detach()
    for x in (ids, other):
        # stopped-early harvest on the cache: the last position of the full harvest
        got = harvest(lm, x, hp, prefix=pc)
        ref = harvest(lm, x, hp)
        assert got.shape == (x.shape[0], 1, lm.d_model)
        torch.testing.assert_close(got, ref[:, -1:], rtol=1e-5, atol=1e-5)
        # clean and steered logits, with reads
        for edit in (None, {hp: steer_last(delta)}):
            lg, acts = last_logits(lm, x, [hp], edit, prefix=pc)
            lr, ar = last_logits(lm, x, [hp], edit)
            torch.testing.assert_close(lg, lr, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(acts[hp], ar[hp][:, -1:], rtol=1e-5, atol=1e-5)
        # clean and steered in one batch of 2B last tokens
        clean, steered, acts = clean_and_steered(lm, x, hp, delta, [hp], prefix=pc)
        c_ref, a_ref = last_logits(lm, x, [hp])
        s_ref, _ = last_logits(lm, x, [], {hp: steer_last(delta)})
        torch.testing.assert_close(clean, c_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(steered, s_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(acts[hp], a_ref[hp][:, -1:], rtol=1e-5, atol=1e-5)
        assert (steered - clean).abs().max() > 1e-3
    assert pc.cache.get_seq_length() == n_cached == ids.shape[1] - 1  # every use ran on a copy
    assert dash_mod._PREFIX_OK[lm.model] is True
    # contexts that do not extend the cached prefix are refused
    bad = ids.clone()
    bad[:, 1] += 1
    with pytest.raises(PrefixError):
        last_logits(lm, bad, prefix=pc)
    with pytest.raises(PrefixError):
        harvest(lm, ids[:, :-1], hp, prefix=pc)


def test_verify_labels_fast_path_equals_full_forwards(setup):
    lm, d, _windows, live, heldout = setup
    feats = sorted(live)[:4]
    labels = label_features(live, features=feats)
    cfg = VerifyConfig(n_contexts=10, context_len=8, n_random=64)
    spy = _Lengths(lm)
    try:
        slow = verify_labels(lm, d, copy.deepcopy(live), labels, heldout, cfg=cfg, features=feats, use_cache=False)
        assert 1 not in spy.seen and len(spy.seen) == 3 * len(feats)
        spy.seen.clear()
        spy.rows.clear()
        dashes = copy.deepcopy(live)
        fast = verify_labels(lm, d, dashes, labels, heldout, cfg=cfg, features=feats)
        T = cfg.context_len + (lm.tokenizer.bos_token_id is not None)
        # per feature: the prefix once, then the last token alone (clean and steered in one batch of 2n,
        # the control); full length only for the one-time check of the model's first use (clean, steered)
        n = cfg.n_contexts
        assert spy.seen.count(T - 1) == len(feats) and spy.seen.count(1) == 2 * len(feats)
        assert spy.seen.count(T) == 2 and len(spy.seen) == 3 * len(feats) + 2
        assert sorted(r for r, t in zip(spy.rows, spy.seen, strict=True) if t == 1) == [n] * len(feats) + [2 * n] * len(feats)
    finally:
        spy.close()
    assert dash_mod._PREFIX_OK[lm.model] is True
    assert set(fast) == set(slow) == set(feats)
    for f in feats:
        assert fast[f]["verdict"] == slow[f]["verdict"]
        _assert_same(slow[f], fast[f], f"f{f}")
        assert dashes[f]["verdict"] == fast[f]["verdict"]
    # the scale taken from the key activations (no max_act) and a label with a context n-gram
    v_fast = LabelVerifier(lm, d, heldout, cfg)
    v_slow = LabelVerifier(lm, d, heldout, cfg, use_cache=False)
    dec = lm.tokenizer.decode
    # a label whose text names a held-out word, the word before it and an output (the verifier reads text)
    lab = Label(text=f"{json.dumps(dec([int(heldout[0, 12])]))} after {json.dumps(dec([int(heldout[0, 11])]))} "
                     f"→ promotes {json.dumps(dec([int(heldout[1, 3])]))}", labeler="test")
    for f in feats[:2]:
        _assert_same(v_slow.verify(f, labels[f]), v_fast.verify(f, labels[f]))
        _assert_same(v_slow.verify(f, lab), v_fast.verify(f, lab))


def test_steered_logits_fast_path_equals_full_forwards(setup):
    lm, d, windows, live, _ = setup
    feats = sorted(live)[:4]
    slow = add_steered_logits(lm, d, copy.deepcopy(live), windows, feats, n_contexts=4, use_cache=False)
    spy = _Lengths(lm)
    try:
        fast = add_steered_logits(lm, d, copy.deepcopy(live), windows, feats, n_contexts=4)
    finally:
        spy.close()
    assert 1 in spy.seen
    for f in feats:
        assert "steered_logits" in slow[f]
        for k in ("steered_logits", "steered_bottom_logits"):
            assert [s for s, _ in fast[f][k]] == [s for s, _ in slow[f][k]]
            for (_, x), (_, y) in zip(fast[f][k], slow[f][k], strict=True):
                assert x == pytest.approx(y, rel=1e-3, abs=1e-5)  # values are rounded to 4 significant digits
        assert fast[f]["steered_logit_ids"] == slow[f]["steered_logit_ids"]
        assert fast[f]["steered_bottom_logit_ids"] == slow[f]["steered_bottom_logit_ids"]
        assert fast[f]["steered_config"] == slow[f]["steered_config"]


def test_falls_back_to_full_forwards_when_the_cache_cannot_be_reused(setup, monkeypatch):
    lm, d, windows, live, heldout = setup
    feats = sorted(live)[:2]
    labels = label_features(live, features=feats)
    cfg = VerifyConfig(n_contexts=8, context_len=8, n_random=64)
    ref = verify_labels(lm, d, {}, labels, heldout, cfg=cfg, features=feats, use_cache=False)
    ref_steer = add_steered_logits(lm, d, copy.deepcopy(live), windows, feats, n_contexts=3, use_cache=False)

    # (1) a model that cannot give / take a cache: it raises, the full forwards are used
    def no_cache(self, lm, ids):
        raise TypeError("forward() got an unexpected keyword argument 'use_cache'")

    with monkeypatch.context() as m:
        m.setattr(PrefixCache, "__init__", no_cache)
        got = verify_labels(lm, d, {}, labels, heldout, cfg=cfg, features=feats)
        assert dash_mod._PREFIX_OK[lm.model] is False
    _assert_same(ref, got)
    spy = _Lengths(lm)
    try:  # ruled out for this model: not tried again
        verify_labels(lm, d, {}, labels, heldout, cfg=cfg, features=feats[:1])
        assert 1 not in spy.seen
    finally:
        spy.close()

    # (2) a cache that silently gives other results: the first use is checked against full forwards
    dash_mod._PREFIX_OK.clear()
    with monkeypatch.context() as m:
        m.setattr(PrefixCache, "last", lambda self, ids: ids[:, :1])  # runs the wrong token
        got = verify_labels(lm, d, {}, labels, heldout, cfg=cfg, features=feats)
        assert dash_mod._PREFIX_OK[lm.model] is False
        dash_mod._PREFIX_OK.clear()
        got_steer = add_steered_logits(lm, d, copy.deepcopy(live), windows, feats, n_contexts=3)
        assert dash_mod._PREFIX_OK[lm.model] is False
    _assert_same(ref, got)
    for f in feats:
        assert got_steer[f]["steered_logit_ids"] == ref_steer[f]["steered_logit_ids"]

    # (3) one-token contexts have no prefix: body(None)
    dash_mod._PREFIX_OK.clear()
    assert run_sharing_prefix(lm, torch.zeros(3, 1, dtype=torch.long), lambda pc: pc) is None
    assert run_sharing_prefix(lm, _contexts(lm), lambda pc: pc, use_cache=False) is None
    assert isinstance(run_sharing_prefix(lm, _contexts(lm), lambda pc: pc), PrefixCache)
