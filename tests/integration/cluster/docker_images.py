"""The images the Docker test runs, built on this machine with no image registry.

    python -m tests.integration.cluster.docker_images    # CI's stage before the tests; prints the tags

* the engine: scripts/setup_docker.sh installs Debian's docker.io, docker-compose and debootstrap
  and starts dockerd where no engine answers;
* the base: Debian bookworm by debootstrap (python3, python3-venv, python3-dev), `docker import`ed;
* dsexit's CPU image (docker/Dockerfile.cpu) and moto's S3 server (docker/Dockerfile.s3) on it,
  with this machine's pip set-up passed in: its CA bundle as the `pip_cert` build secret, and the
  CPU build of torch that this machine's pip would install, served from a loopback port (the
  builds use the host's network) as PIP_FIND_LINKS.

Every tag carries a hash of what went into it (the recipe, the files copied, the base): an image
whose tag exists is not built again.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import REPO

SETUP_SCRIPT = REPO / "scripts" / "setup_docker.sh"
DEBIAN_SUITE = "bookworm"  # Python 3.11, as the venvs and the torch wheel
DEBIAN_MIRROR = os.environ.get("DSEXIT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_PACKAGES = ("python3", "python3-venv", "python3-dev")  # venv: pip; dev: the headers the shm op compiles against
TORCH_VERSION = "2.13.0"  # scripts/setup.sh's, and Dockerfile.cpu's default
PYTHON_VERSION = "3.11"
DIGEST_CHARS = 16  # of the content hash in an image's tag
WHEEL_PORT = 38471  # where the builds find the torch wheel (loopback)
BUILD_LOGS = Path("/var/tmp/dsexit-docker-builds")
# What the images COPY: a change here rebuilds the CPU image.
NODE_IMAGE_INPUTS = (
    "docker/Dockerfile.cpu",
    "pyproject.toml",
    "README.md",
    "dsexit",
    "launch",
    "ds_configs",
    "docker/entrypoint.sh",
    "docker/seed_s3.py",
)
IGNORED = ("__pycache__", ".pyc", ".egg-info")  # as .dockerignore


def log(message: str) -> None:
    print(f"docker_images: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Docker:
    client: str  # a docker client that builds with BuildKit
    compose: tuple[str, ...]  # `docker compose` (v2) or `docker-compose` (v1)

    def run(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run([self.client, *args], **kwargs)

    def image_exists(self, tag: str) -> bool:
        return self.run("image", "inspect", tag).returncode == 0

    def drop_older(self, tag: str) -> None:
        """Remove this image's tags for earlier contents (same name, another hash), so that the disk
        holds one of each; other tags of the repository (a user's dsexit:cpu) stay."""
        repository, version = tag.split(":")
        pattern = re.escape(repository) + ":" + re.escape(version[:-DIGEST_CHARS]) + f"[0-9a-f]{{{DIGEST_CHARS}}}"
        listed = self.run("images", "--format", "{{.Repository}}:{{.Tag}}", repository).stdout.split()
        older = [name for name in listed if name != tag and re.fullmatch(pattern, name)]
        if older:
            self.run("rmi", *older)  # an image a container still uses stays


def engine_answers(client: str = "docker") -> bool:
    try:
        return subprocess.run([client, "info"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _client_version(client: str) -> int | None:
    probe = subprocess.run([client, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True)
    try:
        return int(probe.stdout.strip().split(".")[0])
    except ValueError:
        return None


def _buildkit_client() -> str:
    """A client whose `docker build` is BuildKit: one with the buildx plugin (the default builder
    since Docker 23), or an older one with BuildKit built in (Debian bookworm's docker.io, 20.10),
    which a newer client without buildx (it falls back to the legacy builder) may shadow on PATH."""
    candidates = dict.fromkeys(
        path for path in (shutil.which("docker"), "/usr/bin/docker") if path and Path(path).exists()
    )
    for client in candidates:
        if subprocess.run([client, "buildx", "version"], capture_output=True).returncode == 0:
            return client
        version = _client_version(client)
        if version is not None and version < 23:
            return client
    raise RuntimeError(f"no docker client here builds with BuildKit (tried {list(candidates)}): install buildx")


def _compose_command(client: str) -> tuple[str, ...]:
    if subprocess.run([client, "compose", "version"], capture_output=True).returncode == 0:
        return (client, "compose")
    if shutil.which("docker-compose"):
        return ("docker-compose",)
    raise RuntimeError("neither `docker compose` nor docker-compose is installed")


def ensure_engine() -> Docker:
    """A Docker engine that answers, installing and starting one (scripts/setup_docker.sh) if needed."""
    if not (shutil.which("docker") and shutil.which("debootstrap") and engine_answers()):
        log(f"starting an engine: {SETUP_SCRIPT.relative_to(REPO)}")
        subprocess.run(["bash", str(SETUP_SCRIPT)], check=True)
    client = _buildkit_client()
    return Docker(client=client, compose=_compose_command(client))


def _digest(*parts: str | bytes) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        hasher.update(len(data).to_bytes(8, "little") + data)
    return hasher.hexdigest()[:DIGEST_CHARS]


def _files_digest(paths: tuple[str, ...]) -> str:
    """Hash of the names and contents of the files under `paths` (relative to the repository)."""
    parts = []
    for name in paths:
        root = REPO / name
        files = [root] if root.is_file() else sorted(path for path in root.rglob("*") if path.is_file())
        for path in files:
            relative = path.relative_to(REPO).as_posix()
            if not any(ignored in relative for ignored in IGNORED):
                parts += [relative, path.read_bytes()]
    return _digest(*parts)


def build_base(docker: Docker) -> str:
    """Debian bookworm with python3, by debootstrap, imported as an image (apt's lists and archives dropped)."""
    recipe = (DEBIAN_SUITE, DEBIAN_MIRROR, ",".join(BASE_PACKAGES), "minbase")
    tag = f"dsexit-base:{DEBIAN_SUITE}-{_digest(*recipe)}"
    if docker.image_exists(tag):
        return tag
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dsexit-base-", dir="/var/tmp") as work:
        rootfs = Path(work) / "rootfs"
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                DEBIAN_SUITE,
                str(rootfs),
                DEBIAN_MIRROR,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        for cache in (rootfs / "var/cache/apt/archives", rootfs / "var/lib/apt/lists"):
            for path in cache.glob("*"):
                if path.is_file():
                    path.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        docker.run("import", "-c", 'CMD ["/bin/bash"]', "-", tag, stdin=tar.stdout, check=True)
        tar.stdout.close()
        if tar.wait():
            raise RuntimeError(f"tar of {rootfs} failed")
    log(f"built {tag} in {time.monotonic() - started:.0f} s")
    docker.drop_older(tag)
    return tag


def _pip_cert() -> str | None:
    """The CA bundle this machine's pip trusts (PIP_CERT, pip's config, the system bundle)."""
    configured = os.environ.get("PIP_CERT")
    if not configured:
        probe = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.cert"], capture_output=True, text=True
        )
        configured = probe.stdout.strip() if probe.returncode == 0 else None
    for path in (configured, os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if path and Path(path).is_file():
            return path
    return None


@contextmanager
def _torch_wheel_links() -> Iterator[str | None]:
    """A loopback URL listing the CPU torch wheel that this machine's pip installs offline (its
    find-links), or None where it has none (the image then reads PyTorch's CPU index itself)."""
    with tempfile.TemporaryDirectory(prefix="dsexit-wheels-", dir="/var/tmp") as wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-index", "--only-binary=:all:",
             "--python-version", PYTHON_VERSION, "-d", wheels, f"torch=={TORCH_VERSION}"],
            capture_output=True,
        )  # fmt: skip
        if not any("+cpu" in path.name for path in Path(wheels).glob("torch-*.whl")):
            yield None
            return
        handler = functools.partial(_QuietHandler, directory=wheels)
        try:  # the same URL every time: it is a build argument, so part of the build cache's key
            server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEEL_PORT), handler)
        except OSError:
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/"
        finally:
            server.shutdown()
            server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


