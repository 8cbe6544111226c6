"""Optional features name the extra that provides them: one error line, exit code 2, before any work."""

from __future__ import annotations

import sys


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if "error:" in line]


def test_hf_inputs_without_datasets_name_the_hf_extra(monkeypatch, capsys, tmp_path):
    from dsexit.commands.prepare_data import main

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    code = main(["--input", "hf:some/dataset", "--out", str(tmp_path / "out"), "--tokenizer", "train:1000"])
    (line,) = _error_lines(capsys)
    assert code == 2 and "pip install 'dsexit[hf]'" in line and "hf:some/dataset" in line
    assert not (tmp_path / "out").exists()


def test_plots_without_matplotlib_name_the_plot_extra(monkeypatch, capsys, tmp_path):
    from dsexit.commands.plot_run import main

    (tmp_path / "metrics.jsonl").write_text("")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code = main([str(tmp_path)])
    (line,) = _error_lines(capsys)
    assert code == 2 and "pip install 'dsexit[plot]'" in line
