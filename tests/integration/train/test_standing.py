"""The end of a run as a user reads it: the held-out verdict on the last line, criterion by criterion,
and `tau at floor` while the controller cannot lower tau any further."""

import json

from .helpers import TINY, launch


def test_last_line_states_each_criterion_and_the_floor_is_logged(tmp_path):
    run = launch(
        "python",
        tmp_path / "standing",
        [
            *TINY,
            "--max-steps",
            "6",
            "--eval-interval",
            "3",
            "--eval-samples",
            "64",
            "--save-interval",
            "100",
            "--no-export-hf",
            "--target-compute",
            "0.05",
            "--min-confidence",
            "0.9",  # the exit threshold's start: the controller wants lower at once and cannot
            "--exit-routing",
            "threshold",  # tau at its floor (a capacity level at its floor: test_capacity_controller.py)
        ],
        nproc=1,
    ).check()
    final = run.eval_metrics[6]
    rtd_holds = final["eval_rtd_loss_uniform"] <= 0.8 * final["rtd_prior_entropy"]
    auc_holds = final["eval_rtd_auc_generator"] >= 0.7
    ours = [line for line in run.output.splitlines() if "[dsexit rank 0]" in line]
    last = ours[-1]
    assert "done (finished)" in last
    learned = "the discriminator learned" if rtd_holds and auc_holds else "the discriminator has not learned"
    assert learned in last
    assert f"held-out RTD loss {final['eval_rtd_loss_uniform']:.4f} under uniform corruption" in last
    assert f"prior's {final['rtd_prior_entropy']:.4f} ({'yes' if rtd_holds else 'no'})" in last
    assert f"ROC-AUC {final['eval_rtd_auc_generator']:.3f} on its own generator's (mlm) corruption" in last
    assert f"0.7 ({'yes' if auc_holds else 'no'})" in last
    records = run.metrics
    with_exits = [step for step, record in records.items() if record["exit_threshold"] is not None]
    assert with_exits == [5, 6]  # exits after the 4 warm-up steps
    for step in with_exits:
        assert records[step]["tau_at_floor"] is True and abs(records[step]["exit_threshold"] - 0.9) < 1e-9
        assert records[step]["compute_fraction"] > 0.05
    assert records[4]["tau_at_floor"] is False
    floor_lines = [line for line in ours if line.split("] ", 1)[-1].startswith("step=") and "tau at floor" in line]
    assert [int(line.split("step=")[1].split("/")[0]) for line in floor_lines] == with_exits
    saved = json.loads((run.run_dir / "config.json").read_text())
    assert saved["train"]["exit_control"]["min_confidence"] == 0.9
