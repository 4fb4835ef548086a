"""The shared training loop: determinism, budgets, checks, schedules, early stopping, splits."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from defectlens.errors import ConfigError, DefectlensError, NonFiniteLossError, TrainingError
from defectlens.training import (
    LR_SCHEDULES,
    OPTIMIZERS,
    TrainingConfig,
    build_optimizer,
    build_scheduler,
    learning_rate_factor,
    seeded,
    set_trainable,
    split_held_out,
    train,
)


def regression_batches(seed: int = 0, batches_per_epoch: int = 4, batch_size: int = 16):
    """batches(epoch) for y = x @ w_true + 0.5, seeded by (seed, epoch)."""
    w_true = torch.tensor([[2.0], [-1.0], [0.5]])

    def batches(epoch: int):
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        for _ in range(batches_per_epoch):
            x = torch.randn(batch_size, 3, generator=generator)
            yield x, x @ w_true + 0.5

    return batches


def tiny_net(seed: int = 0) -> torch.nn.Module:
    with seeded(seed):
        return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))


def mse_step(net: torch.nn.Module):
    def training_step(batch):
        x, y = batch
        return F.mse_loss(net(x), y)
    return training_step


def run(config: TrainingConfig, net_seed: int = 0, **kwargs):
    net = tiny_net(net_seed)
    summary = train(net.parameters(), mse_step(net), regression_batches(), config, modules=[net], **kwargs)
    return net, summary


# ------------------------------------------------------------------------------ determinism
def test_same_seed_gives_bit_identical_weights_and_different_seed_differs():
    config = TrainingConfig(max_steps=30, learning_rate=1e-2, seed=3)
    first, summary_a = run(config)
    second, summary_b = run(config)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    assert summary_a.loss_history == summary_b.loss_history
    # Same initial weights and batches; only the loop's seed (dropout masks) differs.
    third, _ = run(config.replace(seed=4))
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), third.state_dict().values()))


def test_training_restores_the_callers_random_state():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run(TrainingConfig(max_steps=3))
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------------------ learning
def test_learning_happens_loss_drops_tenfold():
    net = torch.nn.Linear(3, 1)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.zero_()
    losses = []

    def training_step(batch):
        loss = mse_step(net)(batch)
        losses.append(loss.item())
        return loss

    summary = train(net.parameters(), training_step, regression_batches(), TrainingConfig(max_steps=300, learning_rate=0.05))
    assert losses[0] / max(summary.final_loss, 1e-12) >= 10
    assert summary.final_loss < 0.01
    assert summary.best_loss <= summary.final_loss
    json.dumps(summary.to_dict())


def test_max_steps_is_honoured_exactly_across_epochs():
    optimizer_steps = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: optimizer_steps.append(1))
    try:
        calls = []
        net = tiny_net()

        def training_step(batch):
            calls.append(1)
            return mse_step(net)(batch)

        reported = []
        summary = train(net.parameters(), training_step, regression_batches(batches_per_epoch=3),
                        TrainingConfig(max_steps=7), progress=lambda stage, done, total: reported.append((stage, done, total)))
    finally:
        handle.remove()
    assert len(optimizer_steps) == 7 and len(calls) == 7
    assert summary.steps == 7 and summary.epochs == 3 and summary.stop_reason == "max_steps"
    assert reported[0] == ("training", 0, 7) and reported[-1][1:] == (7, 7)
    # the running loss rides along as a note after " | " (defectlens.progress keys bars by the part before it)
    assert reported[-1][0] == f"training | loss {summary.final_loss:.4g}"
    assert {stage.partition(" | ")[0] for stage, _, _ in reported} == {"training"}


def test_loss_history_is_bounded_and_loss_callback_reports_running_loss():
    seen = []
    _, summary = run(TrainingConfig(max_steps=1000, learning_rate=1e-2), loss_callback=lambda s, l: seen.append((s, l)))
    history = summary.loss_history
    assert len(history["step"]) == 200 and history["step"][-1] == 1000
    assert len(history["loss"]) == len(history["learning_rate"]) == 200
    assert seen[-1] == (1000, summary.final_loss)
    assert 90 <= len(seen) <= 101


# ------------------------------------------------------------------------------ non-finite checks
def test_nan_loss_raises_naming_the_step_before_backward():
    weight = torch.nn.Parameter(torch.ones(2))
    calls = []

    def training_step(batch):
        calls.append(1)
        loss = (weight ** 2).sum()
        return loss * float("nan") if len(calls) == 3 else loss

    with pytest.raises(NonFiniteLossError, match=r"step 3: the loss is nan") as info:
        train([weight], training_step, lambda epoch: range(10), TrainingConfig(max_steps=10))
    assert info.value.step == 3 and math.isnan(info.value.value)
    assert isinstance(info.value, TrainingError) and isinstance(info.value, DefectlensError)
    assert weight.grad is None  # zeroed before step 3, and backward was never called


def test_inf_loss_raises():
    weight = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(NonFiniteLossError, match=r"step 1: the loss is inf"):
        train([weight], lambda b: (weight * float("inf")).sum(), lambda epoch: [0], TrainingConfig(max_steps=2))


def test_inf_gradient_raises_naming_step_and_group():
    a = torch.nn.Parameter(torch.ones(2))
    b = torch.nn.Parameter(torch.ones(3))
    calls = []
    b.register_hook(lambda grad: torch.full_like(grad, float("inf")) if len(calls) == 2 else grad)

    def training_step(batch):
        calls.append(1)
        return (a ** 2).sum() + (b ** 2).sum()

    groups = [{"params": [a], "name": "encoder"}, {"params": [b], "name": "decoder", "lr": 1e-4}]
    with pytest.raises(NonFiniteLossError, match=r"step 2: the gradient .* parameter group 1 \('decoder'\)") as info:
        train(groups, training_step, lambda epoch: range(5), TrainingConfig(max_steps=5))
    assert info.value.step == 2 and info.value.value is None


def test_loss_without_gradient_and_non_scalar_loss_are_clear_errors():
    weight = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(TrainingError, match="scalar loss"):
        train([weight], lambda b: weight * 2, lambda e: [0], TrainingConfig(max_steps=1))
    with pytest.raises(TrainingError, match="does not require grad"):
        train([weight], lambda b: torch.tensor(1.0), lambda e: [0], TrainingConfig(max_steps=1))
    other = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(TrainingError, match="did not reach any parameter"):
        train([weight], lambda b: other.sum(), lambda e: [0], TrainingConfig(max_steps=1))


def test_grad_clip_limits_the_update():
    weight = torch.nn.Parameter(torch.zeros(4))
    config = TrainingConfig(max_steps=1, optimizer="sgd", momentum=0.0, learning_rate=1.0, grad_clip_norm=0.5)
    train([weight], lambda b: (weight * 100.0).sum(), lambda e: [0], config)
    assert torch.linalg.vector_norm(weight).item() == pytest.approx(0.5, rel=1e-5)


# ------------------------------------------------------------------------------ data / budgets
def test_empty_batches_raise_instead_of_looping():
    weight = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(TrainingError, match=r"batches\(0\) yielded no batches"):
        train([weight], lambda b: weight.sum(), lambda epoch: [], TrainingConfig(max_steps=5))
    # data for epoch 0 only: the second epoch is reported, not an endless loop
    with pytest.raises(TrainingError, match=r"batches\(1\) yielded no batches.*2 of 5 steps"):
        train([weight], lambda b: weight.sum(), lambda epoch: [0, 1] if epoch == 0 else [], TrainingConfig(max_steps=5))


def test_max_minutes_stops_after_the_step_the_budget_ran_out():
    weight = torch.nn.Parameter(torch.ones(2))

    def training_step(batch):
        time.sleep(0.02)
        return (weight ** 2).sum()

    summary = train([weight], training_step, lambda e: range(10), TrainingConfig(max_steps=10**6, max_minutes=0.001))
    assert summary.stop_reason == "max_minutes"
    assert 1 <= summary.steps < 100
    assert summary.seconds >= 0.06
    assert summary.loss_history["step"][-1] == summary.steps


# ------------------------------------------------------------------------------ validation
def test_early_stopping_restores_the_best_weights():
    values = iter([5.0, 4.0, 3.0, 3.5, 3.6, 3.7, 3.8])
    net = tiny_net()
    seen = []

    def validation():
        assert not net.training and not torch.is_grad_enabled()
        seen.append({k: v.clone() for k, v in net.state_dict().items()})
        return next(values)

    modes = []

    def training_step(batch):
        modes.append(net.training)
        return mse_step(net)(batch)

    config = TrainingConfig(max_steps=100, learning_rate=1e-2, validation_interval=2, early_stopping_patience=2)
    net.eval()
    summary = train(net.parameters(), training_step, regression_batches(), config, validation=validation, modules=[net])
    assert summary.stop_reason == "early_stopping"
    assert summary.steps == 10 and summary.validation_history == {"step": [2, 4, 6, 8, 10], "value": [5.0, 4.0, 3.0, 3.5, 3.6]}
    assert summary.best_validation == 3.0 and summary.best_validation_step == 6 and summary.restored_best
    for key, value in net.state_dict().items():
        assert torch.equal(value, seen[2][key])
    assert not torch.equal(seen[4]["0.weight"], seen[2]["0.weight"])
    assert all(modes) and not net.training  # train() during steps, original (eval) mode restored


def test_final_validation_worse_than_best_restores_without_early_stopping():
    values = iter([1.0, 2.0, 3.0])
    net = tiny_net()
    snapshots = []

    def validation():
        snapshots.append({k: v.clone() for k, v in net.state_dict().items()})
        return next(values)

    summary = train(net.parameters(), mse_step(net), regression_batches(), TrainingConfig(max_steps=5, validation_interval=2),
                    validation=validation, modules=[net])
    assert summary.stop_reason == "max_steps"
    assert summary.validation_history["step"] == [2, 4, 5]  # periodic + once at the end
    assert summary.restored_best and summary.best_validation_step == 2
    assert all(torch.equal(v, snapshots[0][k]) for k, v in net.state_dict().items())


def test_no_restore_when_the_final_weights_are_best():
    values = iter([3.0, 2.0, 1.0])
    net, summary = run(TrainingConfig(max_steps=6, validation_interval=2), validation=lambda: next(values))
    assert not summary.restored_best and summary.best_validation_step == 6


def test_non_finite_validation_is_an_error():
    with pytest.raises(TrainingError, match="validation at step 2 returned nan"):
        run(TrainingConfig(max_steps=4, validation_interval=2), validation=lambda: float("nan"))


# ------------------------------------------------------------------------------ optimizers / schedules
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_builds_and_trains(name):
    config = TrainingConfig(max_steps=3, optimizer=name, weight_decay=1e-4)
    optimizer = build_optimizer(tiny_net().parameters(), config)
    expected = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
                "sgd_nesterov": torch.optim.SGD}[name]
    assert type(optimizer) is expected
    assert optimizer.param_groups[0]["weight_decay"] == 1e-4
    if expected is torch.optim.SGD:
        assert optimizer.param_groups[0]["nesterov"] is (name == "sgd_nesterov")
        assert optimizer.param_groups[0]["momentum"] == 0.9
    _, summary = run(config)
    assert summary.steps == 3


def test_param_groups_keep_their_own_lr_under_the_schedule():
    a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    config = TrainingConfig(max_steps=10, learning_rate=1e-2, lr_schedule="step", lr_step_fractions=(0.5,), lr_gamma=0.1)
    summary = train([{"params": [a]}, {"params": [b], "lr": 1e-3}], lambda x: (a * b).sum(), lambda e: range(4), config)
    assert summary.learning_rates == pytest.approx([1e-3, 1e-4])
    assert summary.learning_rate == pytest.approx(1e-3)


def lrs(config: TrainingConfig) -> list[float]:
    """The lr used at each of the config.max_steps steps, read from a real optimizer + scheduler."""
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], config)
    scheduler = build_scheduler(optimizer, config)
    out = []
    for _ in range(config.max_steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_lr_schedules_follow_their_formulas():
    constant = lrs(TrainingConfig(max_steps=10, learning_rate=0.1))
    assert constant == pytest.approx([0.1] * 10)

    cosine = lrs(TrainingConfig(max_steps=10, learning_rate=0.1, lr_schedule="cosine"))
    assert cosine[0] == pytest.approx(0.1)
    assert cosine[5] == pytest.approx(0.05)  # half way
    assert cosine[9] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    assert all(b < a for a, b in zip(cosine, cosine[1:]))

    warm = lrs(TrainingConfig(max_steps=14, learning_rate=0.1, lr_schedule="cosine", lr_warmup_steps=4))
    assert warm[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert warm[4] == pytest.approx(0.1) and warm[9] == pytest.approx(0.05)

    step = lrs(TrainingConfig(max_steps=20, learning_rate=0.1, lr_schedule="step", lr_step_fractions=(0.5, 0.95)))
    assert step[9] == pytest.approx(0.1) and step[10] == pytest.approx(0.01)
    assert step[18] == pytest.approx(0.01) and step[19] == pytest.approx(0.001)

    warm_constant = lrs(TrainingConfig(max_steps=5, learning_rate=1.0, lr_warmup_steps=2))
    assert warm_constant == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("schedule", LR_SCHEDULES)
def test_train_records_the_scheduled_lr(schedule):
    config = TrainingConfig(max_steps=12, learning_rate=0.1, lr_schedule=schedule, lr_warmup_steps=2)
    _, summary = run(config)
    assert summary.loss_history["step"] == list(range(1, 13))
    assert summary.loss_history["learning_rate"] == pytest.approx(lrs(config))
    assert summary.learning_rate == pytest.approx(0.1 * learning_rate_factor(config, 12))


# ------------------------------------------------------------------------------ config
def test_config_round_trips_through_json():
    config = TrainingConfig(max_steps=70000, max_minutes=30.0, optimizer="adamw", lr_schedule="step",
                            lr_step_fractions=(0.5, 0.95), betas=(0.5, 0.9), early_stopping_patience=3,
                            validation_interval=100, grad_clip_norm=1.0)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["betas"] == [0.5, 0.9]
    assert TrainingConfig.from_dict(data) == config
    assert TrainingConfig.from_dict(None) == TrainingConfig()


@pytest.mark.parametrize("changes, pattern", [
    ({"optimizer": "rmsprop"}, r"optimizer must be one of adam, adamw, sgd, sgd_nesterov; got 'rmsprop'"),
    ({"lr_schedule": "poly"}, r"lr_schedule must be one of constant, cosine, step; got 'poly'"),
    ({"max_steps": 0}, r"max_steps must be >= 1, got 0"),
    ({"max_steps": 10.0}, r"max_steps must be an integer, got 10.0"),
    ({"max_steps": True}, r"max_steps must be an integer, got True"),
    ({"max_minutes": 0}, r"max_minutes must be a finite number in \(0.0, inf\), got 0"),
    ({"learning_rate": -1e-3}, r"learning_rate must be a finite number .* got -0.001"),
    ({"learning_rate": float("nan")}, r"learning_rate .* got nan"),
    ({"weight_decay": -1}, r"weight_decay"),
    ({"momentum": 1.0}, r"momentum must be a finite number in \[0.0, 1.0\), got 1.0"),
    ({"optimizer": "sgd_nesterov", "momentum": 0.0}, r"momentum must be > 0 for optimizer 'sgd_nesterov'"),
    ({"betas": (0.9,)}, r"betas must be a pair"),
    ({"betas": (0.9, 1.5)}, r"betas\[1\] .* got 1.5"),
    ({"lr_warmup_steps": 10, "max_steps": 10}, r"lr_warmup_steps must be < max_steps \(10\), got 10"),
    ({"lr_step_fractions": (0.9, 0.5)}, r"lr_step_fractions must be strictly increasing"),
    ({"lr_step_fractions": (1.0,)}, r"lr_step_fractions\[0\] .* got 1.0"),
    ({"lr_gamma": 0.0}, r"lr_gamma .* got 0.0"),
    ({"grad_clip_norm": 0.0}, r"grad_clip_norm .* got 0.0"),
    ({"validation_interval": -1}, r"validation_interval must be >= 0, got -1"),
    ({"early_stopping_patience": 3}, r"early_stopping_patience=3 needs validation_interval > 0"),
    ({"early_stopping_patience": 0, "validation_interval": 5}, r"early_stopping_patience must be >= 1, got 0"),
    ({"seed": -1}, r"seed must be >= 0, got -1"),
    ({"device": "tpu"}, r"device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
])
def test_config_validation_names_field_and_value(changes, pattern):
    with pytest.raises(ConfigError, match=pattern):
        TrainingConfig(**changes)


def test_from_dict_rejects_unknown_keys_listing_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown training config key\(s\) 'lr'; valid keys: max_steps, "):
        TrainingConfig.from_dict({"lr": 0.1})
    with pytest.raises(ConfigError, match=r"momentum"):
        TrainingConfig().replace(momentum=2.0)


def test_cuda_requested_but_unavailable_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = TrainingConfig(device="cuda")  # a config may be written on a CPU machine
    weight = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(ConfigError, match=r"device 'cuda' was requested but CUDA is not available"):
        train([weight], lambda b: weight.sum(), lambda e: [0], config)


def test_bad_train_arguments_are_config_errors():
    weight = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(ConfigError, match="no parameters"):
        train([], lambda b: weight.sum(), lambda e: [0], TrainingConfig(max_steps=1))
    frozen = torch.nn.Parameter(torch.ones(1), requires_grad=False)
    with pytest.raises(ConfigError, match="requires grad"):
        train([frozen], lambda b: frozen.sum(), lambda e: [0], TrainingConfig(max_steps=1))
    with pytest.raises(ConfigError, match="no validation function"):
        train([weight], lambda b: weight.sum(), lambda e: [0],
              TrainingConfig(max_steps=1, validation_interval=1, early_stopping_patience=1))
    with pytest.raises(ConfigError, match="pass the modules"):
        train([weight], lambda b: weight.sum(), lambda e: [0],
              TrainingConfig(max_steps=1, validation_interval=1, early_stopping_patience=1), validation=lambda: 1.0)


def test_staged_training_with_set_trainable():
    encoder, decoder = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    step = mse_step(torch.nn.Sequential(encoder, decoder))
    config = TrainingConfig(max_steps=5, learning_rate=1e-2)
    train(list(encoder.parameters()) + list(decoder.parameters()), step, regression_batches(), config, stage="stage 1/2")
    set_trainable(encoder, False)
    frozen = encoder.weight.clone()
    before = decoder.weight.clone()
    summary = train(decoder.parameters(), step, regression_batches(), config.replace(max_steps=3, learning_rate=1e-3),
                    stage="stage 2/2")
    assert summary.steps == 3 and summary.learning_rate == pytest.approx(1e-3)
    assert torch.equal(encoder.weight, frozen) and not torch.equal(decoder.weight, before)


# ------------------------------------------------------------------------------ split_held_out
def test_split_held_out_properties():
    fit, held = split_held_out(20, 0.2, seed=0)
    assert len(held) == 4 and len(fit) == 16
    assert sorted(fit + held) == list(range(20)) and not set(fit) & set(held)
    assert fit == sorted(fit) and held == sorted(held)
    assert split_held_out(20, 0.2, seed=0) == (fit, held)  # deterministic
    assert split_held_out(20, 0.2, seed=1)[1] != held
    assert split_held_out(1, 0.5, seed=0) == ([0], [])
    assert split_held_out(2, 0.1, seed=0)[1] in ([0], [1])  # minimum 1 held out, 1 left to fit
    assert len(split_held_out(10, 0.01, seed=0, minimum=3)[1]) == 3
    assert len(split_held_out(10, 0.99, seed=0)[0]) == 1  # always one image left to fit on
    assert split_held_out(10, 0.01, seed=0, minimum=0) == (list(range(10)), [])
    for n in range(1, 30):
        fit, held = split_held_out(n, 0.25, seed=n)
        assert len(fit) >= 1 and len(fit) + len(held) == n


@pytest.mark.parametrize("args, pattern", [
    ((0, 0.2, 0), r"num_images must be >= 1, got 0"),
    ((10, 0.0, 0), r"fraction must be a finite number in \(0.0, 1.0\), got 0.0"),
    ((10, 1.0, 0), r"fraction .* got 1.0"),
    ((10, 0.2, -1), r"seed must be >= 0"),
])
def test_split_held_out_validates(args, pattern):
    with pytest.raises(ConfigError, match=pattern):
        split_held_out(*args)
