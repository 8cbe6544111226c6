"""Checkpoint mirror on any fsspec URL (s3://, gs://, memory://, ...).

DeepSpeed writes checkpoints to local files; when the checkpoint location is a URL,
the trainer stages them in RUN_DIR/checkpoints and this module copies them out: each
rank uploads the shards it wrote, then rank 0 uploads the completion marker and
`latest`, in that order, so a reader of the bucket sees a checkpoint only once it is
whole. Credentials are never handled here: fsspec finds them in the environment or
its usual configuration files.
"""

from __future__ import annotations

import os
import re

import fsspec

_RANK_FILE = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_")


def is_remote(url: str) -> bool:
    protocol, _ = fsspec.core.split_protocol(url)
    return protocol not in (None, "file", "local")


def local_path(url: str) -> str:
    """A local path for `file://` URLs and plain paths."""
    protocol, path = fsspec.core.split_protocol(url)
    return path if protocol in ("file", "local") else url


def file_owner(name: str) -> int:
    """The data-parallel rank that wrote a DeepSpeed checkpoint file (rank 0 for shared files)."""
    match = _RANK_FILE.search(name)
    return int(match.group(1)) if match else 0


class RemoteMirror:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

    def _remote(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def upload_shards(self, local_tag_dir: str, tag: str, rank: int, skip: tuple[str, ...]) -> None:
        """Upload the files of a checkpoint tag that `rank` owns (markers excluded)."""
        for dirpath, _, names in os.walk(local_tag_dir):
            for name in names:
                relative = os.path.relpath(os.path.join(dirpath, name), local_tag_dir)
                if name in skip or file_owner(name) != rank:
                    continue
                self.fs.put_file(os.path.join(dirpath, name), self._remote(tag, *relative.split(os.sep)))

    def put_text(self, relative: str, text: str) -> None:
        with self.fs.open(self._remote(relative), "w") as handle:
            handle.write(text)

    def read_text(self, relative: str) -> str | None:
        path = self._remote(relative)
        try:
            with self.fs.open(path, "r") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def tags(self) -> list[str]:
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries]

    def download(self, tag: str, local_root: str) -> str:
        target = os.path.join(local_root, tag)
        os.makedirs(target, exist_ok=True)
        self.fs.get(self._remote(tag) + "/", target + "/", recursive=True)
        return target

    def delete(self, tag: str) -> None:
        if self.fs.exists(self._remote(tag)):
            self.fs.rm(self._remote(tag), recursive=True)
