"""Command line -> `TrainConfig`, with the flags generated from the config dataclasses.

Every field of every `TrainConfig` section is a flag: `--field-name`, or the `flag` its metadata
names (`--data` for `data.url`); its type, choices and "none" come from the annotation, its help
from the field's docstring, one argument group per section. The `ElectraExitConfig` fields (those
the dataset owns excepted) are flags too and become `model.overrides`, as does `--model-set
FIELD=VALUE`. A new field therefore needs no edit here.

The layers, each over the one before: field defaults, the preset (`--preset`, or the one a
`--config` file names), the `--config` file, the flags. Launchers' own arguments (`--local_rank`)
are accepted and ignored (ranks are discovered in `dsexit.train.cluster.distributed`), and DeepSpeed's
spelling `--deepspeed --deepspeed_config FILE` means `--deepspeed FILE`.

`dataclass_flags` and `given_fields` serve any dataclass: fine-tuning's command line
(`dsexit.commands.finetune`) is generated from `FinetuneConfig` the same way.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Sequence

from dsexit.model import ElectraExitConfig
from dsexit.model.config import CHOICES as MODEL_CHOICES
from dsexit.model.config import DATASET_FIELDS
from dsexit.train.config.train_config import (
    DEFAULT_PRESET,
    ConfigError,
    TrainConfig,
    move_training_fields,
    preset_config,
    preset_values,
)

SECTIONS = tuple(field.name for field in dataclasses.fields(TrainConfig))
MODEL_FLAG_NAMES = {"exit_enabled": "--exit"}
"""`ElectraExitConfig` fields whose flag is not their own name (the model package knows no command line)."""
NONE = "none"
"""The word that sets an optional number to None (`--target-compute none`); optional text keeps it
(`--resume none` is a keyword, `--data-cache-dir none` a directory)."""


@dataclass(frozen=True)
class Flag:
    """One generated flag: the field it sets, as (section, field) or ("model.overrides", field)."""

    option: str
    section: str
    name: str

    @property
    def dest(self) -> str:
        """`section.name`; the bare field name for a command line of one dataclass (section "")."""
        return f"{self.section}.{self.name}" if self.section else self.name


class _Unset:
    """A flag value meaning None (argparse's own None means "not given")."""

    def __repr__(self) -> str:
        return NONE


_SET_NONE = _Unset()


def field_docs(cls: type) -> dict[str, str]:
    """The docstrings of a dataclass's fields (the string literal after each field), by field name."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (a frozen build): flags without help
        return {}
    docs, body = {}, tree.body[0].body
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _first_paragraph(text: str) -> str:
    return " ".join(text.split("\n\n")[0].split())


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(the type, whether None is allowed) of `int`, `float | None`, `Optional[str]`, `dict[...]`."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [arg for arg in args if arg is not type(None)]
        return kinds[0], len(kinds) < len(args)
    return typing.get_origin(annotation) or annotation, False


def _converter(kind: type, optional: bool):
    def convert(text: str) -> Any:
        if optional and text.lower() == NONE:
            return _SET_NONE
        return kind(text)

    convert.__name__ = kind.__name__  # argparse names the type in "invalid int value: 'x'"
    return convert


def _add_field_flag(
    group,
    section: str,
    field: dataclasses.Field,
    hint: Any,
    doc: str,
    default: Any,
    option: str | None,
    choices: Sequence[str] | None,
) -> Flag:
    options = {key: value for key, value in field.metadata.items() if key != "flag"}
    flag = Flag(option or field.metadata.get("flag") or "--" + field.name.replace("_", "-"), section, field.name)
    kind, optional = _base_type(hint)
    help_text = _first_paragraph(doc)
    if default is not dataclasses.MISSING and not isinstance(default, dict):
        shown = "none" if default is None else repr(default) if default == "" else default
        help_text += f" (default: {shown})" if help_text else f"default: {shown}"
    if choices is not None:
        options.setdefault("choices", choices)
    if kind is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif kind is dict:
        options.update(action="append", metavar="FIELD=VALUE")
    else:
        options.setdefault("type", _converter(kind, optional and kind is not str))
        if "choices" not in options:
            options.setdefault("metavar", {int: "N", float: "X"}.get(kind, "TEXT"))
            if optional and kind is not str:
                options["metavar"] += "|none"
    group.add_argument(flag.option, dest=flag.dest, default=None, help=help_text.replace("%", "%%"), **options)
    return flag


def dataclass_flags(
    group,
    cls: type,
    section: str,
    defaults: Any = None,
    *,
    options: dict[str, str] | None = None,
    choices: dict[str, Sequence[str]] | None = None,
    skip: Sequence[str] = (),
) -> list[Flag]:
    """One flag per field of the dataclass `cls` (those in `skip` excepted), added to `group`: `--field-name`,
    or `options[field]`, or the field's metadata `flag`; other metadata (metavar, choices, nargs, a type of its
    own) goes to argparse. bool fields get --X / --no-X, optional numbers take "none", a dict field takes FIELD=VALUE
    (repeatable). The help is the field's docstring, with its value in `defaults` when given."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    options, choices = options or {}, choices or {}
    return [
        _add_field_flag(
            group,
            section,
            field,
            hints[field.name],
            docs.get(field.name, ""),
            getattr(defaults, field.name) if defaults is not None else dataclasses.MISSING,
            options.get(field.name),
            choices.get(field.name),
        )
        for field in dataclasses.fields(cls)
        if field.name not in skip
    ]


def given_fields(args: argparse.Namespace, flags: Sequence[Flag]) -> dict[str, Any]:
    """{field name: value} of the flags the command line gave ("none" as None): the keyword arguments that
    make the dataclass of a one-section command line (`Config(**given_fields(args, flags))`)."""
    values = {flag.name: getattr(args, flag.dest) for flag in flags}
    return {name: None if value is _SET_NONE else value for name, value in values.items() if value is not None}


