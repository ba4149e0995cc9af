"""Training configuration: one plain dataclass, saved as JSON next to every run."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from ..dictionary.model import DEFAULT_HOOKPOINTS, KINDS
from ..errors import ConfigError
from ..model.hookpoints import HOOKPOINTS

ACTIVATION_CHOICES = ("relu", "topk", "batchtopk", "jumprelu")
TRAIN_KINDS = (*KINDS, "clt")  # clt: one cross-layer transcoder over every layer (train/clt.py)


@dataclass
class TrainConfig:
    model: str = "smollm2-135m"
    layers: list[int] | str = field(default_factory=lambda: [3, 6])  # or "all" (resolved once the model loads)
    kind: str = "transcoder"  # sae | transcoder | skip_transcoder | clt
    hookpoint: str | None = None  # SAE input/output hookpoint (default resid_pre); ignored for transcoders
    activation: str = "relu"
    target_l0: float | list[float] = 32.0  # one target, or one per layer (in the order of ``layers``)
    k: int | None = None  # TopK/BatchTopK; defaults to round(target_l0)
    expansion: int = 8  # n_features = expansion * d_model unless n_features is given
    n_features: int | None = None
    corpus: str = "default"
    context: int = 128
    n_tokens: int = 300_000  # harvested training tokens
    epochs: float = 3.0  # passes over the harvested tokens
    eval_fraction: float = 0.05
    batch_size: int = 512
    lr: float = 1e-3
    warmup_frac: float = 0.05
    decay_frac: float = 0.2
    l1_init: float | None = None  # initial lambda; None = automatic
    lambda_gain: float = 0.05  # log-lambda change per step per unit of log-L0 error
    lambda_horizon: float | None = None  # steps the λ controller looks ahead (None: 20; 50 for JumpReLU)
    init_l0_factor: float = 4.0  # JumpReLU: thresholds start where L0 = this x target (from the first batch)
    threshold_lr_scale: float = 10.0  # JumpReLU: learning-rate multiplier of the log-thresholds
    threshold_warmup_frac: float = 0.1  # JumpReLU: thresholds (and λ) held for this fraction of the steps
    calibrate: bool = True  # ReLU/JumpReLU: shift encoder biases at the end so the L0 equals the target
    dead_window_tokens: int = 200_000  # a feature silent this long is dead
    resample_every: int = 400  # steps between dead-feature resamples (ReLU/JumpReLU)
    aux_k_coef: float = 1 / 32  # AuxK loss weight (TopK/BatchTopK)
    sparse_relu: bool = True  # ReLU: step through the active features only once L0 is low (train/sparse_relu.py)
    log_every: int = 20
    checkpoint_every: int = 200
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"  # activation cache dtype
    compute_dtype: str = "float32"  # the dictionary's matmuls: float32 | bfloat16 (parameters stay float32)
    model_dtype: str = "float32"  # the language model's weights while harvesting: float32 | bfloat16
    max_memory_gb: float | None = None  # resident-memory budget per process, GB (10^9 bytes); None = unbounded
    parallel: str = "data"  # data | layer   (under torchrun)
    store: str = "auto"  # activations: stream (data/stream.py) | disk (data/store.py) | auto (resolved at start)
    buffer_tokens: int | None = None  # stream: rows held per hookpoint (None: from --max-memory, resolved at start)
    clt_tanh_c: float = 4.0  # CLT: c in the sparsity penalty tanh(c * |W_dec| * a)
    preact_coef: float = 0.0  # CLT: weight of the pre-activation loss against dead features (0: off)
    time_budget: float | None = None  # minutes of wall time for the whole run; schedules follow elapsed time
    snapshot_at: list[float] = field(default_factory=list)  # wall minutes at which to save snapshots

    @property
    def hookpoints(self) -> tuple[str, str]:
        if self.kind == "sae":
            hp = self.hookpoint or "resid_pre"
            return hp, hp
        if self.kind == "clt":
            return "mlp_in", "mlp_out"
        return DEFAULT_HOOKPOINTS[self.kind]

    @property
    def total_steps(self) -> int:
        return max(1, int(self.n_tokens * self.epochs) // self.batch_size)

    def target_for(self, layer: int) -> float:
        """The target L0 of ``layer``: the single target, or its entry in the per-layer list."""
        if isinstance(self.target_l0, (list, tuple)):
            return float(self.target_l0[list(self.layers).index(layer)])
        return float(self.target_l0)

    @property
    def max_target_l0(self) -> float:
        t = self.target_l0
        return float(max(t)) if isinstance(t, (list, tuple)) else float(t)

    def resolve_layers(self, n_layers: int) -> TrainConfig:
        """``layers="all"`` becomes 0..n_layers-1 (a copy; self when there is nothing to resolve)."""
        if self.layers != "all":
            return self
        return replace(self, layers=list(range(n_layers))).validate()

    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` naming the first bad value and what was expected; return self."""
        for check in (_check_names, _check_sparsity, _check_layers, _check_counts, _check_rates,
                      _check_choices, _check_clock):
            check(self)
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"training config is a {type(d).__name__}; expected a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = [k for k in d if k not in known]
        if unknown:
            names = sorted(map(repr, unknown))
            raise ConfigError(f"unknown training config keys [{', '.join(names)}]; expected some of {sorted(known)}")
        return cls(**d).validate()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_names(c: TrainConfig) -> None:
    """The string options: non-empty, and a known dictionary kind, hookpoint and activation."""
    for name in ("model", "kind", "activation", "corpus", "device", "dtype", "parallel"):
        v = getattr(c, name)
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(f"--{name.replace('_', '-')} {v!r} is invalid; expected a non-empty string")
    if c.kind not in TRAIN_KINDS:
        raise ConfigError(f"--kind '{c.kind}' is unknown; expected one of {', '.join(TRAIN_KINDS)}")
    if c.kind == "clt" and c.activation == "batchtopk":
        raise ConfigError("--activation batchtopk is not available for --kind clt; expected relu, jumprelu or topk")
    if c.hookpoint is not None and (not isinstance(c.hookpoint, str) or c.hookpoint not in HOOKPOINTS):
        raise ConfigError(f"--hookpoint {c.hookpoint!r} is unknown; expected one of {', '.join(HOOKPOINTS)}")
    if c.activation not in ACTIVATION_CHOICES:
        raise ConfigError(f"--activation '{c.activation}' is unknown; expected one of {', '.join(ACTIVATION_CHOICES)}")


