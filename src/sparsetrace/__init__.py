"""sparsetrace: sparse dictionaries and verified feature circuits for Hugging Face causal LMs."""

__version__ = "0.1.0"
