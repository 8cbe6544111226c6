"""Benchmark: can the streaming reader feed electra-small on this machine?

Measures, side by side:
  - samples/s streamed from a local S3 server (moto_server started here, fresh cache)
  - samples/s streamed from local disk (fresh cache)
  - samples/s the trainer consumes: electra-small forward+backward+AdamW, batch 32 x 128,
    bf16 autocast on CPU
  - data_wait_pct: share of a training-like loop (S3 reader + real model step) spent blocked in next()

Prints a table, writes bench/results/data_stream.json, and ends with
    RESULT data_stream s3_vs_consumption=<ratio> data_wait_pct=<percent>
Usage: python bench/data_stream.py [--steps 12] [--stream-samples 18000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import fsspec
import torch

from dsexit.data import DEFAULT_DATA_URL, DatasetIndex, StreamingShardReader

RESULTS = Path(__file__).resolve().parent / "results" / "data_stream.json"
BATCH, SEQ_LEN = 32, 128


def start_moto(workdir: str) -> tuple[subprocess.Popen, dict]:
    executable = shutil.which("moto_server")
    if executable is None:
        sys.exit("moto_server not found: pip install -e '.[test]'")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    log = open(os.path.join(workdir, "moto.log"), "wb")
    server = subprocess.Popen([executable, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    return server, {"client_kwargs": {"endpoint_url": endpoint}}


def stream_rate(url: str, num_samples: int, cache_dir: str, storage_options=None) -> float:
    """Samples/s pulled through the reader as fast as possible, from a cold cache."""
    with StreamingShardReader(
        url, global_batch_size=BATCH, micro_batch_size=BATCH, cache_dir=cache_dir, storage_options=storage_options
    ) as reader:
        started, taken = time.perf_counter(), 0
        while taken < num_samples:
            taken += next(reader)["input_ids"].shape[0]
        return taken / (time.perf_counter() - started)


def build_model(vocab_size: int):
    from dsexit.model import ElectraExitConfig, ElectraPreTrainingModel

    model = ElectraPreTrainingModel(ElectraExitConfig.from_preset("electra-small", vocab_size=vocab_size))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def train_step(model, optimizer, batch) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"]
        ).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def training_loop(model, optimizer, reader, steps: int) -> tuple[float, float]:
    """(consumed samples/s, % of wall time blocked in next()) over `steps` model steps."""
    waited = 0.0
    started = time.perf_counter()
    for _ in range(steps):
        before = time.perf_counter()
        batch = next(reader)
        waited += time.perf_counter() - before
        train_step(model, optimizer, batch)
    elapsed = time.perf_counter() - started
    return steps * BATCH / elapsed, 100.0 * waited / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="model steps in the training-like loop")
    parser.add_argument("--stream-samples", type=int, default=18000, help="samples pulled per streaming measurement")
    args = parser.parse_args()
    torch.manual_seed(0)
    index = DatasetIndex.load(DEFAULT_DATA_URL)
    workdir = tempfile.mkdtemp(prefix="dsexit-bench-")
    server, storage_options = start_moto(workdir)
    try:
        fs = fsspec.filesystem("s3", **storage_options)
        fs.mkdir("bench")
        fs.put(f"{DEFAULT_DATA_URL}/", "bench/default", recursive=True)
        s3_url = "s3://bench/default"

        disk_rate = stream_rate(DEFAULT_DATA_URL, args.stream_samples, os.path.join(workdir, "cache-disk"))
        s3_rate = stream_rate(s3_url, args.stream_samples, os.path.join(workdir, "cache-s3"), storage_options)

        model, optimizer = build_model(index.vocab_size)
        warm = StreamingShardReader(DEFAULT_DATA_URL, global_batch_size=BATCH, micro_batch_size=BATCH, seed=1)
        train_step(model, optimizer, next(warm))  # first step pays one-time allocation costs
        warm.close()
        with StreamingShardReader(
            s3_url,
            global_batch_size=BATCH,
            micro_batch_size=BATCH,
            seed=2,
            cache_dir=os.path.join(workdir, "cache-train"),
            storage_options=storage_options,
        ) as reader:
            consumption_rate, wait_pct = training_loop(model, optimizer, reader, args.steps)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(workdir, ignore_errors=True)

    rows = [
        ("stream from S3 (moto, 127.0.0.1, cold cache)", s3_rate),
        ("stream from local disk (cold cache)", disk_rate),
        ("trainer consumption, electra-small fwd+bwd+AdamW bf16", consumption_rate),
    ]
    ratio = s3_rate / consumption_rate
    print(
        f"dataset: packaged default, {index.num_samples} samples x {index.seq_len}, {len(index.shards)} shards; "
        f"batch {BATCH}; torch threads {torch.get_num_threads()}"
    )
    print(f"{'source':<56}{'samples/s':>12}{'x consumption':>15}")
    for name, rate in rows:
        print(f"{name:<56}{rate:>12.1f}{rate / consumption_rate:>15.1f}")
    print(f"{'data_wait_pct (S3 reader inside the training loop)':<56}{wait_pct:>11.3f}%")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "s3_samples_per_s": s3_rate,
                "disk_samples_per_s": disk_rate,
                "consumption_samples_per_s": consumption_rate,
                "s3_vs_consumption": ratio,
                "data_wait_pct": wait_pct,
                "batch": BATCH,
                "seq_len": index.seq_len,
                "model_steps": args.steps,
                "stream_samples": args.stream_samples,
                "torch_threads": torch.get_num_threads(),
                "machine": f"{os.cpu_count()} cores, CPU",
            },
            indent=1,
        )
        + "\n"
    )
    print(f"RESULT data_stream s3_vs_consumption={ratio:.1f} data_wait_pct={wait_pct:.3f}")


if __name__ == "__main__":
    main()
