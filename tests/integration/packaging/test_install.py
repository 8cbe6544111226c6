"""Packaging: a non-editable install carries the DeepSpeed configs and the console scripts, and the
pre-training command runs as `python -m dsexit.train`, also under `deepspeed --module` and `torchrun -m`.
No network: pip builds with this environment's setuptools, from a copy of the source."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

SHIPPED = ("zero1.json", "zero2.json", "zero3.json", "pipeline.json")
SCRIPTS = {
    "dsexit-pretrain": "dsexit.commands.pretrain:main",
    "dsexit-prepare": "dsexit.commands.prepare_data:main",
    "dsexit-export": "dsexit.commands.export_hf:main",
    "dsexit-finetune": "dsexit.commands.finetune:main",
    "dsexit-plot": "dsexit.commands.plot_run:main",
}
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
DRY_RUN = ["--dry-run", "--model", "electra-tiny", "--max-steps", "2"]


def _without_repo_on_path(site: Path | None) -> dict:
    """Python sees `site` (if given), never this checkout."""
    return {**ENV, "PYTHONPATH": str(site) if site else ""}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`pip install --no-deps --target SITE` of a copy of the source (a wheel build, not an editable install)."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "dsexit", source / "dsexit", ignore=shutil.ignore_patterns("__pycache__"))
    site = root / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(source),
        ],
        check=True,
        capture_output=True,
        env=ENV,
        timeout=300,
    )
    return site


def test_the_root_ds_configs_are_the_packaged_ones():
    for name in SHIPPED:
        packaged = REPO / "dsexit" / "train" / "config" / "ds_configs" / name
        assert (REPO / "ds_configs" / name).read_bytes() == packaged.read_bytes()
    assert sorted(path.name for path in (REPO / "ds_configs").iterdir()) == sorted(SHIPPED)


def test_a_non_editable_install_ships_the_ds_configs(installed):
    for name in SHIPPED:
        assert (installed / "dsexit" / "train" / "config" / "ds_configs" / name).read_bytes() == (
            REPO / "dsexit" / "train" / "config" / "ds_configs" / name
        ).read_bytes()


def test_console_scripts_resolve_to_functions_of_the_installed_package(installed, tmp_path):
    (distribution,) = importlib.metadata.distributions(path=[str(installed)])
    declared = {entry.name: entry.value for entry in distribution.entry_points if entry.group == "console_scripts"}
    assert declared == SCRIPTS
    check = (
        "import importlib.metadata, json, sys\n"
        f"(dist,) = importlib.metadata.distributions(path=[{str(installed)!r}])\n"
        "loaded = {e.name: e.load() for e in dist.entry_points if e.group == 'console_scripts'}\n"
        "print(json.dumps({name: [callable(f), sys.modules[f.__module__].__file__]\n"
        "                  for name, f in loaded.items()}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", check],
        cwd=tmp_path,
        env=_without_repo_on_path(installed),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for name, (is_callable, module_file) in json.loads(result.stdout).items():
        assert is_callable and Path(module_file).is_relative_to(installed), (name, module_file)
    assert all((installed / "bin" / name).exists() for name in SCRIPTS)


def test_the_installed_command_resolves_its_default_ds_config_from_any_directory(installed, tmp_path):
    """No checkout around: `--deepspeed` by default (ds_configs/zero2.json) and by name comes from package data."""
    for extra in ([], ["--deepspeed", "zero3.json"]):
        result = subprocess.run(
            [sys.executable, "-m", "dsexit.train", *DRY_RUN, "--run-dir", str(tmp_path / "run"), *extra],
            cwd=tmp_path,
            env=_without_repo_on_path(installed),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        path = Path(json.loads(result.stdout)["train"]["parallelism"]["deepspeed_config"])
        assert path.is_relative_to(installed / "dsexit" / "train" / "config" / "ds_configs"), path
        assert path.name == (extra[-1] if extra else "zero2.json")


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_python_m_dsexit_train_runs_under_the_launchers(launcher, tmp_path):
    from tests.helpers.servers import executable, free_port

    module = ["--module"] if launcher == "deepspeed" else ["-m"]
    nproc = ["--num_gpus", "1"] if launcher == "deepspeed" else ["--nproc_per_node", "1"]
    command = [
        executable(launcher),
        *nproc,
        "--master_port",
        str(free_port()),
        *module,
        "dsexit.train",
        *DRY_RUN,
        "--run-dir",
        str(tmp_path / "run"),
        "--deepspeed",
        "ds_configs/zero2.json",
    ]
    env = {**ENV, "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert '"deepspeed_config"' in result.stdout
