"""End-to-end distillation of a MoS adapter (student) against its source LoRA (teacher).

One base model carries both adapters (:mod:`mosconv.model.runtime`); each step runs the teacher
(``base + LoRA``, no grad) and the student (``base + MoS``) on a batch of token blocks and
minimizes the mean per-token ``KL(teacher || student)`` of the next-token distributions
(plus, optionally, a hidden-state matching term).  Trainable: the student's pools and slot
weights; fixed: its routes and every base weight.  AdamW, linear warm-up then cosine decay,
bf16 autocast on CUDA, a held-out split evaluated every ``eval_every`` steps: the best
held-out state is kept and training stops after ``patience`` evaluations without gain.

Also here: :func:`evaluate`, the fidelity numbers of ``mosconv eval`` (KL to the teacher,
perplexities, ``effect_retained = 1 - KL(t||s) / KL(t||base)``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, NumericalError
from ..mos.types import KindPools, MosAdapter
from ..names import kind_ids

if TYPE_CHECKING:
    from pathlib import Path

    from ..lora.types import LoraAdapter

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistillConfig:
    """Settings of one distillation run.

    Attributes:
        steps: optimizer steps at most (early stopping may end sooner).
        lr: peak AdamW learning rate.
        batch_size: token blocks per step.
        weight_decay: AdamW weight decay.
        warmup: share of ``steps`` spent warming up linearly.
        eval_every: steps between held-out evaluations.
        patience: evaluations without improvement before stopping (0 = never stop early).
        hidden_weight: weight of the hidden-state term (MSE of the last hidden states,
            divided by the teacher's mean square); 0 = KL only.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        seed: order of the training blocks.
    """

    steps: int = 100
    lr: float = 2e-3
    batch_size: int = 4
    weight_decay: float = 0.0
    warmup: float = 0.05
    eval_every: int = 20
    patience: int = 3
    hidden_weight: float = 0.0
    device: str = "auto"
    seed: int = 0

    def validate(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        for key in ("steps", "batch_size", "eval_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        for key, ok, want in (("patience", self.patience >= 0, ">= 0"),
                              ("hidden_weight", self.hidden_weight >= 0, ">= 0"),
                              ("warmup", 0 <= self.warmup < 1, "in [0, 1)")):
            if not ok:
                raise ConfigError(f"{key} must be {want}, got {getattr(self, key)!r}")


@dataclass(frozen=True)
class DistillResult:
    """The distilled adapter and what happened: ``info`` (JSON values: device, steps, KL
    before and after, held-out curve, losses, timing) goes into the report."""

    mos: MosAdapter
    info: dict[str, Any] = field(default_factory=dict)


class Fidelity(TypedDict):
    """What :func:`evaluate` measures of a student against its teacher on some text."""

    tokens: int  # tokens of the text
    kl_teacher_student: float  # mean per-token KL(teacher || student)
    kl_teacher_base: float  # mean per-token KL(teacher || base model)
    effect_retained: float | None  # 1 - KL(t||s) / KL(t||base); None when KL(t||base) is 0
    ppl_base: float  # perplexities of the next tokens
    ppl_teacher: float
    ppl_student: float


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU.

    Raises:
        ConfigError: unknown device, or ``cuda`` without a GPU.
    """
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is available (cpu or auto "
                          "work here)", options=("device",))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def _autocast(device: torch.device) -> torch.autocast:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _logits(model: nn.Module, ids: torch.Tensor,
            hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    out = model(input_ids=ids, output_hidden_states=hidden)
    return out.logits.float(), (out.hidden_states[-1].float() if hidden else None)


def token_kl(t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
    """Per-position ``KL(softmax t || softmax s)``, shape ``t_logits.shape[:-1]``."""
    t = F.log_softmax(t_logits, -1)
    s = F.log_softmax(s_logits, -1)
    return (t.exp() * (t - s)).sum(-1)


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood of ``ids`` (positions 1..)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                           reduction="sum")


@torch.no_grad()
def mean_kl(model: nn.Module, blocks: torch.Tensor, teacher: str | None, student: str | None, *,
            batch_size: int = 4, device: torch.device | None = None) -> float:
    """Mean per-token ``KL(teacher || student)`` over ``blocks``; a name of None is the base."""
    from .runtime import set_active

    device = device or next(model.parameters()).device
    total, n = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start:start + batch_size].to(device)
        with _autocast(device):
            set_active(model, teacher)
            t, _ = _logits(model, ids)
            set_active(model, student)
            s, _ = _logits(model, ids)
        total += float(token_kl(t, s).sum())
        n += ids.numel()
    return total / max(n, 1)


def evaluate(model: nn.Module, blocks: torch.Tensor, teacher: str, student: str, *,
             batch_size: int = 4, device: torch.device | None = None) -> Fidelity:
    """Fidelity of ``student`` to ``teacher`` (adapter names attached to ``model``):
    mean per-token KL(teacher||student) and KL(teacher||base), perplexities of base,
    teacher and student on the text, and ``effect_retained``."""
    return evaluate_many(model, blocks, teacher, [student], batch_size=batch_size,
                         device=device)[student]


@torch.no_grad()
def evaluate_many(model: nn.Module, blocks: torch.Tensor, teacher: str, students: list[str], *,
                  batch_size: int = 4, device: torch.device | None = None
                  ) -> dict[str, Fidelity]:
    """:func:`evaluate` for several students at once: the base and the teacher run once per
    batch, each student once."""
    from .runtime import set_active

    device = device or next(model.parameters()).device
    kl_tb = nll_b = nll_t = 0.0
    kl_ts = dict.fromkeys(students, 0.0)
    nll_s = dict.fromkeys(students, 0.0)
    n = n_pred = 0
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start:start + batch_size].to(device)
        with _autocast(device):
            set_active(model, None)
            base, _ = _logits(model, ids)
            set_active(model, teacher)
            t, _ = _logits(model, ids)
        kl_tb += float(token_kl(t, base).sum())
        nll_b += float(_nll(base, ids))
        nll_t += float(_nll(t, ids))
        del base
        for name in students:
            with _autocast(device):
                set_active(model, name)
                s, _ = _logits(model, ids)
            kl_ts[name] += float(token_kl(t, s).sum())
            nll_s[name] += float(_nll(s, ids))
        n += ids.numel()
        n_pred += ids.numel() - ids.shape[0]
    kl_tb /= n
    return {name: {
        "tokens": n,
        "kl_teacher_student": kl_ts[name] / n,
        "kl_teacher_base": kl_tb,
        "effect_retained": 1.0 - kl_ts[name] / n / kl_tb if kl_tb > 0 else None,
        "ppl_base": math.exp(nll_b / n_pred),
        "ppl_teacher": math.exp(nll_t / n_pred),
        "ppl_student": math.exp(nll_s[name] / n_pred),
    } for name in students}


