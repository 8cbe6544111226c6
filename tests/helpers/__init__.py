"""What several test folders share: the checkout's paths, a free port and a real S3 server
(`servers`), synthetic datasets (`datasets`), downstream tasks and exports (`tasks`).

The tiers: `tests/unit/` runs in this process (no child processes, no servers; the whole tier
in well under a minute); `tests/integration/` starts real processes, launchers and servers.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"  # test data beside the checkout (../shared/data)


def load_script(path: Path, name: str):
    """A script (not part of a package) as the module `name`; its `if __name__ == "__main__"` block does not run."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def load_bench(name: str):
    """bench/<name>.py as a module (the benchmarks are scripts, not a package)."""
    return load_script(REPO / "bench" / f"{name}.py", name)
