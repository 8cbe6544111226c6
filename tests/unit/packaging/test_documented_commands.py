"""Every command shown in a code block of README.md, docs/*.md and bench/README.md still parses.

A command is a line (continuations joined) that runs one of the project's programs: `launch/*.py`,
`bench/*.py`, `-m dsexit...` or a `dsexit-*` console script, directly or under `python`, `deepspeed`,
`torchrun` or `mpirun ... python`, after any `VAR=value` assignments and `&&`-chained set-up. Each is
checked in this process against the program's own parser: the program's `main` runs until it builds its
parser and asks it to parse, which stops it before any work; then the parser's help must format (what
`--help` prints) and the shown arguments must parse with no flag the parser does not know and no value it
refuses. Placeholders stay as they are written (`RUN_DIR`, `$DS_CONFIG`); `...` and a bracketed
placeholder such as `[candidate flags]` are left out, a bracketed flag such as `[--shard-mb 64]` is checked.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import os
import re
import shlex
import sys
from dataclasses import dataclass

import pytest

from tests.helpers import REPO, load_script

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "README.md"]
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SEPARATORS = {"&&", "||", ";", "|"}
PYTHONS = {"python", "python3"}


@dataclass(frozen=True)
class Command:
    where: str
    """document:line of the command's first line."""
    program: str
    """A script path relative to the checkout (`launch/pretrain.py`) or a module (`-m dsexit.train`)."""
    args: tuple[str, ...]


