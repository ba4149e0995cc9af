"""Training configuration: one plain dataclass, saved as JSON next to every run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..dictionary.model import DEFAULT_HOOKPOINTS, KINDS
from ..errors import ConfigError

ACTIVATION_CHOICES = ("relu", "topk", "batchtopk", "jumprelu")


@dataclass
class TrainConfig:
    model: str = "smollm2-135m"
    layers: list[int] = field(default_factory=lambda: [3, 6])
    kind: str = "transcoder"  # sae | transcoder | skip_transcoder
    hookpoint: str | None = None  # SAE input/output hookpoint (default resid_pre); ignored for transcoders
    activation: str = "relu"
    target_l0: float = 32.0
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
    dead_window_tokens: int = 200_000  # a feature silent this long is dead
    resample_every: int = 400  # steps between dead-feature resamples (ReLU/JumpReLU)
    aux_k_coef: float = 1 / 32  # AuxK loss weight (TopK/BatchTopK)
    log_every: int = 20
    checkpoint_every: int = 200
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"  # activation cache dtype
    max_memory_gb: float | None = None
    parallel: str = "data"  # data | layer   (under torchrun)

    @property
    def hookpoints(self) -> tuple[str, str]:
        if self.kind == "sae":
            hp = self.hookpoint or "resid_pre"
            return hp, hp
        return DEFAULT_HOOKPOINTS[self.kind]

    @property
    def total_steps(self) -> int:
        return max(1, int(self.n_tokens * self.epochs) // self.batch_size)

    def validate(self) -> TrainConfig:
        if self.kind not in KINDS:
            raise ConfigError(f"--kind '{self.kind}' is unknown; expected one of {', '.join(KINDS)}")
        if self.activation not in ACTIVATION_CHOICES:
            raise ConfigError(
                f"--activation '{self.activation}' is unknown; expected one of {', '.join(ACTIVATION_CHOICES)}"
            )
        if not self.target_l0 > 0:
            raise ConfigError(f"--target-l0 {self.target_l0} is invalid; expected a number > 0")
        if self.l1_init is not None and not self.l1_init > 0:
            raise ConfigError(f"λ (l1_init) {self.l1_init} is invalid; expected a number > 0")
        if not self.layers:
            raise ConfigError("--layers is empty; expected at least one layer, e.g. --layers 3,6")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"--layers {self.layers} lists a layer twice")
        for name in ("n_tokens", "batch_size", "context", "expansion"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} {v!r} is invalid; expected a positive integer")
        if not self.lr > 0:
            raise ConfigError(f"--lr {self.lr} is invalid; expected a number > 0")
        if not self.epochs > 0:
            raise ConfigError(f"--epochs {self.epochs} is invalid; expected a number > 0")
        if not 0 < self.eval_fraction < 0.5:
            raise ConfigError(f"eval_fraction {self.eval_fraction} is invalid; expected 0 < x < 0.5")
        if self.parallel not in ("data", "layer"):
            raise ConfigError(f"--parallel '{self.parallel}' is unknown; expected 'data' or 'layer'")
        if self.activation in ("topk", "batchtopk") and self.k is not None and self.k <= 0:
            raise ConfigError(f"--k {self.k} is invalid; expected a positive integer")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown training config keys {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(**d).validate()
