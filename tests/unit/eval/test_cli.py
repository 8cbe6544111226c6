"""Fine-tuning's command line is generated from `FinetuneConfig`: every field has a flag named after it,
with its docstring as help, and a value given on the command line lands in that field. In process."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from dsexit.commands.finetune import build_parser, parse_args
from dsexit.eval.finetune import FinetuneConfig

RUN = ["--model", "m", "--task", "t"]
FIELDS = dataclasses.fields(FinetuneConfig)


def other_value(field: dataclasses.Field):
    """A value of the field's type that differs from its default, and its text on the command line."""
    default, choices = field.default, field.metadata.get("choices")
    if choices:
        value = next(choice for choice in choices if choice != default)
        return value, value
    hint = typing.get_type_hints(FinetuneConfig)[field.name]
    kind = typing.get_args(hint) or (hint,)  # `int | None` or `int`
    if int in kind:
        value = 7 if default != 7 else 8
        return value, str(value)
    if float in kind:
        value = 0.375 if default != 0.375 else 0.5
        return value, str(value)
    raise AssertionError(f"no test value for {field.name}: {kind}")


def test_every_field_has_a_flag_with_its_docstring_as_help():
    text = " ".join(build_parser().format_help().split())
    for field in FIELDS:
        assert f"--{field.name.replace('_', '-')}" in text
    assert "--lr X Peak learning rate: ELECTRA's for Small (Base used 1e-4, Large 5e-5). (default: 0.0003)" in text
    assert "--mode {finetune,probe}" in text and "--progress {auto,bar,lines,none}" in text


@pytest.mark.parametrize("field", FIELDS, ids=[field.name for field in FIELDS])
def test_each_flag_parses_into_its_field_and_leaves_the_others_at_their_defaults(field):
    value, text = other_value(field)
    args, config = parse_args([*RUN, f"--{field.name.replace('_', '-')}", text])
    assert getattr(config, field.name) == value
    assert dataclasses.replace(config, **{field.name: getattr(FinetuneConfig(), field.name)}) == FinetuneConfig()
    assert (args.model, args.task) == ("m", "t")


def test_no_flag_gives_the_defaults_and_none_clears_an_optional_field():
    assert parse_args(RUN)[1] == FinetuneConfig()
    config = parse_args([*RUN, "--max-train-examples", "none", "--epochs", "task default"])[1]
    assert config.max_train_examples is None and config.epochs is None
    assert parse_args([*RUN, "--epochs", "none"])[1].epochs is None


@pytest.mark.parametrize(
    "argv", [["--lr", "fast"], ["--mode", "linear"], ["--epochs", "x"], ["--progress", "loud"], ["--no-such-flag"]]
)
def test_a_bad_value_or_an_unknown_flag_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*RUN, *argv])
    assert exit_info.value.code == 2 and argv[0] in capsys.readouterr().err
