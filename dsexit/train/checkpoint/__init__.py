"""Checkpoints of a run: what one is on disk, saving and resuming it, its mirror, its run.

What lives where:
    files.py      the layout: tags, the completion marker, file digests, `latest`, which
                  checkpoint a resume takes; reading only
    manager.py    CheckpointManager: registered state, save, load, resume choice, mirror, retention
    store.py      the mirror on fsspec URLs, and the write probe every location passes
    universal.py  resume at another data-parallel size via ds_to_universal
    rundir.py     run identity: RUN_DIR/dsexit_run.json and what a new start may do with a used directory
"""
