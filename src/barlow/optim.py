"""LARS, the weights/biases parameter split, and the one per-step learning-rate schedule.

The official Barlow Twins recipe (Zbontar et al., 2021, §4 and facebookresearch/barlowtwins):

* LARS with trust coefficient η = 0.001 and momentum 0.9; 1-D parameters (biases and the
  BatchNorm scale/shift) are excluded from both weight decay and the LARS adaptation.
* Two learning rates, both scaled linearly with the batch: 0.2 × B/256 for weights and
  0.0048 × B/256 for biases/BN, i.e. ``bias_lr_scale = 0.0048 / 0.2 = 0.024``.
* 10 warm-up epochs, then cosine decay to 1/1000 of the base rate, stepped every iteration.
* Weight decay 1.5e-6 in the paper text, 1e-6 in the released code.

Usage::

    optimizer = build_optimizer("lars", model, lr=scaled_lr(0.2, 2048), weight_decay=1e-6,
                                bias_lr_scale=0.024)
    for step in range(total_steps):
        set_learning_rate(optimizer, warmup_cosine(step, total_steps=total_steps,
                                                   warmup_steps=warmup_steps, base_lr=base_lr))
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from barlow.config import OptimizerName

OPTIMIZERS: tuple[str, ...] = typing.get_args(OptimizerName)


def _is_bias_or_norm(p: Tensor) -> bool:
    # The official recipe tells biases and BN scale/shift apart from weights by ndim alone;
    # 0-d parameters (e.g. a learnable temperature) are treated the same way.
    return p.ndim <= 1


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al., 2017) as used by Barlow Twins.

    Per parameter ``p`` with gradient ``g``, in this order::

        g ← g + wd·p                                    unless excluded from weight decay
        q = η·‖p‖ / ‖g‖  if ‖p‖ > 0 and ‖g‖ > 0 else 1   unless excluded from adaptation
        g ← q·g
        μ ← m·μ + g
        p ← p − lr·μ

    ``weight_decay_filter`` / ``lars_adaptation_filter`` (defaults, overridable per param group):
    when True, the 1-D parameters of the group (biases, norm-layer scale/shift) are excluded from
    weight decay / adaptation; when False nothing in the group is excluded. A group produced by
    :func:`parameter_groups` named "biases" holds only 1-D parameters, so the defaults exclude it
    as a whole, which is the official split.

    The trust ratio stays a 0-d tensor selected with ``torch.where``: no host synchronisation per
    parameter, so a step on an accelerator never waits for the device.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        eta: float = 0.001,
        weight_decay_filter: bool = True,
        lars_adaptation_filter: bool = True,
    ) -> None:
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "eta": eta,
            "weight_decay_filter": weight_decay_filter,
            "lars_adaptation_filter": lars_adaptation_filter,
        }
        _check_lars_hyperparameters(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its own hyper-parameters are validated like the defaults."""
        super().add_param_group(param_group)
        _check_lars_hyperparameters(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One LARS update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = [self._adapted_gradient(p, group) for p in params]
            buffers = [self._momentum_buffer(p) for p in params]
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, updates)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])
        return loss

    def _adapted_gradient(self, p: Tensor, group: dict[str, Any]) -> Tensor:
        """The gradient after weight decay and trust-ratio scaling (before momentum)."""
        grad = p.grad
        if grad is None or grad.is_sparse:
            raise ValueError("LARS needs dense gradients; sparse gradients are not supported")
        excluded = _is_bias_or_norm(p)
        if group["weight_decay"] != 0 and not (group["weight_decay_filter"] and excluded):
            grad = grad.add(p, alpha=group["weight_decay"])
        if not (group["lars_adaptation_filter"] and excluded):
            grad = grad.mul(_trust_ratio(p, grad, group["eta"]))
        return grad

    def _momentum_buffer(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        buffer: Tensor = state["momentum_buffer"]
        return buffer


def _trust_ratio(p: Tensor, grad: Tensor, eta: float) -> Tensor:
    """q = η·‖p‖/‖g‖ as a 0-d tensor, 1 where either norm is zero (fresh zero init, dead unit)."""
    weight_norm = torch.linalg.vector_norm(p)
    grad_norm = torch.linalg.vector_norm(grad)
    # Both branches are computed; the division may give inf/nan where grad_norm == 0, and
    # torch.where discards it without the host ever looking at the value.
    ratio = eta * weight_norm / grad_norm
    usable = (weight_norm > 0) & (grad_norm > 0)
    return torch.where(usable, ratio, torch.ones_like(ratio))


def _check_lars_hyperparameters(group: dict[str, Any]) -> None:
    lr, weight_decay = group["lr"], group["weight_decay"]
    momentum, eta = group["momentum"], group["eta"]
    if not (isinstance(lr, int | float) and lr >= 0):
        raise ValueError(f"LARS lr must be a number >= 0 (0 is fine at warm-up start), got {lr!r}")
    if not weight_decay >= 0:
        raise ValueError(f"LARS weight_decay must be >= 0, got {weight_decay!r}")
    if not 0 <= momentum < 1:
        raise ValueError(f"LARS momentum must be in [0, 1), got {momentum!r}")
    if not eta > 0:
        raise ValueError(f"LARS eta (trust coefficient) must be > 0, e.g. 0.001, got {eta!r}")


def parameter_groups(
    model: nn.Module,
    *,
    weight_decay: float,
    bias_lr_scale: float = 1.0,
    lr_scales: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Split trainable parameters into "weights" (ndim > 1) and "biases" (biases and norm params).

    "biases" get weight decay 0 and learning rate ``base_lr × bias_lr_scale``; with
    :class:`LARS`' default filters they are also excluded from the trust-ratio adaptation. The
    official recipe uses ``bias_lr_scale = 0.0048 / 0.2 = 0.024``. Note that the official code sums
    gradients with a raw ``all_reduce`` that autograd never sees, which leaves them at 1/W of the
    true gradient for W processes. For weights LARS' trust ratio cancels that scale (weight decay
    then weighs W times more against the gradient), but biases/BN, which are not adapted,
    effectively trained at 0.0048/W. Our gradients are exact, so a recipe reproducing
    a W-GPU official run sets ``bias_lr_scale`` explicitly (0.024/W) rather than inheriting it.

    Each group carries "name" and "lr_scale"; :func:`set_learning_rate` sets
    ``lr = base_lr × lr_scale``. Frozen parameters are left out, and so are empty groups.
    ``lr_scales`` multiplies the rate of named top-level submodules (fine-tuning: ``{"head":
    head_lr / backbone_lr}``); they get groups of their own, named "<module> weights" / "<module>
    biases".
    """
    if lr_scales:
        children = dict(model.named_children())
        unknown = sorted(set(lr_scales) - set(children))
        if unknown:
            raise ValueError(f"lr_scales names {unknown}, not submodules of the model")
        rest = nn.ModuleList(m for name, m in children.items() if name not in lr_scales)
        groups = parameter_groups(rest, weight_decay=weight_decay, bias_lr_scale=bias_lr_scale)
        for name, scale in lr_scales.items():
            for group in parameter_groups(
                children[name], weight_decay=weight_decay, bias_lr_scale=bias_lr_scale
            ):
                groups.append(
                    {
                        **group,
                        "name": f"{name} {group['name']}",
                        "lr_scale": group["lr_scale"] * scale,
                    }
                )
        return groups
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not bias_lr_scale >= 0:
        raise ValueError(
            f"bias_lr_scale must be >= 0 (official recipe: 0.024), got {bias_lr_scale!r}"
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = [p for p in trainable if not _is_bias_or_norm(p)]
    biases = [p for p in trainable if _is_bias_or_norm(p)]
    groups = [
        {"name": "weights", "params": weights, "weight_decay": weight_decay, "lr_scale": 1.0},
        {"name": "biases", "params": biases, "weight_decay": 0.0, "lr_scale": bias_lr_scale},
    ]
    return [group for group in groups if group["params"]]


_FUSED_DEVICES = ("cuda", "cpu")  # where torch.optim.SGD / AdamW(fused=True) run


def build_optimizer(
    name: OptimizerName,
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    bias_lr_scale: float = 1.0,
    eta: float = 0.001,
    betas: tuple[float, float] = (0.9, 0.999),
    lr_scales: Mapping[str, float] | None = None,
) -> torch.optim.Optimizer:
    """LARS, SGD (with momentum) or AdamW over :func:`parameter_groups`, lr scaled per group.

    ``lr`` is the base (weights) rate at this moment; the training loop overwrites it each step
    with :func:`set_learning_rate`.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    groups = parameter_groups(
        model, weight_decay=weight_decay, bias_lr_scale=bias_lr_scale, lr_scales=lr_scales
    )
    if not groups:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    optimizer: torch.optim.Optimizer
    # LARS is this module's own (foreach, no host sync); SGD and AdamW take PyTorch's fused
    # kernels (one kernel for the whole update) where every parameter sits on a device that has them
    fused = all(p.device.type in _FUSED_DEVICES for group in groups for p in group["params"])
    if name == "lars":
        optimizer = LARS(groups, lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta)
    elif name == "sgd":
        optimizer = torch.optim.SGD(
            groups, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused
        )
    else:
        optimizer = torch.optim.AdamW(
            groups, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused
        )
    set_learning_rate(optimizer, lr)
    return optimizer


def warmup_cosine(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    base_lr: float,
    final_lr_ratio: float = 0.001,
) -> float:
    """Learning rate at global ``step``: linear warm-up, then cosine decay (official Barlow Twins).

    For ``step < warmup_steps``: ``lr = base_lr · step / warmup_steps`` (0 at step 0, like the
    official code). Afterwards, with ``t = (step − warmup_steps) / (total_steps − warmup_steps)``::

        lr = base_lr · (ratio + (1 − ratio) · (1 + cos(π·t)) / 2)

    so ``lr = base_lr`` at the end of warm-up and ``base_lr · final_lr_ratio`` at ``total_steps``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}; "
            "shorten the warm-up for short runs"
        )
    if not 0 <= step <= total_steps:
        raise ValueError(f"step must be in [0, total_steps={total_steps}], got {step}")
    if not base_lr >= 0:
        raise ValueError(f"base_lr must be >= 0, got {base_lr!r}")
    if not 0 <= final_lr_ratio <= 1:
        raise ValueError(f"final_lr_ratio must be in [0, 1], got {final_lr_ratio!r}")
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    cosine_steps = total_steps - warmup_steps
    progress = (step - warmup_steps) / cosine_steps if cosine_steps > 0 else 1.0
    decay = 0.5 * (1 + math.cos(math.pi * progress))
    return base_lr * (final_lr_ratio + (1 - final_lr_ratio) * decay)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's ``lr = lr × group["lr_scale"]`` (scale 1 for groups without one)."""
    if not lr >= 0:
        raise ValueError(f"learning rate must be >= 0, got {lr!r}")
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def scaled_lr(lr_per_256: float, global_batch_size: int) -> float:
    """Linear scaling rule (Goyal et al., 2017): ``lr = lr_per_256 × global_batch_size / 256``."""
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be > 0, got {global_batch_size}")
    if not lr_per_256 >= 0:
        raise ValueError(f"lr_per_256 must be >= 0, got {lr_per_256!r}")
    return lr_per_256 * global_batch_size / 256