def _config_flags(parser: argparse.ArgumentParser, defaults: TrainConfig) -> list[Flag]:
    """Every section's fields, one argument group per section; the model's group also holds the
    `ElectraExitConfig` fields, as model overrides (unset ones come from the --model preset)."""
    flags = []
    for section in dataclasses.fields(TrainConfig):
        values = getattr(defaults, section.name)
        group = parser.add_argument_group(section.name, inspect.getdoc(type(values)))
        flags += dataclass_flags(group, type(values), section.name, values)
        if section.name == "model":
            flags += dataclass_flags(
                group,
                ElectraExitConfig,
                "model.overrides",
                options=MODEL_FLAG_NAMES,
                choices=MODEL_CHOICES,
                skip=DATASET_FIELDS,
            )
    return flags


def build_parser() -> tuple[argparse.ArgumentParser, list[Flag]]:
    """The parser and the flags it generated from the config dataclasses."""
    parser = argparse.ArgumentParser(
        prog="pretrain.py",
        argument_default=None,
        description="Pre-train ELECTRA with token-level early exit on DeepSpeed. Each flag sets the config field "
        "it is named after; later layers win: defaults, the preset, --config, the flags. The defaults "
        f"shown are the {DEFAULT_PRESET} preset's; the model fields' come from the --model preset.",
    )
    parser.add_argument("--config", metavar="JSON", help="a saved config.json to start from (flags still override it)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    # DeepSpeed's own spelling (deepspeed.add_config_arguments): --deepspeed alone, the file here.
    parser.add_argument("--deepspeed_config", "--deepspeed-config", metavar="JSON", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser, _config_flags(parser, preset_config(DEFAULT_PRESET))


def _parse_model_set(items: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--model-set {item!r} is invalid; expected FIELD=VALUE.")
        try:
            overrides[name] = json.loads(text)
        except json.JSONDecodeError:
            overrides[name] = text
    return overrides


def flag_values(args: argparse.Namespace, flags: list[Flag]) -> dict[str, dict[str, Any]]:
    """The fields the command line set, as config sections ({"optim": {"lr": ...}, "model": {"overrides": ...}})."""
    values: dict[str, dict[str, Any]] = {}
    overrides: dict[str, Any] = {}
    model_set: list[str] = []
    for flag in flags:
        value = getattr(args, flag.dest)
        if value is None:
            continue
        value = None if value is _SET_NONE else value
        if flag.section == "model.overrides":
            overrides[flag.name] = value
        elif flag.dest == "model.overrides":
            model_set = value
        else:
            values.setdefault(flag.section, {})[flag.name] = value
    if args.deepspeed_config is not None:
        given = values.setdefault("parallelism", {}).setdefault("deepspeed_config", args.deepspeed_config)
        if given != args.deepspeed_config:
            raise ConfigError(
                f"--deepspeed {given!r} and --deepspeed_config {args.deepspeed_config!r} disagree; "
                f"expected one DeepSpeed config."
            )
    overrides.update(_parse_model_set(model_set))  # after the named flags, as it is given after them
    if overrides:
        values.setdefault("model", {})["overrides"] = overrides
    return values


def load_config_file(path: str) -> dict[str, dict[str, Any]]:
    """The sections of a saved config.json (the resolved config a run writes, or its "train" part
    alone); ConfigError naming the file when it cannot be read, is not JSON, or a section is not an object."""
    try:
        with open(path) as handle:
            saved = json.load(handle)
    except OSError as error:
        raise ConfigError(
            f"config={path!r} cannot be read ({error.strerror or error}); expected a config.json a run wrote."
        ) from None
    except ValueError as error:  # JSONDecodeError, or bytes that are not text
        raise ConfigError(f"config={path!r} is not valid JSON ({error}); expected a config.json a run wrote.") from None
    train = saved.get("train", saved) if isinstance(saved, dict) else saved
    if not isinstance(train, dict):
        raise ConfigError(
            f"config={path!r} holds {json.dumps(train)[:60]} where an object of config sections "
            f"({', '.join(SECTIONS)}) was expected."
        )
    unknown = sorted(set(train) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            f"config={path!r} has top-level key(s) {', '.join(map(repr, unknown))} that are not config sections; "
            f'expected the sections {", ".join(SECTIONS)} (for example {{"training": {{"max_steps": 10}}}}) '
            "or a config.json a run wrote."
        )
    for section in SECTIONS:
        if section in train and not isinstance(train[section], dict):
            raise ConfigError(
                f"config={path!r} has section {section!r} = {json.dumps(train[section])[:60]}; "
                f"expected an object of its fields."
            )
    return move_training_fields(train)


def merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """Later layers win, field by field (nested objects such as model.overrides merge key by key)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                value = merge(merged[key], value)
            merged[key] = value
    return merged


def parse_config(argv: Sequence[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """The validated config for a command line; raises ConfigError naming the bad value."""
    parser, flags = build_parser()
    args = parser.parse_args(argv)
    given = flag_values(args, flags)
    saved = load_config_file(args.config) if args.config else {}
    preset = given.get("job", {}).get("preset") or saved.get("job", {}).get("preset") or DEFAULT_PRESET
    try:
        config = TrainConfig.from_dict(merge(preset_values(preset), saved, given))
    except (TypeError, ValueError) as error:  # an unknown field: only a file can hold one
        if not args.config:
            raise
        raise ConfigError(f"config={args.config!r} is invalid: {str(error).rstrip('.')}.") from None
    config.validate()
    return config, args
