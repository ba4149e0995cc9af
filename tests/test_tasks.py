"""Task suites: determinism, clean/corrupted pairing, metrics (tiny models with the shipped BPE; SmolLM2)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from sparsetrace.errors import DataError  # noqa: E402
from sparsetrace.model.adapter import LanguageModel  # noqa: E402
from sparsetrace.model.tiny import ByteTokenizer, tiny_model  # noqa: E402
from sparsetrace.tasks import get_task, list_tasks  # noqa: E402


@pytest.fixture(scope="module")
def lm():
    """tiny-llama with the byte-level BPE shipped in the package (task words are single tokens)."""
    return LanguageModel.load("tiny-llama")


@pytest.fixture(scope="module")
def byte_lm():
    """tiny-llama with the byte tokenizer: every digit is its own token."""
    model = LanguageModel(*tiny_model("tiny-llama", ByteTokenizer()), "tiny-llama")
    assert isinstance(model.tokenizer, ByteTokenizer)
    return model


@pytest.fixture(scope="module")
def year_lm():
    """tiny-llama with a BPE trained here that merges digits (" 1732" -> " 17", "32"), as GPT-2's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    years = [f"The war lasted from the year {y} to the year {y + 3}." for y in range(1100, 1900, 7)]
    raw.train_from_iterator(years * 3, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    return LanguageModel(*tiny_model("tiny-llama", tok), "tiny-llama-year-bpe")


def test_registry():
    assert list_tasks() == ["ioi", "greater-than", "sva", "facts", "custom"]
    assert get_task("greater_than").name == "greater-than"
    assert get_task("Subject-Verb-Agreement").name == "sva"
    with pytest.raises(DataError, match="known tasks: ioi, greater-than, sva, facts, custom"):
        get_task("nope")
    with pytest.raises(DataError):
        get_task("ioi", corruption="weird")
    with pytest.raises(DataError):
        get_task("facts", relations=["no-such-relation"])


def _same(a, b):
    return (
        torch.equal(a.clean, b.clean)
        and torch.equal(a.corrupted, b.corrupted)
        and torch.equal(a.answer_ids, b.answer_ids)
        and a.prompts == b.prompts
    )


@pytest.mark.parametrize("name", ["ioi", "sva", "facts"])
def test_generators_are_deterministic(lm, name):
    task = get_task(name)
    a = task.prompts(lm, 12, seed=3)
    b = get_task(name).prompts(lm, 12, seed=3)
    c = task.prompts(lm, 12, seed=4)
    assert _same(a, b)
    assert not _same(a, c)
    assert len(a) == 12 and a.clean.shape == a.corrupted.shape
    assert a.metric_name == task.metric_name
    for i in range(len(a)):
        n = int(a.last_pos[i]) + 1
        ids = lm.tokenize(a.prompts[i])[0]
        assert torch.equal(a.clean[i, :n], ids)
        assert torch.equal(a.corrupted[i, :n], lm.tokenize(a.corrupted_prompts[i])[0])
        assert (a.clean[i, n:] == a.pad_id).all()
        assert a.mask[i].sum() == n
        assert a.answer_ids[i] != a.wrong_ids[i]


def test_ioi_prompts(lm):
    task = get_task("ioi")
    b = task.prompts(lm, 20, seed=0)
    for i in range(len(b)):
        io = lm.tokenizer.decode([int(b.answer_ids[i])])
        s = lm.tokenizer.decode([int(b.wrong_ids[i])])
        assert b.prompts[i].count(s.strip()) == 2 and b.prompts[i].count(io.strip()) == 1
        n = int(b.last_pos[i]) + 1
        assert int((b.clean[i, :n] != b.corrupted[i, :n]).sum()) == 1  # ABC: only S2 changes
    assert set(b.extra["io_first"].tolist()) == {0, 1}
    assert len({p.split(",")[0][:6] for p in b.prompts}) > 3  # several templates
    swap = get_task("ioi", corruption="swap").prompts(lm, 5, seed=0)
    assert swap.prompts == b.prompts[:5]
    for i in range(5):
        assert swap.corrupted_prompts[i].count(lm.tokenizer.decode([int(swap.answer_ids[i])]).strip()) == 2
    for name in task.names(lm):
        lm.single_token_id(" " + name)


def test_sva_prompts(lm):
    b = get_task("sva").prompts(lm, 12, seed=0)
    for i in range(len(b)):
        n = int(b.last_pos[i]) + 1
        assert int((b.clean[i, :n] != b.corrupted[i, :n]).sum()) == 1  # only the subject's number
    assert set(b.extra["plural"].tolist()) == {0, 1}


def test_pair_metrics_on_synthetic_logits(lm):
    task = get_task("ioi")
    b = task.prompts(lm, 4, seed=0)
    logits = torch.randn(len(b), b.seq_len, lm.vocab_size)
    expected = [
        float(logits[i, b.last_pos[i], b.answer_ids[i]] - logits[i, b.last_pos[i], b.wrong_ids[i]])
        for i in range(4)
    ]
    assert task.metric(logits, b) == pytest.approx(sum(expected) / 4, abs=1e-5)
    assert b.metric(logits) == pytest.approx(sum(expected) / 4, abs=1e-5)
    with pytest.raises(DataError):
        task.metric(logits[:2], b)
    sub = b.subset([1, 3])
    assert sub.prompts == [b.prompts[1], b.prompts[3]]


def test_greater_than_needs_digit_tokens(year_lm):
    with pytest.raises(DataError, match="single digits"):
        get_task("greater-than").prompts(year_lm, 2)


def test_greater_than_runs_on_the_shipped_tokenizer(lm):
    b = get_task("greater-than").prompts(lm, 4, seed=0)
    assert len(b) == 4
    for i in range(4):
        t = int(b.extra["yy"][i][0])
        assert int(b.clean[i, b.last_pos[i]]) == lm.single_token_id(str(t))


def test_greater_than_prompts_and_metric(byte_lm):
    task = get_task("greater-than")
    b = task.prompts(byte_lm, 6, seed=0)
    assert _same(b, task.prompts(byte_lm, 6, seed=0))
    for i in range(len(b)):
        t, u = b.extra["yy"][i].tolist()
        p, c = b.prompts[i], b.corrupted_prompts[i]
        assert p.endswith(str(t)) and f"{t}{u} " in p and "01 " in c
        assert 1 <= t <= 8 and 1 <= u <= 8
    digits = [byte_lm.single_token_id(str(d)) for d in range(10)]
    logits = torch.randn(len(b), b.seq_len, byte_lm.vocab_size) * 3
    got = task.metric_per_example(logits, b)
    for i in range(len(b)):
        t, u = b.extra["yy"][i].tolist()
        pt = logits[i, b.last_pos[i] - 1].softmax(-1)[digits]
        pu = logits[i, b.last_pos[i]].softmax(-1)[digits]
        greater = pt[t + 1 :].sum() + pt[t] * pu[u + 1 :].sum()
        smaller = pt[:t].sum() + pt[t] * pu[:u].sum()
        assert float(got[i]) == pytest.approx(float(greater - smaller), abs=1e-5)


def test_custom_task(lm):
    task = get_task("custom", prompt="The capital of France is", target=" Paris")
    b = task.prompts(lm)
    assert len(b) == 1 and torch.equal(b.clean, b.corrupted)
    logits = lm.run(b.clean).logits
    assert task.metric(logits, b) == pytest.approx(
        float(logits[0, -1, lm.single_token_id(" Paris")]), abs=1e-5
    )
    assert task.baseline(lm) == pytest.approx(task.metric(logits, b), abs=1e-5)
    diff = get_task("custom", prompt="The capital of France is", target=" Paris", contrast=" London")
    bd = diff.prompts(lm, 2)
    expected = float(
        logits[0, -1, lm.single_token_id(" Paris")] - logits[0, -1, lm.single_token_id(" London")]
    )
    assert diff.metric(lm.run(bd.clean).logits, bd) == pytest.approx(expected, abs=1e-5)
    with pytest.raises(DataError, match="single token"):
        get_task("custom", prompt="The capital of France is", target=" Parisianism").prompts(lm)
    with pytest.raises(DataError):
        get_task(
            "custom",
            prompt="The capital of France is",
            target=" Paris",
            corrupted="A much longer prompt than the original one",
        ).prompts(lm)
    with pytest.raises(DataError):
        get_task("custom", prompt="  ", target=" Paris")


@pytest.mark.slow
def test_smollm2_ioi_baseline_positive():
    model = LanguageModel.load("smollm2-135m")
    assert get_task("ioi").baseline(model, n=6, seed=0) > 0