def _build(docker: Docker, dockerfile: str, tag: str, build_args: dict[str, str]) -> None:
    command = [docker.client, "build", "--network", "host", "--progress", "plain", "-f", dockerfile, "-t", tag]
    for name, value in build_args.items():
        command += ["--build-arg", f"{name}={value}"]
    cert = _pip_cert()
    if cert:
        command += ["--secret", f"id=pip_cert,src={cert}"]
    BUILD_LOGS.mkdir(parents=True, exist_ok=True)
    log_path = BUILD_LOGS / f"{tag.replace(':', '-')}.log"
    started = time.monotonic()
    with open(log_path, "w") as output:
        result = subprocess.run(
            [*command, str(REPO)], env={**os.environ, "DOCKER_BUILDKIT": "1"}, stdout=output, stderr=subprocess.STDOUT
        )
    text = log_path.read_text(errors="replace")
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({log_path}):\n{text[-6000:]}")
    log(f"built {tag} in {time.monotonic() - started:.0f} s ({log_path}); its slow steps:")
    for step, seconds in _step_times(text):
        log(f"  {seconds:6.1f} s  {step}")
    docker.drop_older(tag)


def _step_times(build_log: str, at_least: float = 5.0) -> list[tuple[str, float]]:
    """(instruction, seconds) of the steps of a BuildKit plain-progress log that took `at_least` or more."""
    names, times = {}, {}
    for line in build_log.splitlines():
        named = re.match(r"#(\d+) \[[^\]]*\] (.*)", line)
        if named:
            names.setdefault(named.group(1), named.group(2)[:100])
        done = re.match(r"#(\d+) DONE (\d+(?:\.\d+)?)s", line)
        if done:
            times[done.group(1)] = float(done.group(2))
    return [(names[step], seconds) for step, seconds in times.items() if step in names and seconds >= at_least]