def _check_sparsity(c: TrainConfig) -> None:
    """Target L0, initial λ and k (TopK/BatchTopK)."""
    targets = c.target_l0 if isinstance(c.target_l0, (list, tuple)) else [c.target_l0]
    for t in targets:
        if not _is_real(t) or not 0 < t < math.inf:
            shown = ",".join(map(str, targets)) if isinstance(c.target_l0, (list, tuple)) else t
            raise ConfigError(f"--target-l0 {shown} is invalid; expected a number > 0 (or one per layer)")
    if isinstance(c.target_l0, (list, tuple)) and isinstance(c.layers, (list, tuple)) and len(targets) != len(c.layers):
        raise ConfigError(
            f"--target-l0 has {len(targets)} values for {len(c.layers)} layers; expected one value, or one per layer"
        )
    if c.l1_init is not None and (not _is_real(c.l1_init) or not 0 < c.l1_init < math.inf):
        raise ConfigError(f"--l1 (initial λ) {c.l1_init} is invalid; expected a number > 0")
    if c.k is not None and not _is_int(c.k):
        raise ConfigError(f"--k {c.k!r} is invalid; expected a positive integer")
    if c.activation in ("topk", "batchtopk"):
        if c.k is not None and c.k <= 0:
            raise ConfigError(f"--k {c.k} is invalid; expected a positive integer")
        k = c.k if c.k is not None else max(1, round(c.target_l0))
        if c.n_features is not None and _is_int(c.n_features) and k > c.n_features:
            raise ConfigError(f"--k {k} is larger than --n-features {c.n_features}; expected k <= n_features")
    if not isinstance(c.calibrate, bool):
        raise ConfigError(f"calibrate {c.calibrate!r} is invalid; expected true or false")


def _check_layers(c: TrainConfig) -> None:
    if c.layers == "all":
        return
    if not isinstance(c.layers, (list, tuple)) or not all(_is_int(x) for x in c.layers):
        raise ConfigError(f"--layers {c.layers!r} is invalid; expected a list of layer numbers, e.g. 3,6")
    if not c.layers:
        raise ConfigError("--layers is empty; expected at least one layer, e.g. --layers 3,6")
    if len(set(c.layers)) != len(c.layers):
        raise ConfigError(f"--layers {list(c.layers)} lists a layer twice")
    if min(c.layers) < 0:
        raise ConfigError(f"layer {min(c.layers)} is out of range; expected layers >= 0")


def _check_counts(c: TrainConfig) -> None:
    """Integer sizes, intervals and the seed."""
    for name in ("n_tokens", "batch_size", "context", "expansion", "dead_window_tokens", "log_every"):
        v = getattr(c, name)
        if not _is_int(v) or v <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} {v!r} is invalid; expected a positive integer")
    if c.context < 2:
        raise ConfigError(f"--context {c.context} is too short; expected at least 2 tokens")
    for name in ("checkpoint_every", "resample_every"):
        v = getattr(c, name)
        if not _is_int(v) or v < 0:
            raise ConfigError(f"--{name.replace('_', '-')} {v!r} is invalid; expected an integer >= 0")
    if not _is_int(c.seed) or not 0 <= c.seed < 2**31:
        raise ConfigError(f"--seed {c.seed!r} is invalid; expected an integer in 0..{2**31 - 1}")
    if c.n_features is not None and (not _is_int(c.n_features) or c.n_features <= 0):
        raise ConfigError(f"--n-features {c.n_features!r} is invalid; expected a positive integer")