def _schedule(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def distill(model: nn.Module, teacher: LoraAdapter | str | Path, student: MosAdapter,
            train: torch.Tensor, held_out: torch.Tensor,
            config: DistillConfig = DistillConfig(), *,
            progress: Callable[[int, float], None] | None = None) -> DistillResult:
    """Fine-tune ``student``'s pools (and slot weights) so that ``model + student`` matches
    ``model + teacher``. ``model`` is moved to the chosen device and its parameters are set
    to ``requires_grad=False``; its weights are not changed and both adapters are removed
    again at the end (also on error).

    Args:
        model: a transformers causal LM (base weights are not changed).
        teacher: the source :class:`~mosconv.lora.types.LoraAdapter` (or a path).
        student: the converted :class:`MosAdapter` (initialization).
        train, held_out: ``(n, seq_len)`` token blocks.
        progress: called after each step with ``(step, loss)``.

    Raises:
        ConfigError: invalid settings, unknown device, adapter and model that do not match.
    """
    from .runtime import apply, remove, trainable_parameters

    config.validate()
    if any(p.shared for p in student.kinds.values()):
        raise ConfigError("distillation of an adapter whose pools live in a zoo's shared pool "
                          "file is not supported (the shared entries belong to other adapters too)")
    device = resolve_device(config.device)
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    apply(model, teacher, name="teacher", activate=False)
    try:
        apply(model, student, name="student", trainable=True, activate=False)
        params = trainable_parameters(model, "student")
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        warm = int(config.warmup * config.steps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: _schedule(s, config.steps, warm))
        bs = config.batch_size
        kl_before = mean_kl(model, held_out, "teacher", "student", batch_size=bs, device=device)
        _check_finite(kl_before, "the held-out KL of the converted adapter before training")
        best = (kl_before, 0, [p.detach().clone() for p in params])
        evals = [(0, kl_before)]
        losses = []
        g = torch.Generator().manual_seed(config.seed)
        order = torch.randperm(train.shape[0], generator=g)
        pos, since_best, step, seen = 0, 0, 0, 0
        t0 = time.perf_counter()
        from .runtime import set_active

        for step in range(1, config.steps + 1):
            if pos + bs > order.numel():
                order, pos = torch.randperm(train.shape[0], generator=g), 0
            ids = train[order[pos:pos + bs]].to(device)  # all of them when fewer than bs
            pos += bs
            seen += ids.numel()
            want_hidden = config.hidden_weight > 0
            with _autocast(device):
                with torch.no_grad():
                    set_active(model, "teacher")
                    t_logits, t_hidden = _logits(model, ids, want_hidden)
                set_active(model, "student")
                s_logits, s_hidden = _logits(model, ids, want_hidden)
            loss = token_kl(t_logits, s_logits).mean()
            if want_hidden:
                mse = (s_hidden - t_hidden).pow(2).mean() / t_hidden.pow(2).mean().clamp_min(1e-12)
                loss = loss + config.hidden_weight * mse
            _check_finite(float(loss.detach()), f"the loss at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if progress:
                progress(step, losses[-1])
            if step % config.eval_every == 0 or step == config.steps:
                kl = mean_kl(model, held_out, "teacher", "student", batch_size=bs, device=device)
                _check_finite(kl, f"the held-out KL at step {step}")
                evals.append((step, kl))
                if kl < best[0]:
                    best, since_best = (kl, step, [p.detach().clone() for p in params]), 0
                else:
                    since_best += 1
                    if config.patience and since_best >= config.patience:
                        break
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            for p, v in zip(params, best[2]):
                p.copy_(v)
        mos = trained_mos(model, "student", student)
    finally:
        remove(model)
    info = {
        "device": device.type,
        "dtype": "bfloat16-autocast" if device.type == "cuda" else "float32",
        "steps": step,
        "max_steps": config.steps,
        "best_step": best[1],
        "lr": config.lr,
        "batch_size": min(bs, int(train.shape[0])),  # blocks per step
        "seq_len": int(train.shape[1]),
        "train_blocks": int(train.shape[0]),
        "held_out_blocks": int(held_out.shape[0]),
        "train_tokens_seen": seen,
        "hidden_weight": config.hidden_weight,
        "kl_before": kl_before,
        "kl_after": best[0],
        "held_out_kl": [list(e) for e in evals],
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "losses": losses[:: max(1, len(losses) // 50)],
        "seconds": seconds,
        "steps_per_s": step / seconds if seconds > 0 else None,
    }
    return DistillResult(mos=mos, info=info)


def _check_finite(value: float, what: str) -> None:
    """Stop distillation when a number turns NaN or Inf (nothing is written)."""
    if not math.isfinite(value):
        raise NumericalError(
            f"distillation stopped: {what} is not finite ({value}): the base model's outputs "
            "overflow or hold NaN (run it in float32), or training diverged (lower the "
            "learning rate); no adapter was written")


def trained_mos(model: nn.Module, name: str, template: MosAdapter) -> MosAdapter:
    """``template`` with the pools and slot weights currently held by ``model``'s adapter
    ``name`` (float32, CPU); routes and structure unchanged."""
    from .runtime import POOLS_ATTR, _named_layers, _resolve

    container = getattr(model, POOLS_ATTR)[name]
    kinds = {}
    ids = kind_ids(template.kinds)
    for kind, p in template.kinds.items():
        pm = container[ids[kind]]
        kinds[kind] = KindPools(kind, p.d_in, p.d_out, p.nc, pm.pool_A.detach().float().cpu(),
                                pm.pool_B.detach().float().cpu(), p.public_A, p.public_B,
                                p.shared)
    layers = _named_layers(model)
    modules = []
    for m in template.modules:
        delta = layers[_resolve(m.name, layers)].deltas[name]
        if m.weights_A is not None:
            m = replace(m, weights_A=delta.weights_A.detach().float().cpu().clone(),
                        weights_B=delta.weights_B.detach().float().cpu().clone())
        if m.core is not None:
            m = replace(m, core=delta.core.detach().float().cpu().clone())
        modules.append(m)
    return replace(template, kinds=kinds, modules=tuple(modules))