def build_node_image(docker: Docker, base: str) -> str:
    """dsexit:cpu-HASH from docker/Dockerfile.cpu."""
    dockerfile = "docker/Dockerfile.cpu"
    tag = f"dsexit:cpu-{_digest(base, TORCH_VERSION, _files_digest(NODE_IMAGE_INPUTS))}"
    if docker.image_exists(tag):
        return tag
    with _torch_wheel_links() as links:
        build_args = {"BASE_IMAGE": base, "TORCH_VERSION": TORCH_VERSION}
        if links:
            build_args |= {
                "PIP_FIND_LINKS": links,
                "TORCH_INDEX_URL": os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple",
            }
        _build(docker, dockerfile, tag, build_args)
    return tag


def build_s3_image(docker: Docker, base: str) -> str:
    """dsexit-s3:HASH from docker/Dockerfile.s3 (moto's server)."""
    dockerfile = "docker/Dockerfile.s3"
    tag = f"dsexit-s3:{_digest(base, (REPO / dockerfile).read_text())}"
    if not docker.image_exists(tag):
        _build(docker, dockerfile, tag, {"BASE_IMAGE": base})
    return tag


@dataclass(frozen=True)
class Images:
    docker: Docker
    node: str
    s3: str


def ensure_images() -> Images:
    docker = ensure_engine()
    base = build_base(docker)
    return Images(docker=docker, node=build_node_image(docker, base), s3=build_s3_image(docker, base))


if __name__ == "__main__":
    started = time.monotonic()
    images = ensure_images()
    print(f"docker_images: {images.node} {images.s3} ready in {time.monotonic() - started:.0f} s")
