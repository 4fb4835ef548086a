"""The one training loop every trained method uses (student-teacher, EfficientAD, DRAEM, ...).

A method owns its networks and its loss; it hands both to :func:`train` and never writes a loop::

    class MyMethod:
        def fit_batches(self, epochs, progress=None):
            with seeded(self.seed):                          # seeded network initialisation
                self.net = Autoencoder(**self.net_config).to(self.training.device)
            def training_step(batch):                        # batch -> scalar loss tensor
                x, _ = batch
                return F.mse_loss(self.net(x), x)
            summary = train(self.net.parameters(), training_step, epochs, self.training,
                            modules=[self.net], progress=progress)
            self.net.eval()

``self.training`` is a :class:`TrainingConfig` (``TrainingConfig.from_dict(json)``). Per-group
learning rates: pass param-group dicts, ``[{"params": a.parameters(), "lr": 1e-4, "name": "a"},
{"params": b.parameters(), "name": "b"}]`` (one optimizer over all groups; the schedule scales
every group's own lr). Several loss terms: add them in ``training_step``.

Training in stages (DSR: codebook, then decoders, then the anomaly module): call ``train`` once
per stage with that stage's parameters and config, e.g. ``train(stage2_params, step2, epochs,
config.replace(max_steps=5000, learning_rate=1e-4), modules=[decoder], stage="training 2/3")``;
:func:`set_trainable` freezes the parts a stage must not change.

Determinism: ``train`` seeds torch's CPU (and the training CUDA device's) random generator with
``config.seed`` for its duration (dropout, noise drawn with ``torch.rand*`` inside the step) and
restores the caller's generator state afterwards. For bit-identical weights from the same seed
on the same machine the caller must also (1) initialise its networks deterministically (e.g.
under :func:`seeded`), (2) make ``batches(epoch)`` depend only on (seed, epoch) - order,
augmentation and synthetic anomalies seeded by them, and (3) keep the thread count fixed
(``torch.set_num_threads``); on CUDA, kernels must also be deterministic
(``torch.use_deterministic_algorithms``), which the loop does not switch on by itself.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import numpy as np
import torch

from defectlens.errors import ConfigError, NonFiniteLossError, TrainingError

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw", "sgd", "sgd_nesterov")
"""Valid `TrainingConfig.optimizer` values: torch Adam, AdamW, SGD with momentum, SGD with Nesterov momentum."""

LR_SCHEDULES = ("constant", "cosine", "step")
"""Valid `TrainingConfig.lr_schedule` values (each may start with a linear warm-up)."""

LOSS_WINDOW = 20
"""The running loss reported (progress, summary, history) is the mean of the last LOSS_WINDOW losses."""

HISTORY_POINTS = 200
"""The loss history holds at most about this many points (every ceil(max_steps / 200)-th step)."""

PROGRESS_NOTE = " | "
"""Progress reports carry the running loss as a note, ``"training | loss 0.0123"``: the convention
of defectlens.progress (NOTE_SEPARATOR), whose bars are keyed by the part before it."""

ProgressCallback = Callable[[str, int, int], None]
LossCallback = Callable[[int, float], None]
Parameters = Union[Iterable[torch.nn.Parameter], Sequence[Mapping[str, Any]]]


# ---------------------------------------------------------------------------------------- config
def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _check_float(name: str, value: Any, low: float, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    number = float(value)
    too_low = number <= low if low_open else number < low
    too_high = high is not None and (number >= high if high_open else number > high)
    if not math.isfinite(number) or too_low or too_high:
        interval = ("(" if low_open else "[") + f"{low}, " + (f"{high}" if high is not None else "inf") + (
            ")" if high_open or high is None else "]")
        raise ConfigError(f"{name} must be a finite number in {interval}, got {value!r}")
    return number


def _check_device(value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {value!r}")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {value!r}")
    return value


@dataclass(frozen=True)
class TrainingConfig:
    """How a trained method is trained; every field is validated on construction (ConfigError).

    Attributes:
        max_steps: optimizer steps to run (the step budget; schedules are laid out over it).
        max_minutes: optional wall-clock budget; training stops after the step during which it
            ran out, or at max_steps, whichever comes first.
        optimizer: one of OPTIMIZERS - "adam", "adamw", "sgd" (heavy-ball momentum) or
            "sgd_nesterov" (Nesterov momentum; needs momentum > 0).
        learning_rate: base learning rate (param-group dicts may set their own "lr").
        weight_decay: L2 penalty (Adam, SGD) or decoupled weight decay (AdamW).
        momentum: SGD momentum in [0, 1).
        betas: Adam/AdamW (beta1, beta2), each in [0, 1).
        lr_schedule: one of LR_SCHEDULES: "constant"; "cosine" - from the base lr down to 0 at
            max_steps (after the warm-up); "step" - multiplied by lr_gamma at each fraction of
            max_steps in lr_step_fractions (EfficientAD: x0.1 at 95 %).
        lr_warmup_steps: linear warm-up over the first steps (step k of n uses lr * k / n),
            in front of any schedule; must be < max_steps.
        lr_step_fractions: strictly increasing fractions in (0, 1) of max_steps ("step" schedule).
        lr_gamma: factor in (0, 1] applied at each of lr_step_fractions.
        grad_clip_norm: clip the total gradient norm (all groups together) to this, or None.
        validation_interval: steps between validations; 0 = validate only at the end.
        early_stopping_patience: stop after this many validations in a row without improvement
            (the best weights are restored), or None; needs validation_interval > 0.
        seed: seeds torch's generator for the duration of training.
        device: "cpu", "cuda" or "cuda:N" - where the caller put the parameters and batches.
    """

    max_steps: int = 1000
    max_minutes: float | None = None
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    lr_step_fractions: tuple[float, ...] = (0.95,)
    lr_gamma: float = 0.1
    grad_clip_norm: float | None = None
    validation_interval: int = 0
    early_stopping_patience: int | None = None
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        setattr_ = functools.partial(object.__setattr__, self)  # the dataclass is frozen
        setattr_("max_steps", _check_int("max_steps", self.max_steps, 1))
        if self.max_minutes is not None:
            setattr_("max_minutes", _check_float("max_minutes", self.max_minutes, 0.0, low_open=True))
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        setattr_("learning_rate", _check_float("learning_rate", self.learning_rate, 0.0, low_open=True))
        setattr_("weight_decay", _check_float("weight_decay", self.weight_decay, 0.0))
        setattr_("momentum", _check_float("momentum", self.momentum, 0.0, 1.0, high_open=True))
        if self.optimizer == "sgd_nesterov" and self.momentum == 0.0:
            raise ConfigError("momentum must be > 0 for optimizer 'sgd_nesterov' (Nesterov needs momentum), got 0.0")
        if isinstance(self.betas, (str, bytes)) or not isinstance(self.betas, Sequence) or len(self.betas) != 2:
            raise ConfigError(f"betas must be a pair (beta1, beta2), got {self.betas!r}")
        setattr_("betas", tuple(_check_float(f"betas[{i}]", b, 0.0, 1.0, high_open=True) for i, b in enumerate(self.betas)))
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}; got {self.lr_schedule!r}")
        setattr_("lr_warmup_steps", _check_int("lr_warmup_steps", self.lr_warmup_steps, 0))
        if self.lr_warmup_steps >= self.max_steps:
            raise ConfigError(f"lr_warmup_steps must be < max_steps ({self.max_steps}), got {self.lr_warmup_steps}")
        fractions = self.lr_step_fractions
        if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Sequence):
            raise ConfigError(f"lr_step_fractions must be a list of fractions in (0, 1), got {fractions!r}")
        fractions = tuple(
            _check_float(f"lr_step_fractions[{i}]", f, 0.0, 1.0, low_open=True, high_open=True)
            for i, f in enumerate(fractions))
        if any(b <= a for a, b in zip(fractions, fractions[1:])):
            raise ConfigError(f"lr_step_fractions must be strictly increasing, got {self.lr_step_fractions!r}")
        setattr_("lr_step_fractions", fractions)
        setattr_("lr_gamma", _check_float("lr_gamma", self.lr_gamma, 0.0, 1.0, low_open=True))
        if self.grad_clip_norm is not None:
            setattr_("grad_clip_norm", _check_float("grad_clip_norm", self.grad_clip_norm, 0.0, low_open=True))
        setattr_("validation_interval", _check_int("validation_interval", self.validation_interval, 0))
        if self.early_stopping_patience is not None:
            setattr_("early_stopping_patience",
                     _check_int("early_stopping_patience", self.early_stopping_patience, 1))
            if self.validation_interval == 0:
                raise ConfigError(
                    f"early_stopping_patience={self.early_stopping_patience} needs validation_interval > 0 "
                    "(it counts periodic validations), got validation_interval=0")
        setattr_("seed", _check_int("seed", self.seed, 0))
        if self.seed >= 2**63:
            raise ConfigError(f"seed must be < 2**63, got {self.seed}")
        setattr_("device", _check_device(self.device))

    @classmethod
    def from_dict(cls, config: Mapping[str, Any] | None) -> "TrainingConfig":
        """Build from a JSON-style dict (lists for tuples); unknown keys raise ConfigError."""
        if config is None:
            return cls()
        if not isinstance(config, Mapping):
            raise ConfigError(f"training config must be an object (dict), got {config!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(config) - set(names))
        if unknown:
            raise ConfigError(f"unknown training config key(s) {', '.join(map(repr, unknown))}; "
                              f"valid keys: {', '.join(names)}")
        return cls(**dict(config))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists); ``from_dict(to_dict())`` gives an equal config."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> "TrainingConfig":
        """A validated copy with some fields changed (e.g. one config per training stage)."""
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------------------ building blocks
def resolve_device(device: str) -> torch.device:
    """The torch device for `device`; ConfigError when CUDA is asked for but not usable."""
    resolved = torch.device(_check_device(device))
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} was requested but CUDA is not available on this machine "
                              "(no GPU, or torch was built without CUDA); use device='cpu'")
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if resolved.index is None else resolved.index
        if index >= count:
            raise ConfigError(f"device {device!r} was requested but only {count} CUDA device(s) exist")
        resolved = torch.device("cuda", index)
    return resolved


@contextlib.contextmanager
def seeded(seed: int, device: str | torch.device = "cpu") -> Iterator[None]:
    """Run the block with torch's CPU generator (and that of a CUDA `device`) seeded by `seed`;
    the caller's generator states are restored afterwards.

    >>> with seeded(0):
    ...     net = torch.nn.Linear(4, 2)     # the same initial weights every time
    """
    seed = _check_int("seed", seed, 0)
    device = torch.device(device)
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else [], device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def set_trainable(modules: torch.nn.Module | Iterable[torch.nn.Module], trainable: bool) -> None:
    """Set ``requires_grad`` of every parameter of `modules` (freeze / unfreeze a stage's parts)."""
    for module in [modules] if isinstance(modules, torch.nn.Module) else modules:
        for parameter in module.parameters():
            parameter.requires_grad_(trainable)


def _param_groups(parameters: Parameters) -> list[dict[str, Any]]:
    """Parameters or param-group dicts -> a list of group dicts with a materialised "params" list."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    items = list(parameters)
    if not items:
        raise ConfigError("train() got no parameters to train")
    if all(isinstance(item, Mapping) for item in items):
        groups = []
        for index, group in enumerate(items):
            if "params" not in group:
                raise ConfigError(f"parameter group {index} has no 'params' key: {sorted(group)}")
            params = group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            groups.append({**group, "params": params})
    elif all(isinstance(item, torch.Tensor) for item in items):
        groups = [{"params": items}]
    else:
        raise ConfigError("parameters must be all tensors or all param-group dicts, got a mix: "
                          f"{sorted({type(item).__name__ for item in items})}")
    for index, group in enumerate(groups):
        for parameter in group["params"]:
            if not isinstance(parameter, torch.Tensor):
                raise ConfigError(f"{_group_name(group, index)} holds a {type(parameter).__name__}, not a tensor")
    if not any(p.requires_grad for group in groups for p in group["params"]):
        raise ConfigError("none of the parameters to train requires grad (all frozen?)")
    return groups


def _group_name(group: Mapping[str, Any], index: int) -> str:
    name = group.get("name")
    return f"parameter group {index} ({name!r})" if name is not None else f"parameter group {index}"


def build_optimizer(parameters: Parameters, config: TrainingConfig) -> torch.optim.Optimizer:
    """The torch optimizer `config.optimizer` over `parameters` (tensors or param-group dicts;
    a group's own "lr", "weight_decay", ... override the config; extra keys such as "name" are kept)."""
    groups = _param_groups(parameters)
    try:
        if config.optimizer == "adam":
            return torch.optim.Adam(groups, lr=config.learning_rate, betas=config.betas,
                                    weight_decay=config.weight_decay)
        if config.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.betas,
                                     weight_decay=config.weight_decay)
        return torch.optim.SGD(groups, lr=config.learning_rate, momentum=config.momentum,
                               weight_decay=config.weight_decay, nesterov=config.optimizer == "sgd_nesterov")
    except (ValueError, TypeError, RuntimeError) as error:
        raise ConfigError(f"cannot build optimizer {config.optimizer!r}: {error}") from None


def learning_rate_factor(config: TrainingConfig, steps_done: int) -> float:
    """The multiplier of the base lr for the optimizer step that follows `steps_done` steps.

    Warm-up: step k (1-based) of the first lr_warmup_steps uses k / lr_warmup_steps. Then
    "cosine": 0.5 * (1 + cos(pi * t)), t going from 0 after the warm-up to 1 at max_steps;
    "step": lr_gamma ** (number of fractions f with steps_done >= round(f * max_steps)).
    """
    warmup = config.lr_warmup_steps
    factor = (steps_done + 1) / warmup if steps_done < warmup else 1.0
    if config.lr_schedule == "cosine":
        progress = min(max(steps_done - warmup, 0) / (config.max_steps - warmup), 1.0)
        factor *= 0.5 * (1.0 + math.cos(math.pi * progress))
    elif config.lr_schedule == "step":
        milestones = sum(steps_done >= round(f * config.max_steps) for f in config.lr_step_fractions)
        factor *= config.lr_gamma ** milestones
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainingConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `optimizer` following :func:`learning_rate_factor` (stepped once per optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda steps_done: learning_rate_factor(config, steps_done))


def split_held_out(num_images: int, fraction: float, seed: int, minimum: int = 1) -> tuple[list[int], list[int]]:
    """Split image indices 0..num_images-1 into (fit, held_out), both sorted; deterministic in `seed`.

    held_out has round(fraction * num_images) images, at least `minimum`, and always leaves at
    least one image to fit on: with one image the answer is ([0], []).
    """
    num_images = _check_int("num_images", num_images, 1)
    fraction = _check_float("fraction", fraction, 0.0, 1.0, low_open=True, high_open=True)
    seed = _check_int("seed", seed, 0)
    minimum = _check_int("minimum", minimum, 0)
    count = min(max(int(math.floor(fraction * num_images + 0.5)), minimum), num_images - 1)
    order = np.random.default_rng(seed).permutation(num_images)
    held_out = sorted(int(i) for i in order[:count])
    chosen = set(held_out)
    return [i for i in range(num_images) if i not in chosen], held_out


# ------------------------------------------------------------------------------------- summary
@dataclass
class TrainingSummary:
    """What happened during :func:`train`.

    Attributes:
        steps: optimizer steps run.
        epochs: epochs started (``batches(e)`` calls).
        seconds: wall-clock duration.
        stop_reason: "max_steps", "max_minutes" or "early_stopping".
        final_loss: running loss (mean of the last LOSS_WINDOW losses) at the end.
        best_loss: lowest running loss seen.
        last_loss: the loss of the last step.
        loss_history: {"step": [...], "loss": [...], "learning_rate": [...]} - running loss and
            the lr used, every ceil(max_steps / HISTORY_POINTS)-th step and at the last step.
        validation_history: {"step": [...], "value": [...]} - every validation.
        best_validation: lowest validation value, or None without validation.
        best_validation_step: the step it was reached at, or None.
        restored_best: whether the modules were set back to the weights of best_validation_step.
        learning_rates: each param group's lr after the last step.
        config: the TrainingConfig as a dict.
    """

    steps: int
    epochs: int
    seconds: float
    stop_reason: str
    final_loss: float
    best_loss: float
    last_loss: float
    loss_history: dict[str, list] = field(default_factory=lambda: {"step": [], "loss": [], "learning_rate": []})
    validation_history: dict[str, list] = field(default_factory=lambda: {"step": [], "value": []})
    best_validation: float | None = None
    best_validation_step: int | None = None
    restored_best: bool = False
    learning_rates: list[float] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def learning_rate(self) -> float:
        """The first param group's lr after the last step."""
        return self.learning_rates[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every field."""
        return copy.deepcopy(dataclasses.asdict(self))


# ----------------------------------------------------------------------------------------- loop
def _snapshot(modules: Sequence[torch.nn.Module]) -> list[dict[str, Any]]:
    """Deep copies, on the CPU, of the modules' state_dicts."""
    return [{key: value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else copy.deepcopy(value)
             for key, value in module.state_dict().items()} for module in modules]


def _modes(modules: Sequence[torch.nn.Module]) -> list[list[bool]]:
    return [[sub.training for sub in module.modules()] for module in modules]


def _set_modes(modules: Sequence[torch.nn.Module], modes: list[list[bool]]) -> None:
    for module, flags in zip(modules, modes):
        for sub, flag in zip(module.modules(), flags):
            sub.training = flag


def _check_gradients(groups: Sequence[Mapping[str, Any]], step: int) -> None:
    """NonFiniteLossError naming the step, group and parameter when a gradient is NaN/inf;
    TrainingError when no parameter received a gradient."""
    any_gradient = False
    for index, group in enumerate(groups):
        grads = [p.grad for p in group["params"] if p.grad is not None]
        if not grads:
            continue
        any_gradient = True
        if bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            continue
        for number, parameter in enumerate(group["params"]):
            grad = parameter.grad
            if grad is not None and not bool(torch.isfinite(grad).all()):
                bad = int((~torch.isfinite(grad)).sum())
                raise NonFiniteLossError(
                    f"step {step}: the gradient of parameter {number} (shape {tuple(parameter.shape)}) in "
                    f"{_group_name(group, index)} is not finite ({bad} of {grad.numel()} values NaN/inf); "
                    "lower the learning rate, set grad_clip_norm, or check the loss for log(0) / division by 0",
                    step=step)
    if not any_gradient:
        raise TrainingError(f"step {step}: the loss did not reach any parameter being trained (all gradients None)")


def train(
    parameters: Parameters,
    training_step: Callable[[Any], torch.Tensor],
    batches: Callable[[int], Iterable[Any]],
    config: TrainingConfig,
    validation: Callable[[], float] | None = None,
    modules: Sequence[torch.nn.Module] = (),
    progress: ProgressCallback | None = None,
    stage: str = "training",
    loss_callback: LossCallback | None = None,
) -> TrainingSummary:
    """Train `parameters` by minimising ``training_step(batch)`` for config.max_steps steps.

    Args:
        parameters: tensors, or param-group dicts (``{"params": ..., "lr": ..., "name": ...}``).
        training_step: batch -> scalar loss tensor (the method builds it, forward pass included).
        batches: ``batches(epoch)`` -> the batches of that epoch; called for epoch 0, 1, ... until
            max_steps steps are done. The caller seeds order/augmentation by (seed, epoch).
        config: optimizer, schedule, budgets, validation, seed, device.
        validation: () -> float, lower is better; run under ``torch.no_grad()`` with `modules`
            in eval mode, every config.validation_interval steps and once at the end.
        modules: the networks being trained: train() mode during steps, eval() during
            validation, their original modes restored at the end; their state_dicts are what the
            best-validation snapshot (CPU deep copies) saves and restores. Leave frozen parts
            (teacher, pretrained encoder) out - they would be switched to train() mode.
        progress: ``progress(f"{stage} | loss {running_loss:.4g}", steps_done, max_steps)``,
            about 100 times over the run (the first call, at 0 steps, has no loss note).
        stage: the stage name given to `progress`, e.g. "training 2/3" for a second stage.
        loss_callback: ``loss_callback(step, running_loss)`` whenever progress is reported.

    Returns:
        A TrainingSummary. When validation was given and the final validation is worse than the
        best one (or early stopping stopped training), the modules hold the best weights.

    Raises:
        NonFiniteLossError: the loss (checked before backward) or a gradient is NaN/inf; the
            message names the step (1-based) and the value or parameter group.
        TrainingError: an epoch has no batches, the loss is not a scalar tensor with a gradient,
            no gradient reaches the parameters, or validation returns a non-finite value.
        ConfigError: CUDA requested but unavailable, parameters on another device, bad parameters,
            early stopping without modules to restore.
    """
    if not isinstance(config, TrainingConfig):
        raise ConfigError(f"config must be a TrainingConfig, got {type(config).__name__}")
    device = resolve_device(config.device)
    modules = list(modules)
    if config.early_stopping_patience is not None and validation is None:
        raise ConfigError("early_stopping_patience is set but no validation function was given")
    if config.early_stopping_patience is not None and not modules:
        raise ConfigError("early stopping restores the best weights of `modules`; pass the modules being trained")
    optimizer = build_optimizer(parameters, config)
    groups = optimizer.param_groups
    for index, group in enumerate(groups):
        for parameter in group["params"]:
            if parameter.device != device:
                raise ConfigError(f"a parameter of {_group_name(group, index)} is on {parameter.device} but "
                                  f"config.device is {config.device!r}; move the networks there before train()")
    scheduler = build_scheduler(optimizer, config)
    trainable = [p for group in groups for p in group["params"] if p.requires_grad]

    start = time.perf_counter()
    budget_seconds = config.max_minutes * 60.0 if config.max_minutes is not None else None
    history_every = max(1, math.ceil(config.max_steps / HISTORY_POINTS))
    progress_every = max(1, config.max_steps // 100)
    loss_history: dict[str, list] = {"step": [], "loss": [], "learning_rate": []}
    validation_history: dict[str, list] = {"step": [], "value": []}
    window: deque[float] = deque(maxlen=LOSS_WINDOW)
    running = last = best_loss = math.inf
    best_value, best_step, best_state = math.inf, None, None
    since_best = 0
    step, epoch, stop_reason = 0, 0, None
    original_modes = _modes(modules)

    def validate() -> None:
        nonlocal best_value, best_step, best_state, since_best
        modes = _modes(modules)
        for module in modules:
            module.eval()
        try:
            with torch.no_grad():
                value = validation()
        finally:
            _set_modes(modules, modes)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise TrainingError(f"validation at step {step} returned {value!r}, not a number") from None
        if not math.isfinite(value):
            raise TrainingError(f"validation at step {step} returned {value}, not a finite number")
        validation_history["step"].append(step)
        validation_history["value"].append(value)
        if value < best_value:
            best_value, best_step, since_best = value, step, 0
            if modules:
                best_state = _snapshot(modules)
        else:
            since_best += 1
        logger.debug("%s: validation %.6g at step %d (best %.6g at step %d)", stage, value, step, best_value, best_step)

    if progress:
        progress(stage, 0, config.max_steps)
    try:
        with seeded(config.seed, device):
            for module in modules:
                module.train()
            while stop_reason is None:
                epoch_batches = batches(epoch)
                try:
                    iterator = iter(epoch_batches)
                except TypeError:
                    raise TrainingError(f"batches({epoch}) returned {type(epoch_batches).__name__}, "
                                        "not an iterable of batches") from None
                epoch += 1
                got_batch = False
                try:
                    for batch in iterator:
                        got_batch = True
                        optimizer.zero_grad(set_to_none=True)
                        loss = training_step(batch)
                        number = step + 1
                        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                            raise TrainingError(f"step {number}: training_step must return a scalar loss tensor, "
                                                f"got {shape}")
                        last = float(loss.detach().item())
                        if not math.isfinite(last):
                            raise NonFiniteLossError(
                                f"step {number}: the loss is {last} (not finite); lower the learning rate, set "
                                "grad_clip_norm, or check the loss for log(0) / division by 0",
                                step=number, value=last)
                        if not loss.requires_grad:
                            raise TrainingError(f"step {number}: the loss does not require grad (computed under "
                                                "no_grad, or from frozen parameters only)")
                        loss.reshape(()).backward()
                        _check_gradients(groups, number)
                        if config.grad_clip_norm is not None:
                            torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip_norm)
                        used_lr = groups[0]["lr"]
                        optimizer.step()
                        scheduler.step()
                        step = number

                        window.append(last)
                        running = sum(window) / len(window)
                        best_loss = min(best_loss, running)
                        if step % history_every == 0 or step == config.max_steps:
                            loss_history["step"].append(step)
                            loss_history["loss"].append(running)
                            loss_history["learning_rate"].append(used_lr)
                        if step == config.max_steps:
                            stop_reason = "max_steps"
                        elif budget_seconds is not None and time.perf_counter() - start >= budget_seconds:
                            stop_reason = "max_minutes"
                        if (validation is not None and config.validation_interval
                                and step % config.validation_interval == 0):
                            validate()
                            patience = config.early_stopping_patience
                            if stop_reason is None and patience is not None and since_best >= patience:
                                stop_reason = "early_stopping"
                        if step % progress_every == 0 or stop_reason is not None:
                            if progress:
                                progress(f"{stage}{PROGRESS_NOTE}loss {running:.4g}", step, config.max_steps)
                            if loss_callback:
                                loss_callback(step, running)
                        if stop_reason is not None:
                            break
                finally:
                    close = getattr(iterator, "close", None)
                    if callable(close):
                        close()
                if not got_batch:
                    raise TrainingError(f"batches({epoch - 1}) yielded no batches (no training data?); "
                                        f"{step} of {config.max_steps} steps were done")
            if loss_history["step"][-1:] != [step]:
                loss_history["step"].append(step)
                loss_history["loss"].append(running)
                loss_history["learning_rate"].append(used_lr)
            if validation is not None and validation_history["step"][-1:] != [step]:
                validate()
    finally:
        _set_modes(modules, original_modes)

    restored = False
    if best_state is not None and validation_history["value"][-1] > best_value:
        for module, state in zip(modules, best_state):
            module.load_state_dict(state)
        restored = True
    seconds = time.perf_counter() - start
    summary = TrainingSummary(
        steps=step, epochs=epoch, seconds=seconds, stop_reason=stop_reason, final_loss=running,
        best_loss=best_loss, last_loss=last, loss_history=loss_history, validation_history=validation_history,
        best_validation=best_value if best_step is not None else None, best_validation_step=best_step,
        restored_best=restored, learning_rates=[float(g["lr"]) for g in groups], config=config.to_dict())
    logger.info("%s: %d steps in %.1f s (%d epochs, stopped by %s), loss %.6g%s", stage, step, seconds, epoch,
                stop_reason, running, f", best validation {best_value:.6g} at step {best_step}"
                + (" (restored)" if restored else "") if best_step is not None else "")
    return summary