def code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line inside a code block (``` fences, or indented by 4 spaces after a blank
    line), with backslash continuations joined onto the first line."""
    lines, taken = text.splitlines(), []
    fenced, indented = False, False
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        previous = lines[number - 2] if number > 1 else ""
        if not fenced:
            indented = line.startswith("    ") and (indented or not previous.strip())
        if fenced or indented:
            taken.append((number, line.strip()))
    joined: list[tuple[int, str]] = []
    for number, line in taken:
        if joined and joined[-1][1].endswith("\\"):
            joined[-1] = (joined[-1][0], joined[-1][1][:-1].rstrip() + " " + line)
        else:
            joined.append((number, line))
    return joined


def _console_scripts() -> dict[str, str]:
    """`dsexit-*` console script -> module, from pyproject.toml's [project.scripts]."""
    section = (REPO / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^(dsexit-[\w-]+)\s*=\s*"([\w.]+):main"', section, re.MULTILINE))


def _program(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(program, its arguments) of one simple command, or None when it runs none of the project's programs."""
    while tokens and (ASSIGNMENT.match(tokens[0]) or tokens[0] == "env"):
        tokens = tokens[1:]
    if not tokens:
        return None
    launcher, rest = os.path.basename(tokens[0]), tokens[1:]
    if launcher in _console_scripts():
        return f"-m {_console_scripts()[launcher]}", rest
    if launcher in ("mpirun", "srun"):
        starts = [i for i, token in enumerate(rest) if os.path.basename(token) in PYTHONS]
        return _program(rest[starts[0] :]) if starts else None
    if launcher not in PYTHONS | {"deepspeed", "torchrun"}:
        return _script(tokens[0], rest) if tokens[0].endswith(".py") else None
    for i, token in enumerate(rest):
        if token in ("-m", "--module"):
            if launcher in PYTHONS:
                return (f"-m {rest[i + 1]}", rest[i + 2 :]) if rest[i + 1].startswith("dsexit") else None
            script = next((j for j in range(i + 1, len(rest)) if not rest[j].startswith("-")), None)
            if script is None or not rest[script].startswith("dsexit"):
                return None
            return f"-m {rest[script]}", rest[script + 1 :]
        if token == "-c":
            return None
        if token.endswith(".py"):
            return _script(token, rest[i + 1 :])
        if launcher in PYTHONS and not token.startswith("-"):
            return None
    return None


def _script(path: str, args: list[str]) -> tuple[str, list[str]] | None:
    path = path.removeprefix("./")
    return (path, args) if path.startswith(("launch/", "bench/")) else None


def _without_placeholders(args: list[str]) -> list[str]:
    """`...` and bracketed placeholders left out; a bracketed optional flag (`[--shard-mb 64]`) kept."""
    kept, group = [], None
    for token in args:
        if group is None and token.startswith("[") and not token.startswith("[-"):
            group = "placeholder"
        elif group is None and token.startswith("[-"):
            group = "flag"
            token = token[1:]
        if group == "flag":
            kept.append(token.rstrip("]"))
        elif group is None and token not in ("...", "…"):
            kept.append(token)
        if group and token.endswith("]"):
            group = None
    return kept


def commands_in(text: str, name: str) -> list[Command]:
    found = []
    for number, line in code_lines(text):
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # not shell (a Python snippet, a log line with an apostrophe)
            continue
        segment: list[str] = []
        for token in [*tokens, ";"]:
            if token not in SEPARATORS:
                segment.append(token)
                continue
            program = _program(segment) if segment else None
            if program:
                found.append(Command(f"{name}:{number}", program[0], tuple(_without_placeholders(program[1]))))
            segment = []
    return found


def documented_commands() -> list[Command]:
    return [command for path in DOCUMENTS for command in commands_in(path.read_text(), str(path.relative_to(REPO)))]


class _Parsing(BaseException):
    """Raised where the program asks its parser to parse: the parser is built, no work has started (a
    BaseException, so that no `except Exception` in a program swallows it)."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def _main(program: str):
    if program.startswith("-m "):
        module = importlib.import_module(program[3:])
        if not hasattr(module, "main"):  # a package run with -m: its __main__
            module = importlib.import_module(program[3:] + ".__main__")
        return module.main
    path = REPO / program
    if not path.is_file():
        raise FileNotFoundError(program)
    return load_script(path, f"documented_{path.parent.name}_{path.stem}").main


def parser_of(program: str) -> argparse.ArgumentParser:
    """The parser `program`'s main builds, caught as it starts parsing (its main called with no argument that
    could start work: it stops there)."""

    def caught(parser, *args, **kwargs):
        raise _Parsing(parser)

    main = _main(program)
    environment, path, argv = dict(os.environ), list(sys.path), sys.argv
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", caught)
        patch.setattr(argparse.ArgumentParser, "parse_known_args", caught)
        try:
            if inspect.signature(main).parameters:
                main(["--help"])
            else:
                sys.argv = [program, "--help"]
                main()
        except _Parsing as parsing:
            return parsing.parser
        finally:
            os.environ.clear()
            os.environ.update(environment)
            sys.path[:], sys.argv = path, argv
    raise AssertionError(f"{program}'s main returned without parsing a command line")


def problem(command: Command) -> str | None:
    """None when the command parses; else what is wrong with it, in one line."""
    try:
        parser = parser_of(command.program)
    except FileNotFoundError:
        return f"{command.where}: {command.program} does not exist"
    if not parser.format_help():
        return f"{command.where}: {command.program} --help prints nothing"
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            _, unknown = parser.parse_known_args(list(command.args))
    except SystemExit:
        error = (errors.getvalue().strip().splitlines() or ["(no message)"])[-1]  # usage lines above it
        return f"{command.where}: {command.program} refuses {' '.join(command.args)!r}: {error}"
    if unknown:
        return f"{command.where}: {command.program} does not know {' '.join(unknown)!r}"
    return None


COMMANDS = documented_commands()


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.where} {c.program}" for c in COMMANDS])
def test_documented_command_parses(command):
    assert problem(command) is None


def test_the_documents_show_the_programs_they_describe():
    shown = {(command.where.split(":")[0], command.program) for command in COMMANDS}
    for expected in [
        ("README.md", "launch/pretrain.py"),
        ("README.md", "launch/export_hf.py"),
        ("README.md", "launch/finetune.py"),
        ("docs/data.md", "launch/prepare_data.py"),
        ("docs/cluster.md", "launch/pretrain.py"),
        ("docs/training.md", "launch/pretrain.py"),
        ("bench/README.md", "bench/train_exit.py"),
        ("bench/README.md", "bench/pretrain_vs_exit.py"),
    ]:
        assert expected in shown
    quick_start = next(c for c in COMMANDS if c.where.startswith("README.md"))
    assert quick_start.args == ("--deepspeed", "ds_configs/zero2.json")


def test_commands_are_found_behind_launchers_assignments_and_set_up():
    text = "\n".join(
        [
            "Prose: python launch/pretrain.py --not-a-command",
            "",
            "    ./scripts/setup.sh && .venv/bin/deepspeed launch/pretrain.py --deepspeed ds_configs/zero2.json",
            "    A=1 B=2 deepspeed --num_gpus 2 --master_port 29500 launch/pretrain.py --lr 1e-3  # comment",
            "    torchrun --nproc_per_node 2 -m dsexit.train --max-steps 4 \\",
            "        --run-dir RUN_DIR",
            "    mpirun -np 2 -x GLOO_SOCKET_IFNAME python launch/pretrain.py ...",
            "    python -m pytest -q tests/unit",
            "    python bench/train_exit.py --batch 32 [candidate flags] [--launches 2]",
            "",
            "```bash",
            "dsexit-finetune --model m --task t",
            "```",
        ]
    )
    assert [(c.program, c.args) for c in commands_in(text, "x.md")] == [
        ("launch/pretrain.py", ("--deepspeed", "ds_configs/zero2.json")),
        ("launch/pretrain.py", ("--lr", "1e-3")),
        ("-m dsexit.train", ("--max-steps", "4", "--run-dir", "RUN_DIR")),
        ("launch/pretrain.py", ()),
        ("bench/train_exit.py", ("--batch", "32", "--launches", "2")),
        ("-m dsexit.commands.finetune", ("--model", "m", "--task", "t")),
    ]


@pytest.mark.parametrize(
    "program, args, expected",
    [
        ("launch/finetune.py", ("--model", "m", "--task", "t", "--no-such-flag"), "does not know '--no-such-flag'"),
        ("launch/pretrain.py", ("--exit-kv", "sideways"), "invalid choice: 'sideways'"),
        ("launch/pretrain.py", ("--max-steps", "many"), "invalid int value: 'many'"),
        ("bench/head_confidence.py", ("RUN_DIR",), "--run"),
        ("launch/no_such_program.py", (), "does not exist"),
    ],
)
def test_a_command_its_program_would_refuse_fails(program, args, expected):
    message = problem(Command("x.md:1", program, args))
    assert message is not None and expected in message
