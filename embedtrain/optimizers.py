"""Optimizer by name. Only the new embedding vectors are ever given to an optimizer.

LR-free optimizers (D-Adaptation, Prodigy) estimate a step size d; the LR they really use is d x lr,
which `effective_lr` reports so it can be logged and plotted like a learning rate.
Schedule-Free AdamW keeps two sequences and must be switched to eval mode around validation,
previews and saving (`set_mode`).
"""

from __future__ import annotations

import importlib

from embedtrain.config import OPTIMIZERS, ConfigError

PACKAGES = {"dadapt_adam": "dadaptation", "prodigy": "prodigyopt", "schedulefree_adamw": "schedulefree"}


def _need(package: str, name: str):
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"optimizer {name!r} needs the package {package!r}: pip install {package}") from None


def make_optimizer(name: str, params, cfg):
    """Build the optimizer `name` over `params` with the config's lr, betas, eps and weight decay."""
    import torch

    betas = (cfg.adam_beta1, cfg.adam_beta2)
    # The trainer sets every update's LR from the schedule before the step, so this one is never used; a
    # piecewise schedule has lr 0 (its rates are in lr_piecewise), which D-Adaptation and Prodigy refuse.
    lr = cfg.lr if cfg.lr > 0 else 1.0
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.adam_beta1, weight_decay=cfg.weight_decay)
    if name == "dadapt_adam":
        mod = _need("dadaptation", name)
        return mod.DAdaptAdam(params, lr=lr, betas=betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                              decouple=True)
    if name == "prodigy":
        mod = _need("prodigyopt", name)
        return mod.Prodigy(params, lr=lr, betas=betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if name == "schedulefree_adamw":
        mod = _need("schedulefree", name)
        return mod.AdamWScheduleFree(params, lr=lr, betas=betas, eps=cfg.adam_eps,
                                     weight_decay=cfg.weight_decay, warmup_steps=cfg.lr_warmup)
    raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def effective_lr(optimizer) -> float:
    """The step size the optimizer really applies: d x lr for D-Adaptation/Prodigy, else lr."""
    group = optimizer.param_groups[0]
    d = group.get("d")
    return float(group["lr"]) * (float(d) if d is not None else 1.0)


def set_mode(optimizer, training: bool) -> None:
    """Schedule-Free optimizers hold the evaluation point elsewhere; switch when evaluating or saving."""
    fn = getattr(optimizer, "train" if training else "eval", None)
    if callable(fn) and type(optimizer).__module__.startswith("schedulefree"):
        fn()
