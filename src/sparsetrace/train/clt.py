"""Training a cross-layer transcoder (CLT): one training step over every layer at once.

The model is :class:`~sparsetrace.dictionary.clt.CrossLayerTranscoder`; training keeps its decoder in
the target-major layout of :mod:`.clt_ops` (``dec[l] [L - l, F, d]``) and hands back a CLT with the
usual ``W_dec`` at the end. Loss, per step, on activations scaled per layer to unit mean square:

    sum_j MSE_j  +  sum_l λ_l · Σ_f tanh(c · ||W_dec(l, f)|| · a_lf) / d        (ReLU, JumpReLU)
                 +  p · sum_l Σ_f ReLU(θ_lf − pre_lf) · ||W_dec(l, f)|| / d      (optional, --preact-coef)

with ``||W_dec(l, f)||`` the norm of feature ``(l, f)``'s writes to *all* its target layers
(Anthropic's sparsity penalty) and θ the JumpReLU threshold (0 for ReLU and TopK). λ_l is tuned per
layer by :class:`~.controller.L0Controller` towards that layer's target L0; JumpReLU learns its
thresholds through the straight-through pseudo-derivative of
:func:`~sparsetrace.dictionary.activations.jumprelu`, and TopK fixes L0 = k. The pre-activation term
pulls features that have stopped firing back towards their threshold (against dead features).

Only the entries that matter leave the encoder: for each layer the active features, plus (JumpReLU)
the ones within half a bandwidth below their threshold, whose gradient trains the thresholds. Those
ragged codes go through the sparse decode of :mod:`.clt_ops`.

Under ``torchrun`` with ``parallel="data"`` the step's module is wrapped in DistributedDataParallel
and each rank takes a disjoint slice of every global batch, as for per-layer dictionaries.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..dictionary.activations import jumprelu
from ..dictionary.clt import CLTConfig, CrossLayerTranscoder
from ..errors import ConfigError, TrainingDiverged
from .clt_ops import DENSE_DENSITY, clt_decode
from .config import TrainConfig
from .controller import L0Controller, init_thresholds

DECODER_INIT = 0.3  # initial norm of each feature's total write (inputs are scaled to unit mean square)
CLT_ACTIVATIONS = ("relu", "jumprelu", "topk")


def clt_parameter_count(n_layers: int, n_features: int, d_model: int) -> int:
    """Parameters of a CLT: encoders, decoders to every later layer, biases and thresholds."""
    dec = n_features * d_model * n_layers * (n_layers + 1) // 2
    return n_layers * n_features * d_model + dec + 2 * n_layers * n_features + n_layers * d_model


def clt_working_bytes(tcfg: TrainConfig, n_layers: int, n_features: int, d_model: int) -> int:
    """Working memory of a CLT step beyond parameters, gradients and Adam: the batch (raw and scaled), the
    [L, N, F] pre-activations with their gradient, the [L, N, d] reconstruction and its gradient, one
    source's decoder-gradient block; plus a checkpoint's serialisation when checkpoints are on."""
    f32, n = 4, tcfg.batch_size
    step = n * n_layers * (4 * d_model + 3 * n_features + 3 * d_model) * f32 + n_features * n_layers * d_model * f32
    finish = 2048 * n_layers * (4 * d_model + 3 * n_features) * f32
    ckpt = 3 * clt_parameter_count(n_layers, n_features, d_model) * f32 if tcfg.checkpoint_every else 0
    return max(step, finish) + ckpt


def layer_targets(tcfg: TrainConfig, n_layers: int) -> list[float]:
    """The target L0 of every layer (one value for all, or one per layer)."""
    t = tcfg.target_l0
    if isinstance(t, (list, tuple)):
        if len(t) != n_layers:
            raise ConfigError(f"--target-l0 lists {len(t)} values; a CLT over {n_layers} layers needs 1 or {n_layers}")
        return [float(v) for v in t]
    return [float(t)] * n_layers


def _data_parallel(tcfg: TrainConfig) -> bool:
    return dist.is_available() and dist.is_initialized() and tcfg.parallel == "data" and dist.get_world_size() > 1


class _CLTStep(nn.Module):
    """The trainable tensors of a CLT and one step's loss (inside ``forward``, so DDP sees every use)."""

    def __init__(self, clt: CrossLayerTranscoder, tanh_c: float, preact_coef: float):
        super().__init__()
        self.cfg = clt.cfg
        self.W_enc, self.b_enc, self.b_dec = clt.W_enc, clt.b_enc, clt.b_dec
        self.log_threshold = clt.log_threshold
        L = clt.n_layers
        self.dec = nn.ParameterList(
            [nn.Parameter(clt.W_dec[src].detach().transpose(0, 1).contiguous() * DECODER_INIT) for src in range(L)]
        )
        self.tanh_c, self.preact_coef = tanh_c, preact_coef

    @torch.no_grad()
    def decoder_norms(self) -> Tensor:
        """``[L, F]`` norm of each feature's writes over every target layer (no autograd: see
        :meth:`CLTTrainer.add_norm_grad`)."""
        return torch.stack([torch.linalg.vector_norm(w, dim=(0, 2)).clamp_min(1e-6) for w in self.dec])

    def codes(self, xs: Tensor, with_grad_band: bool = True):
        """Per layer: dense pre-activations, and the ragged code (values, rows, cols) that is decoded.

        All layers' encoders run as one batched matmul (one backward, no per-layer slices of W_enc's
        gradient)."""
        cfg = self.cfg
        pre_all = torch.baddbmm(self.b_enc.unsqueeze(1), xs, self.W_enc.transpose(1, 2))  # [L, N, F]
        pres = pre_all.unbind(0)
        thrs = self.log_threshold.exp().unbind(0) if self.log_threshold is not None else None
        out = []
        for layer, pre in enumerate(pres):
            if cfg.activation == "topk":
                top, idx = pre.topk(int(cfg.k), dim=-1, sorted=False)
                rows = torch.arange(pre.shape[0]).repeat_interleave(int(cfg.k))
                cols = idx.reshape(-1)
                order = torch.argsort(rows * pre.shape[1] + cols)  # row-major, as the decoder expects
                rows, cols, values = rows[order], cols[order], top.relu().reshape(-1)[order]
            else:
                if thrs is not None:
                    thr = thrs[layer]
                    acts = jumprelu(pre, thr, cfg.jumprelu_bandwidth)
                    band = cfg.jumprelu_bandwidth / 2 if with_grad_band else 0.0
                    keep = pre.detach() > (thr.detach() - band)
                else:
                    acts = pre.relu()
                    keep = pre.detach() > 0
                rows, cols = keep.nonzero(as_tuple=True)
                values = acts[rows, cols]
            out.append((pre, values, rows, cols))
        return out, (None if thrs is None else torch.stack(thrs))

    def forward(self, xs: Tensor, ys: Tensor, lams: Tensor):
        """xs, ys: ``[L, N, d]`` scaled activations; lams: ``[L]`` -> (loss, mse [L], l0 [L], counts [L, F],
        err, norms): ``norms`` is a leaf whose gradient is dL/d||W_dec(l, f)||."""
        cfg = self.cfg
        L, n, d = xs.shape
        codes, thr_all = self.codes(xs)
        norms = self.decoder_norms().requires_grad_()
        y_hat = clt_decode([c[1] for c in codes], [c[2] for c in codes], [c[3] for c in codes], list(self.dec), n)
        err = y_hat + self.b_dec[:, None, :] - ys
        mse = err.pow(2).mean((1, 2))
        loss = mse.sum()
        l0, counts = [], []
        for layer, (pre, values, _rows, cols) in enumerate(codes):
            on = values.detach() > 0
            l0.append(on.sum() / n)
            counts.append(torch.bincount(cols[on], minlength=cfg.n_features))
            if cfg.activation != "topk":
                pen = torch.tanh(self.tanh_c * norms[layer][cols] * values).sum() / n
                loss = loss + lams[layer] * pen / d
            if self.preact_coef > 0:
                thr = thr_all[layer] if thr_all is not None else 0.0
                loss = loss + self.preact_coef * ((thr - pre).relu() * norms[layer]).sum() / (n * d)
        return loss, mse.detach(), torch.stack(l0), torch.stack(counts), err.detach(), norms


