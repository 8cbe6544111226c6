"""Put a dataset into the job's bucket once: the compose job's `s3-init` service.

    python docker/seed_s3.py s3://dsexit/data [SOURCE]

SOURCE (any fsspec URL or path) defaults to the corpus embedded in dsexit. The S3 endpoint and
credentials come from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...). A dataset
already there (its index.json) is left alone, so restarting the job does not rewrite it.
"""

from __future__ import annotations

import sys

import fsspec


def main(target: str, source: str | None = None) -> int:
    from dsexit.data import DEFAULT_DATA_URL

    source = source or DEFAULT_DATA_URL
    fs, root = fsspec.core.url_to_fs(target)
    if fs.exists(f"{root}/index.json"):
        print(f"seed_s3.py: {target} already holds a dataset")
        return 0
    bucket = root.split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    source_fs, source_root = fsspec.core.url_to_fs(source)
    names = sorted(path.rsplit("/", 1)[-1] for path in source_fs.ls(source_root, detail=False))
    for name in sorted(names, key=lambda name: name == "index.json"):  # the index last: a reader sees a whole dataset
        with source_fs.open(f"{source_root}/{name}", "rb") as reader, fs.open(f"{root}/{name}", "wb") as writer:
            writer.write(reader.read())
    print(f"seed_s3.py: copied {len(names)} files from {source} to {target}")
    return 0


if __name__ == "__main__":
    if not 2 <= len(sys.argv) <= 3:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
