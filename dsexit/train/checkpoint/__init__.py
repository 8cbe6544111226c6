"""Checkpoints of a run: what one is on disk, saving and resuming it, its mirror, its run.

What lives where:
    files.py      the layout: tags, the completion marker, file digests, `latest`; reading
                  and verifying checkpoints here and the markers on a mirror
    resume.py     the one rule that chooses the checkpoint to resume (read by resolution,
                  applied on every node by the manager), downloads and checks on every node
    manager.py    CheckpointManager: registered state, save, load; calls the three below
    mirror.py     uploads to the mirror after a save, its `latest`
    retention.py  which checkpoints are kept, here and on the mirror; plain functions
    store.py      the object-store operations of a mirror, and the write probe every location passes
    universal.py  resume at another data-parallel size via ds_to_universal (its done-marker verified)
    rundir.py     run identity: RUN_DIR/dsexit_run.json and what a new start may do with a used directory
    signing.py    signed markers: the key file, the HMAC over a marker's content, its check
    lease.py      one trainer per remote checkpoint directory: the lease object and its fencing token
"""
