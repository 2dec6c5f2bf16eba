"""TrainConfig's one reading of a typed learning rate, its schedule checks and the one_cycle fields:
refused before anything loads, with the field named; passed through to the schedule unchanged."""

import argparse
import inspect

import pytest

from embedtrain.calculator import derive
from embedtrain.config import ConfigError, TrainConfig, add_arguments, config_from_args, lr_fields
from embedtrain.schedules import ONE_CYCLE_DEFAULTS, SCHEDULES, build_schedule, from_config

A1111 = "0.005:100, 1e-3:1000, 1e-5"


def cli_config(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def base(**changes):
    return TrainConfig(model="tiny", data="somewhere", name="zorblat", **changes)


# ------------------------------------------------------------------ lr as typed

@pytest.mark.parametrize("typed, fields", [
    ("0.005", {"lr": 0.005}),
    (" 1e-3 ", {"lr": 1e-3}),
    (0.02, {"lr": 0.02}),
    (A1111, {"lr": 0.0, "lr_schedule": "piecewise", "lr_piecewise": A1111}),
    ("  0:10, 1e-3 ", {"lr": 0.0, "lr_schedule": "piecewise", "lr_piecewise": "0:10, 1e-3"}),
])
def test_lr_fields_reads_a_number_or_a1111_piecewise_text(typed, fields):
    assert lr_fields(typed) == fields


@pytest.mark.parametrize("typed, message", [
    ("fast", r"^lr must be a number such as 0.005 or A1111's piecewise text such as '0.005:100, 1e-3:1000, "
             r"1e-5', got 'fast'$"),
    ("", r"^lr must be a number .* got ''$"),
    ("1e-3, 1e-4", r"^lr must be a number .* got '1e-3, 1e-4'$"),
    ("0.005:abc", r"^lr '0.005:abc' is not a number, so it is read as A1111's piecewise text .* end update 'abc' "
                  r"is not a whole number"),
    ("1e-3, 0.005:100", r"^lr .* comes after the open-ended part"),
    ("é" * 300 + ":1", r"^lr '" + "é" * 120 + r"' is not a number"),   # the value is cut, the reason kept
])
def test_lr_fields_refuses_anything_else_naming_lr(typed, message):
    with pytest.raises(ConfigError, match=message):
        lr_fields(typed)


def test_cli_lr_uses_the_same_reading_before_anything_loads():
    cfg = cli_config("--model", "demo", "--data", "d", "--name", "zorblat", "--lr", A1111)
    # lr 0 was typed (through the text), so the demo preset's lr 5e-3 does not replace it
    assert (cfg.lr, cfg.lr_schedule, cfg.lr_piecewise) == (0.0, "piecewise", A1111)
    assert cli_config("--model", "demo", "--data", "d", "--name", "zorblat", "--lr", "2e-3").lr == 2e-3
    with pytest.raises(ConfigError, match="^lr '0.005:x' is not a number"):
        cli_config("--data", "d", "--name", "zorblat", "--lr", "0.005:x")


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd", "dadapt_adam", "prodigy", "schedulefree_adamw"])
def test_piecewise_lr_of_0_builds_every_optimizer(optimizer):
    """Piecewise typed as the LR leaves lr at 0; D-Adaptation and Prodigy refuse an LR of 0 at construction,
    so the optimizer gets a placeholder (the trainer sets every update's LR from the schedule)."""
    import torch

    from embedtrain import optimizers
    pytest.importorskip(optimizers.PACKAGES.get(optimizer, "torch"))
    cfg = base(**lr_fields(A1111), optimizer=optimizer).validate()
    opt = optimizers.make_optimizer(optimizer, [torch.nn.Parameter(torch.zeros(2))], cfg)
    assert len(opt.param_groups) == 1


# ------------------------------------------------------------------ lr_schedule

def test_a_schedule_name_typo_is_refused_by_validate():
    with pytest.raises(ConfigError, match=r"^lr_schedule must be one of constant, linear, cosine, .*one_cycle, "
                                          r"got 'cosin'$"):
        base(lr_schedule="cosin").validate()
    for name in SCHEDULES:
        base(lr_schedule=name, lr_piecewise=A1111 if name == "piecewise" else "").validate()


def test_the_lr_schedule_help_lists_every_schedule():
    helptext = TrainConfig.__dataclass_fields__["lr_schedule"].metadata["help"]
    assert [n.strip() for n in helptext.split(",")] == list(SCHEDULES)


def test_the_cli_refuses_a_schedule_typo_in_one_line_before_the_model_loads(images, tmp_path, capsys):
    from embedtrain.trainer import cli
    assert cli(["--model", "tiny", "--data", str(images), "--name", "zorblat", "--out", str(tmp_path / "out"),
                "--lr-schedule", "cosin"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: lr_schedule must be one of constant,") and "\n" not in err
    assert not (tmp_path / "out").exists()   # refused before the run folder (and the model)


# ------------------------------------------------------------------ one_cycle's fields

def test_one_cycle_fields_default_to_the_schedules_defaults():
    cfg, builder = TrainConfig(), inspect.signature(build_schedule).parameters
    assert {k: getattr(cfg, k) for k in ONE_CYCLE_DEFAULTS} == ONE_CYCLE_DEFAULTS
    assert (builder["pct_start"].default, builder["div_factor"].default, builder["final_div_factor"].default) == \
        tuple(ONE_CYCLE_DEFAULTS.values())


def test_one_cycle_fields_pass_through_from_config_and_the_cli():
    cfg = cli_config("--data", "d", "--name", "zorblat", "--lr", "0.01", "--lr-schedule", "one_cycle",
                     "--lr-pct-start", "0.5", "--lr-div-factor", "10", "--lr-final-div-factor", "100").validate()
    assert (cfg.lr_pct_start, cfg.lr_div_factor, cfg.lr_final_div_factor) == (0.5, 10.0, 100.0)
    s = from_config(cfg, derive(8, 2, 1, 20))
    assert s(0) == pytest.approx(1e-3) and s(10) == 0.01 and s(20) == pytest.approx(1e-5)
    assert s.description == "one_cycle 0.001 -> 0.01 over 10 updates -> 1e-05 at update 20"
    # the defaults give today's schedule
    assert from_config(base(lr_schedule="one_cycle", lr=0.01), derive(8, 2, 1, 20)).unroll(21) == \
        build_schedule("one_cycle", 0.01, 20).unroll(21)


@pytest.mark.parametrize("field, value, valid", [
    ("lr_pct_start", 0.0, r"in \(0, 1\)"), ("lr_pct_start", 1.0, r"in \(0, 1\)"), ("lr_pct_start", -0.3, "in"),
    ("lr_div_factor", 0.5, ">= 1"), ("lr_final_div_factor", 0.0, ">= 1"),
    ("lr_final_div_factor", float("inf"), "a finite number"),
])
def test_one_cycle_fields_are_validated(field, value, valid):
    with pytest.raises(ConfigError, match=f"^{field} must be {valid}"):
        base(**{field: value}).validate()


def test_one_cycle_fields_on_another_schedule_are_not_ignored_silently():
    s = from_config(base(lr_schedule="cosine", lr_pct_start=0.5, lr_div_factor=10.0), derive(8, 2, 1, 20))
    assert "lr_pct_start, lr_div_factor are ignored by cosine: they apply to one_cycle" in s.warnings
    assert from_config(base(lr_schedule="cosine"), derive(8, 2, 1, 20)).warnings == []
