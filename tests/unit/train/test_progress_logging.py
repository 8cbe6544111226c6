"""While the training bar is live, log lines go through tqdm (tqdm.contrib.logging) to the console and
still reach train.log; after the run the console handler is the plain one again."""

from __future__ import annotations

import logging

from dsexit.train.cluster.distributed import WorldInfo
from dsexit.train.metrics import LOG_FILE, MetricsLogger, setup_logging


def test_log_lines_print_above_a_live_bar_and_reach_the_log_file(tmp_path, capsys):
    world = WorldInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, launcher="single")
    setup_logging(world, str(tmp_path))
    log = logging.getLogger("dsexit")
    plain_console = [handler for handler in log.handlers if not isinstance(handler, logging.FileHandler)]
    metrics = MetricsLogger(str(tmp_path), world, total_steps=10, start_step=0, log_interval=1, progress="bar")
    try:
        live = [type(handler).__module__ for handler in log.handlers if not isinstance(handler, logging.FileHandler)]
        assert live == ["tqdm.contrib.logging"]
        log.info("checkpoint saved while the bar is live")
    finally:
        metrics.close()
    assert [handler for handler in log.handlers if not isinstance(handler, logging.FileHandler)] == plain_console
    assert "checkpoint saved while the bar is live" in capsys.readouterr().out
    assert "checkpoint saved while the bar is live" in (tmp_path / LOG_FILE).read_text()
    for handler in log.handlers:
        handler.close()
    log.handlers.clear()
