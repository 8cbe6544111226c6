"""Who is in the job, and what happens when that changes.

distributed.py   the process's set-up (`setup_process`: the accelerator, on a CPU the one door to
                 `dsexit.cpu`), ranks from deepspeed / torchrun / mpirun, CPU threads, the process
                 group and its roster of nodes, the collectives the checkpoint code shares, the
                 sentence that names a lost node
heartbeat.py     every node's beat on the job's store: a node that vanishes is lost within
                 --heartbeat-timeout, so survivors exit (code 3) and an elastic agent re-forms the job
membership.py    RUN_DIR/membership.json: the world a node's last worker ran in and why it stopped,
                 so a restarted worker can say which nodes left or joined and how many steps it redoes
preemption.py    SIGTERM / SIGINT, or the launcher gone -> checkpoint and clean exit
"""
