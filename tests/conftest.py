"""Shared test setup: offline, no progress bars, small tiny-model fixtures."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("SPARSETRACE_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_MODELS = ["tiny-gpt2", "tiny-neox", "tiny-llama", "tiny-gptneo"]


@pytest.fixture(scope="session")
def tiny_lms():
    from sparsetrace.model.adapter import LanguageModel

    return {name: LanguageModel.load(name) for name in TINY_MODELS}


@pytest.fixture(scope="session")
def tiny_llama(tiny_lms):
    return tiny_lms["tiny-llama"]


@pytest.fixture()
def texts():
    base = [
        "Once upon a time there was a little fox who lived in the woods near a river.",
        "The quick brown fox jumps over the lazy dog, and then it runs far away home.",
        "Mary and John went to the store. John gave a drink to Mary because she was thirsty.",
        "In 1732 the war began, and it lasted until the year 1748 when peace returned.",
    ]
    return [f"{t} Story number {i}. " * 3 for i in range(60) for t in base]
