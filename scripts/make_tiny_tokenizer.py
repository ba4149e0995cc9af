"""Train the byte-level BPE tokenizer shipped with the tiny test models.

    python scripts/make_tiny_tokenizer.py            # writes src/sparsetrace/model/data/tiny_bpe.json
    python scripts/make_tiny_tokenizer.py --check    # exits 1 if the committed file differs

The training text is built only from what the repo holds: the word lists and templates of the task
suites (``src/sparsetrace/tasks``), a few words the tests use as targets, and a short English text
written for this script. The result is deterministic (same text, same trainer settings, same file).

Design:

- byte-level (GPT-2 style): every string can be encoded, nothing is ever unknown;
- digits are split one per token (as in Llama / SmolLM2), so the greater-than task runs on the tiny models;
- every word a task suite or a test needs as one token (``" Mary"``, ``" mat"``, the IOI places, the
  agreement nouns and verbs, the facts' subjects and answers, ...) is a single token with its leading
  space; ``tests/test_zoo.py`` checks this on the shipped file.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "sparsetrace" / "model" / "data" / "tiny_bpe.json"
TASK_DATA = ROOT / "src" / "sparsetrace" / "tasks" / "data"
VOCAB_SIZE = 4096
SPECIAL = "<|endoftext|>"

# Words the tests use as targets or prompts with tiny models (beyond the task suites' own lists).
TEST_WORDS = ["Mary", "John", "mat", "cat", "sat", "on", "the", "The", "Paris", "London", "hello", "world"]

# Greater-than's nouns (kept in step with src/sparsetrace/tasks/greater_than.py by the test).
GREATER_THAN_NOUNS = [
    "war", "expedition", "reign", "drought", "project", "famine", "siege", "occupation", "journey", "strike",
]  # fmt: skip

ENGLISH = """\
The small town sat at the bend of a slow river. In the morning the baker opened his shop, and the smell
of bread drifted over the square while the first carts came in from the farms. Children ran to school
along the bank, and the old ferryman waved to each of them as they passed.

Every spring the river rose and covered the low fields. The farmers did not complain; the water left a
layer of rich soil behind it, and the harvest that followed was always better than the one before. They
had learned to build their houses on the hill and to keep a boat tied near every door.

A language model reads text as a sequence of tokens. Each token is a piece of a word, a whole word, or a
mark of punctuation. The model predicts the next token from the ones before it, one step at a time. To
study how it does this, we record the activations inside the network and look for directions that
stand for ideas a person can name: a city, a number, the plural of a noun, the end of a sentence.

She opened the letter slowly. It had been written years ago, in a careful hand, and the ink had faded to
a soft brown. "If you are reading this," it began, "then the house is yours, and so is the garden, and
so are all the questions I never answered." She read it twice, then folded it and put it in her pocket.

The committee met on Tuesday to discuss the budget for the coming year. Several members asked whether
the new bridge could be finished before winter. The engineer said that it could, if the weather held and
if the steel arrived on time. The vote was close, but the plan was approved, and work began the next day.

On a clear night you can see thousands of stars from the top of the hill. Some of them are much larger
than our sun, and some are so far away that their light left them before the first cities were built.
People have always told stories about them, and sailors used them to find their way across the sea.

He counted the coins twice: one, two, three, four, five, six, seven, eight, nine, ten. It was not
enough for the ticket, so he walked. The road was long and dusty, but the weather was kind, and by the
evening he could see the lights of the station below him.
"""


def _load(name: str) -> dict:
    return json.loads((TASK_DATA / name).read_text(encoding="utf-8"))


def required_tokens() -> list[str]:
    """Every string (with its leading space where the tasks use one) that must be a single token."""
    ioi, sva, facts = _load("ioi.json"), _load("sva.json"), _load("facts.json")
    words: list[str] = []
    words += ioi["names"] + ioi["places"] + ioi["objects"]
    for key in ("nouns", "things", "containers"):
        for pair in sva[key]:
            words += pair
    words += sva["singular_verbs"] + sva["plural_verbs"] + sva["clause_verbs"]
    words += GREATER_THAN_NOUNS + TEST_WORDS
    out = [" " + w for w in words]
    for f in facts["facts"]:
        out.append(f["answer"])  # as given: most have a leading space, the opposites do not
        subject = f["subject"]
        if " " not in subject:
            # the opposite template quotes its subject ('"hot"'), the others put a space before it
            out.append(subject if '"{}"' in f["template"] else " " + subject)
    out += [str(d) for d in range(10)]
    seen: set[str] = set()
    return [t for t in out if not (t in seen or seen.add(t))]


def training_text() -> list[str]:
    """Deterministic training documents: the English text, filled task templates, the required words."""
    rng = random.Random(0)
    ioi, sva, facts = _load("ioi.json"), _load("sva.json"), _load("facts.json")
    docs = [p for p in ENGLISH.split("\n\n") if p.strip()]
    for i in range(1200):
        a, b = rng.sample(ioi["names"], 2)
        docs.append(
            ioi["templates"][i % len(ioi["templates"])].format(
                A=a,
                B=b,
                C=rng.choice((a, b)),
                PLACE=rng.choice(ioi["places"]),
                OBJECT=rng.choice(ioi["objects"]),
            )
            + " "
            + rng.choice((a, b))
            + "."
        )
    people = sva["nouns"]
    for i in range(600):
        tpl = sva["templates"][i % len(sva["templates"])]
        subj = rng.choice(people)[rng.randint(0, 1)]
        other = rng.choice(people + sva["containers"])[rng.randint(0, 1)]
        verb = rng.choice(sva["singular_verbs"] + sva["plural_verbs"])
        docs.append(
            tpl["text"].format(SUBJ=subj, OTHER=other, VERB=rng.choice(sva["clause_verbs"]))
            + f" {verb} here."
        )
    for _ in range(20):
        for f in facts["facts"]:
            prompt = f["template"].format(f["subject"])
            docs.append(prompt + f["answer"] + ('"' if prompt.endswith('"') else "."))
    for i in range(300):
        noun = GREATER_THAN_NOUNS[i % len(GREATER_THAN_NOUNS)]
        start = rng.randint(1100, 1890)
        docs.append(f"The {noun} lasted from the year {start} to the year {start + rng.randint(1, 9)}.")
    words = required_tokens()
    for _ in range(40):
        shuffled = words[:]
        rng.shuffle(shuffled)
        docs.append("".join(w if w.startswith(" ") else " " + w for w in shuffled))
    return docs


def build() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_text(), trainer=trainer)
    return tok


def check_single(tok: Tokenizer) -> list[str]:
    """The required strings that are NOT one token."""
    return [w for w in required_tokens() if len(tok.encode(w, add_special_tokens=False).ids) != 1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--check", action="store_true", help="compare with the committed file instead of writing it"
    )
    args = ap.parse_args(argv)
    tok = build()
    missing = check_single(tok)
    if missing:
        print(f"error: {len(missing)} required words are not single tokens: {missing[:20]}", file=sys.stderr)
        return 1
    text = tok.to_str(pretty=False) + "\n"
    if args.check:
        same = OUT.is_file() and OUT.read_text(encoding="utf-8") == text
        print("tiny_bpe.json is up to date" if same else "tiny_bpe.json differs from a fresh build")
        return 0 if same else 1
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(
        f"wrote {OUT.relative_to(ROOT)}: vocab {tok.get_vocab_size()}, {len(required_tokens())} required single tokens"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