class CLTTrainer:
    """Everything needed to train one CLT over ``n_layers`` layers."""

    def __init__(self, tcfg: TrainConfig, *, n_layers: int, d_model: int, model_id: str,
                 in_scales: list[float], out_scales: list[float]):
        self.tcfg = tcfg
        if tcfg.activation not in CLT_ACTIVATIONS:
            raise ConfigError(f"--activation '{tcfg.activation}' is not available for --kind clt; "
                              f"expected one of {', '.join(CLT_ACTIVATIONS)}")
        self.targets = layer_targets(tcfg, n_layers)
        n_features = tcfg.n_features or tcfg.expansion * d_model
        k = tcfg.k if tcfg.k is not None else max(1, round(max(self.targets)))
        if tcfg.activation == "topk" and k > n_features:
            raise ConfigError(f"--k {k} is larger than n_features={n_features}; expected k <= n_features")
        cfg = CLTConfig(n_layers=n_layers, d_model=d_model, n_features=n_features, activation=tcfg.activation,
                        k=k if tcfg.activation == "topk" else None, model_id=model_id)
        self.in_scales, self.out_scales = list(in_scales), list(out_scales)
        self.s_in = torch.tensor(self.in_scales)[:, None, None]
        self.s_out = torch.tensor(self.out_scales)[:, None, None]
        clt = CrossLayerTranscoder(cfg, seed=tcfg.seed)
        self.module = _CLTStep(clt, tcfg.clt_tanh_c, tcfg.preact_coef)
        for w in clt.W_dec:  # the step module holds the decoder now (target-major); free the copy
            w.data = torch.empty(0)
        self.clt = clt
        self.step_module: nn.Module = self.module
        if _data_parallel(tcfg):
            self.step_module = nn.parallel.DistributedDataParallel(self.module)
        m = self.module
        groups = [{"params": [p for p in m.parameters() if p is not m.log_threshold], "lr_scale": 1.0}]
        if m.log_threshold is not None:
            groups.append({"params": [m.log_threshold], "lr_scale": tcfg.threshold_lr_scale})
        # fused Adam with float32 moments: measured fastest of fused Adam, bf16-moment Adam and lazy-row
        # Adam (bench/bench_clt.py): at batch 1024 every feature fires, so lazy rows skip nothing
        fused = {"fused": True} if torch.device(tcfg.device).type in ("cpu", "cuda") else {}
        self.opt = torch.optim.Adam(groups, lr=tcfg.lr, **fused)
        # tanh(c·|W|·a) is c·|W|·a (an L1 term) for small a and an L0 count for large a: ReLU starts in the
        # L1 regime with the per-layer trainer's L1 weight, JumpReLU (whose features are large) as an L0 count
        init = tcfg.l1_init if tcfg.l1_init is not None else (
            0.05 / tcfg.clt_tanh_c if tcfg.activation == "relu" else 1.0)
        horizon = tcfg.lambda_horizon if tcfg.lambda_horizon is not None else (
            50.0 if tcfg.activation == "jumprelu" else 20.0)
        self.controllers = [L0Controller(t, math.log(init), tcfg.lambda_gain, horizon=horizon) for t in self.targets]
        self.since_fired = torch.zeros(n_layers, n_features, dtype=torch.long)
        total_tokens = tcfg.total_steps * tcfg.batch_size
        self.dead_window = max(10 * tcfg.batch_size, min(tcfg.dead_window_tokens, total_tokens // 8))
        self.step = 0
        self.last_l0: list[float] | None = None

    @property
    def uses_lambda(self) -> bool:
        return self.tcfg.activation in ("relu", "jumprelu")

    @property
    def thresholds_frozen(self) -> bool:
        return self.module.log_threshold is not None and \
            self.step < self.tcfg.threshold_warmup_frac * self.tcfg.total_steps

    def lr_at(self, step: int) -> float:
        total, lr = self.tcfg.total_steps, self.tcfg.lr
        warm = max(1, int(total * self.tcfg.warmup_frac))
        decay_start = int(total * (1 - self.tcfg.decay_frac))
        if step < warm:
            return lr * (step + 1) / warm
        if step >= decay_start:
            return lr * max(0.0, (total - step) / max(1, total - decay_start))
        return lr

    def scaled(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """A batch dict (``mlp_in.L`` / ``mlp_out.L`` for every layer) -> scaled ``[L, N, d]`` x and y."""
        hp_in, hp_out = self.tcfg.hookpoints
        L = self.clt.n_layers
        try:
            xs = torch.stack([batch[f"{hp_in}.{layer}"] for layer in range(L)])
            ys = torch.stack([batch[f"{hp_out}.{layer}"] for layer in range(L)])
        except KeyError as e:
            raise ConfigError(f"a CLT batch lacks {e}; expected {hp_in}.L and {hp_out}.L for layers 0..{L - 1}") from None
        dev = self.tcfg.device
        return xs.to(dev, torch.float32) / self.s_in.to(dev), ys.to(dev, torch.float32) / self.s_out.to(dev)

    def train_step(self, batch: dict[str, Tensor]) -> dict:
        xs, ys = self.scaled(batch)
        m = self.module
        if self.step == 0 and self.uses_lambda:
            self._init_thresholds(xs)
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step) * g.get("lr_scale", 1.0)
        lams = torch.tensor([c.value for c in self.controllers])
        bf16 = self.tcfg.compute_dtype == "bfloat16"
        with torch.autocast(xs.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, mse, l0, counts, err, norms = self.step_module(xs, ys, lams)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"CLT loss became {float(loss.detach())} at step {self.step}; "
                                   f"expected a finite loss (try a lower --lr)")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.add_norm_grad(norms)
        if self.thresholds_frozen and m.log_threshold.grad is not None:
            m.log_threshold.grad.zero_()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        self.opt.step()
        with torch.no_grad():
            var = (ys - ys.mean(1, keepdim=True)).pow(2).sum((1, 2)).clamp_min(1e-12)
            fvu = err.pow(2).sum((1, 2)) / var
            stats = torch.cat([l0, fvu, mse, loss.detach().reshape(1)])
            fired = (counts > 0).to(torch.int64)
            world = 1
            if _data_parallel(self.tcfg):
                world = dist.get_world_size()
                dist.all_reduce(stats)
                stats /= world
                dist.all_reduce(fired, op=dist.ReduceOp.MAX)
            L = self.clt.n_layers
            l0_v, fvu_v, mse_v = stats[:L].tolist(), stats[L:2 * L].tolist(), stats[2 * L:3 * L].tolist()
            self.since_fired += xs.shape[1] * world
            self.since_fired[fired.bool().cpu()] = 0
        lam_v = [c.value for c in self.controllers]
        self.last_l0 = l0_v
        if self.uses_lambda and not self.thresholds_frozen:
            for c, v in zip(self.controllers, l0_v, strict=True):
                c.update(v)
        self.step += 1
        # rows_hit: the fraction of decoder rows this step's gradient touched (all a lazy-row optimizer
        # could skip is the rest)
        return {"loss": float(stats[-1]), "l0": l0_v, "fvu": fvu_v, "mse": mse_v, "lambda": lam_v,
                "dead_frac": float((self.since_fired > self.dead_window).float().mean()),
                "rows_hit": float(fired.float().mean())}

    @torch.no_grad()
    def add_norm_grad(self, norms: Tensor) -> None:
        """The penalty's gradient through the decoder norms, added in place: d||w||/dw = w / ||w||, so
        ``grad += w * (dL/d||w|| / ||w||)`` per feature, one pass over the decoder (autograd through the
        norm would allocate and add three decoder-sized temporaries). Under DDP the per-feature factor is
        averaged across ranks first, as DDP averages the other gradients."""
        if norms.grad is None:
            return
        coef = norms.grad / norms.detach()
        if _data_parallel(self.tcfg):
            dist.all_reduce(coef)
            coef /= dist.get_world_size()
        for src, w in enumerate(self.module.dec):
            if w.grad is None:
                w.grad = torch.zeros_like(w)
            w.grad.addcmul_(w.detach(), coef[src][None, :, None])

    @torch.no_grad()
    def _init_thresholds(self, xs: Tensor) -> None:
        """Every feature starts firing on init_l0_factor x target / n_features of the tokens: through its
        JumpReLU threshold, or (ReLU) its encoder bias (a dense start takes the controller thousands of steps
        to thin out, since the biases move by about lr per step)."""
        m = self.module
        for layer in range(self.clt.n_layers):
            n, t = self.clt.n_features, self.targets[layer]
            # at most 2x the target where init_l0_factor x target would make the code too dense to decode
            # sparsely (clt_ops.DENSE_DENSITY): a dense CLT step at SmolLM2's size takes minutes
            rate = min(0.5, min(self.tcfg.init_l0_factor * t, max(2 * t, DENSE_DENSITY / 2 * n)) / n)
            pre = torch.addmm(m.b_enc[layer], xs[layer], m.W_enc[layer].t())
            thr = init_thresholds(pre, rate)
            if _data_parallel(self.tcfg):
                dist.all_reduce(thr)
                thr /= dist.get_world_size()
            if m.log_threshold is not None:
                m.log_threshold[layer].copy_(thr.log())
            else:
                m.b_enc[layer].sub_(thr)

    # ------------------------------------------------------------------ results
    @torch.no_grad()
    def measure(self, xs: Tensor, ys: Tensor) -> tuple[list[float], list[float]]:
        """Per-layer L0 and FVU on scaled activations (no gradient band: exactly the inference code)."""
        m = self.module
        codes = m.codes(xs, with_grad_band=False)[0]
        n = xs.shape[1]
        keep = [c[1] > 0 for c in codes]
        y_hat = clt_decode([c[1][k] for c, k in zip(codes, keep, strict=True)],
                           [c[2][k] for c, k in zip(codes, keep, strict=True)],
                           [c[3][k] for c, k in zip(codes, keep, strict=True)], list(m.dec), n)
        err = y_hat + m.b_dec[:, None, :] - ys
        var = (ys - ys.mean(1, keepdim=True)).pow(2).sum((1, 2)).clamp_min(1e-12)
        l0 = [float(k.sum()) / n for k in keep]
        return l0, (err.pow(2).sum((1, 2)) / var).tolist()

    @torch.no_grad()
    def export(self) -> CrossLayerTranscoder:
        """The trained CLT on raw activations (scales folded in); the trainer is spent afterwards."""
        clt, m = self.clt, self.module
        for src in range(clt.n_layers):
            clt.W_dec[src].data = m.dec[src].detach().transpose(0, 1).contiguous()
            m.dec[src].data = torch.empty(0)
        self.opt.state.clear()
        clt.fold_normalisation(self.in_scales, self.out_scales)
        return clt.eval()
