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


# ------------------------------------------------------------------------------------- held-out splits
def _role_words(lm, batch, roles):
    """The token texts at the given roles of every row (rows lacking a role skipped)."""
    out = set()
    for role in roles:
        pos = batch.roles[role]
        for i in range(len(batch)):
            if int(pos[i]) >= 0:
                out.add(lm.tokenizer.decode([int(batch.clean[i, pos[i]])]).strip())
                out.add(lm.tokenizer.decode([int(batch.corrupted[i, pos[i]])]).strip())
    return out


def _template_of(prompt, templates):
    """The index of the template (a str.format pattern) that produced ``prompt``."""
    import re
    import string

    hits = []
    for k, tpl in enumerate(templates):
        parts = [re.escape(lit) + ("(.+?)" if field is not None else "")
                 for lit, field, _, _ in string.Formatter().parse(tpl)]
        if re.fullmatch("".join(parts), prompt):
            hits.append(k)
    assert len(hits) == 1, (prompt, hits)
    return hits[0]


def test_split_names_are_checked(lm):
    with pytest.raises(DataError, match="split 'train' is unknown"):
        get_task("ioi").prompts(lm, 4, split="train")


def test_ioi_splits_are_disjoint(lm):
    from sparsetrace.tasks.base import split_items

    task = get_task("ioi")
    sel = task.prompts(lm, 60, seed=0, split="selection")
    held = task.prompts(lm, 60, seed=0, split="heldout")
    # no name, place or object is shared, and no template
    assert set(split_items(task.names(lm), "selection")).isdisjoint(split_items(task.names(lm), "heldout"))
    names_sel, names_held = _role_words(lm, sel, ["S1", "IO", "S2"]), _role_words(lm, held, ["S1", "IO", "S2"])
    assert names_sel and names_held and names_sel.isdisjoint(names_held)
    for words in (task.places, task.objects):
        a, b = set(split_items(words, "selection")), set(split_items(words, "heldout"))
        assert a and b and a.isdisjoint(b)
        assert not any(w in p.split() for w in b for p in sel.prompts)
    t_sel = {_template_of(p, task.templates) for p in sel.prompts}
    t_held = {_template_of(p, task.templates) for p in held.prompts}
    assert t_held and t_sel and t_sel.isdisjoint(t_held)
    # different random streams: the same seed does not give the same draw order on both sides
    assert sel.extra["io_first"].tolist() != held.extra["io_first"].tolist()


def test_ioi_roles_point_at_their_tokens(lm):
    for split in ("selection", "heldout"):
        b = get_task("ioi").prompts(lm, 20, seed=1, split=split)
        rows = torch.arange(len(b))
        r = b.roles
        assert set(r) == {"S1", "IO", "S2", "END"}
        assert torch.equal(b.clean[rows, r["IO"]], b.answer_ids)
        assert torch.equal(b.clean[rows, r["S1"]], b.wrong_ids)
        assert torch.equal(b.clean[rows, r["S2"]], b.wrong_ids)
        assert torch.equal(r["END"], b.last_pos)
        assert (r["S1"] < r["S2"]).all() and (r["IO"] < r["S2"]).all()
        # the ABC corruption changes exactly the S2 token
        assert (b.corrupted[rows, r["S2"]] != b.clean[rows, r["S2"]]).all()


def test_sva_splits_and_roles(lm):
    task = get_task("sva")
    sel = task.prompts(lm, 40, seed=0, split="selection")
    held = task.prompts(lm, 40, seed=0, split="heldout")
    assert _role_words(lm, sel, ["SUBJ", "OTHER"]).isdisjoint(_role_words(lm, held, ["SUBJ", "OTHER"]))
    texts = [t["text"] for t in task.data["templates"]]
    t_sel = {_template_of(p, texts) for p in sel.prompts}
    t_held = {_template_of(p, texts) for p in held.prompts}
    assert t_held and t_sel.isdisjoint(t_held)
    kinds = {task.data["templates"][k]["kind"] for k in t_held}
    assert kinds == {"pp", "rc"}  # one template of each kind is held out
    for b in (sel, held):
        rows = torch.arange(len(b))
        subj = b.roles["SUBJ"]
        # the corruption flips the subject's number: only the SUBJ token differs
        assert (b.clean[rows, subj] != b.corrupted[rows, subj]).all()
        # the attractor follows the subject; where it is the last token it is named END (one role a token)
        other = b.roles["OTHER"]
        assert ((other > subj) | (other == -1)).all() and (other > subj).any()
        assert (other != b.roles["END"]).all() and set(b.roles) == {"SUBJ", "OTHER", "END"}


def test_greater_than_splits_share_no_year(byte_lm):
    import re

    task = get_task("greater-than")
    sel = task.prompts(byte_lm, 40, seed=0, split="selection")
    held = task.prompts(byte_lm, 40, seed=0, split="heldout")

    def years(b):
        return {y for p in b.prompts for y in re.findall(r"\d{4}", p)}

    def centuries(b):
        return {y[:2] for y in years(b)}

    assert years(sel).isdisjoint(years(held)) and centuries(sel).isdisjoint(centuries(held))
    assert {_template_of(p, task.templates) for p in sel.prompts}.isdisjoint(
        {_template_of(p, task.templates) for p in held.prompts})
    nouns_sel = {p.split()[1] for p in sel.prompts}
    nouns_held = {p.split()[1] for p in held.prompts}
    assert nouns_sel.isdisjoint(nouns_held)
    for b in (sel, held):
        rows = torch.arange(len(b))
        digits = b.extra["digit_ids"][0]
        t = b.extra["yy"][:, 0]
        assert torch.equal(b.clean[rows, b.roles["END"]], digits[t])
        assert torch.equal(b.clean[rows, b.roles["YY"]], digits[b.extra["yy"][:, 1]])  # start year's units
        assert (b.roles["YY"] < b.roles["XX2"]).all() and (b.roles["XX2"] == b.roles["END"] - 1).all()


def test_facts_hold_out_whole_relations(lm):
    task = get_task("facts")
    sel, held = task.split_facts("selection"), task.split_facts("heldout")
    rel_sel, rel_held = {f["relation"] for f in sel}, {f["relation"] for f in held}
    assert rel_sel and rel_held and rel_sel.isdisjoint(rel_held)
    ent_sel = {x.strip() for f in sel for x in (f["subject"], f["answer"])}
    ent_held = {x.strip() for f in held for x in (f["subject"], f["answer"])}
    assert ent_sel.isdisjoint(ent_held)
    b = task.prompts(lm, 8, seed=0, split="heldout")
    assert all(any(p == f["template"].format(f["subject"]) for f in held) for p in b.prompts)
    for i in range(len(b)):
        pos = int(b.roles["SUBJ"][i])
        prefix = lm.tokenizer.decode(b.clean[i, 1 : pos + 1].tolist())
        assert any(prefix.endswith(f["subject"]) for f in held)