def _check_rates(c: TrainConfig) -> None:
    """Learning rate, epochs, fractions, gains and the memory budget."""
    for name in ("lr", "epochs"):
        v = getattr(c, name)
        if not _is_real(v) or not 0 < v < math.inf:
            raise ConfigError(f"--{name} {v} is invalid; expected a number > 0")
    if not math.isfinite(c.n_tokens * c.epochs):
        raise ConfigError(f"--n-tokens {c.n_tokens} × --epochs {c.epochs} is too large; expected a finite product")
    if not _is_real(c.eval_fraction) or not 0 < c.eval_fraction < 0.5:
        raise ConfigError(f"eval_fraction {c.eval_fraction} is invalid; expected 0 < x < 0.5")
    for name in ("warmup_frac", "decay_frac", "threshold_warmup_frac"):
        v = getattr(c, name)
        if not _is_real(v) or not 0 <= v <= 1.0:
            raise ConfigError(f"{name} {v!r} is invalid; expected a number in [0, 1.0]")
    for name in ("lambda_gain", "aux_k_coef", "lambda_horizon"):
        v = getattr(c, name)
        if name == "lambda_horizon" and v is None:
            continue
        if not _is_real(v) or not 0 <= v < math.inf:
            raise ConfigError(f"{name} {v!r} is invalid; expected a finite number >= 0")
    if not _is_real(c.preact_coef) or not 0 <= c.preact_coef < math.inf:
        raise ConfigError(f"--preact-coef {c.preact_coef!r} is invalid; expected a finite number >= 0")
    for name in ("init_l0_factor", "threshold_lr_scale", "clt_tanh_c"):
        v = getattr(c, name)
        if not _is_real(v) or not 0 < v < math.inf:
            raise ConfigError(f"{name} {v!r} is invalid; expected a finite number > 0")
    if c.max_memory_gb is not None and (not _is_real(c.max_memory_gb) or not 0 < c.max_memory_gb < math.inf):
        raise ConfigError(
            f"--max-memory {c.max_memory_gb!r} is invalid; expected a number of GB > 0 (or none: unbounded)"
        )


def _check_choices(c: TrainConfig) -> None:
    if c.dtype not in ("float32", "float16"):
        raise ConfigError(f"dtype '{c.dtype}' is unknown; expected 'float32' or 'float16'")
    if c.compute_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--compute-dtype '{c.compute_dtype}' is unknown; expected float32 or bfloat16")
    if c.model_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--model-dtype '{c.model_dtype}' is unknown; expected float32 or bfloat16")
    if c.parallel not in ("data", "layer"):
        raise ConfigError(f"--parallel '{c.parallel}' is unknown; expected 'data' or 'layer'")
    if c.store not in ("auto", "stream", "disk"):
        raise ConfigError(f"--store '{c.store}' is unknown; expected stream, disk or auto")
    if c.buffer_tokens is not None and (not _is_int(c.buffer_tokens) or c.buffer_tokens <= 0):
        raise ConfigError(f"buffer_tokens {c.buffer_tokens!r} is invalid; expected a positive integer")


def _check_clock(c: TrainConfig) -> None:
    """``time_budget`` and ``snapshot_at``: minutes of wall time (train/budget.py)."""
    tb = c.time_budget
    if tb is not None and (not _is_real(tb) or not 0 < tb < math.inf):
        raise ConfigError(f"--time-budget {tb!r} is invalid; expected a number of minutes > 0")
    if (tb is not None or c.snapshot_at) and c.kind == "clt":
        raise ConfigError("--time-budget and --snapshot-at are not available for --kind clt; expected a per-layer kind "
                          "(sae, transcoder, skip_transcoder)")
    snaps = c.snapshot_at
    if not isinstance(snaps, (list, tuple)) or not all(_is_real(m) and 0 < m < math.inf for m in snaps):
        raise ConfigError(f"--snapshot-at {snaps!r} is invalid; expected minutes > 0, e.g. 2,5")
    if tb is not None and any(m >= tb for m in snaps):
        raise ConfigError(f"--snapshot-at {','.join(f'{m:g}' for m in snaps)} is invalid; expected times "
                          f"before the --time-budget of {tb:g} minutes (the end of the run is saved anyway)")
