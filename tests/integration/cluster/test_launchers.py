"""`deepspeed --hostfile` over pdsh/ssh to two hosts, with real processes: an sshd in each
network namespace, a filesystem both share. (`mpirun` is exercised by
tests/train/test_launchers.py::test_zero3_mpirun_trains_and_resumes_exactly.)
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

from tests.helpers import REPO
from tests.helpers.servers import free_port
from tests.integration.cluster.conftest import TINY_RUN, VENV_BIN, node_env, read_log, wait_all


class SshHosts:
    """An sshd per node (root login with a throwaway key) and an `ssh` on PATH that uses it,
    so that DeepSpeed's ssh check and pdsh's ssh module work without touching ~/.ssh."""

    def __init__(self, hosts, tmp: Path):
        self.tmp, self.bin = tmp, tmp / "bin"
        self.bin.mkdir()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "client_key")], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "host_key")], check=True)
        (tmp / "authorized_keys").write_text((tmp / "client_key.pub").read_text())
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
        self.port = 22 if hosts.mode == "netns" else free_port()
        # In loopback mode both "hosts" are this machine under two names.
        self.names = [node.address for node in hosts.nodes] if hosts.mode == "netns" else ["localhost", "127.0.0.1"]
        (tmp / "ssh_config").write_text(
            textwrap.dedent(f"""\
            Host *
                IdentityFile {tmp}/client_key
                Port {self.port}
                StrictHostKeyChecking no
                UserKnownHostsFile /dev/null
                BatchMode yes
                LogLevel ERROR
            """)
        )
        ssh = self.bin / "ssh"
        ssh.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {tmp}/ssh_config "$@"\n')
        ssh.chmod(0o755)
        config = tmp / "sshd_config"
        config.write_text(
            textwrap.dedent(f"""\
            Port {self.port}
            HostKey {tmp}/host_key
            AuthorizedKeysFile {tmp}/authorized_keys
            PermitRootLogin prohibit-password
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            UsePAM no
            StrictModes no
            PidFile none
            """)
        )
        servers = hosts.nodes if hosts.mode == "netns" else hosts.nodes[:1]
        for node in servers:
            node.start(
                ["/usr/sbin/sshd", "-D", "-e", "-f", str(config), "-o", f"ListenAddress={node.address}"],
                tmp / f"sshd-{node.rank}.log",
                env=dict(os.environ),
            )
        for name in self.names:  # wait until each answers
            for _ in range(50):
                probe = subprocess.run(hosts.nodes[0].prefix + [str(ssh), name, "true"], capture_output=True)
                if probe.returncode == 0:
                    break
                subprocess.run(["sleep", "0.2"])
            else:
                raise RuntimeError(f"sshd on {name} did not answer: {probe.stderr.decode()}")


def test_hostfile_pdsh_two_hosts(two_hosts, tmp_path):
    """`deepspeed --hostfile` (pdsh over ssh) starts one rank on each host; checkpoints on the shared filesystem."""
    print(two_hosts.describe())
    missing = [path for path in ("/usr/bin/pdsh", "/usr/sbin/sshd", "/usr/bin/ssh-keygen") if not Path(path).exists()]
    assert not missing, f"{missing} missing: scripts/setup_system.sh installs pdsh and openssh"
    ssh = SshHosts(two_hosts, tmp_path)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{name} slots=1\n" for name in ssh.names))
    # pdsh's remote shells get only DeepSpeed's exports and .deepspeed_env (from the working directory).
    node0 = two_hosts.nodes[0]
    (tmp_path / ".deepspeed_env").write_text(
        f"DS_ACCELERATOR=cpu\nOMP_NUM_THREADS=1\nGLOO_SOCKET_IFNAME={node0.interface}\n"
    )
    run_dir = tmp_path / "run"
    command = [
        str(VENV_BIN / "deepspeed"),
        "--hostfile",
        str(hostfile),
        "--master_addr",
        node0.address,
        "--master_port",
        str(29600 if two_hosts.mode == "netns" else free_port()),
        str(REPO / "launch" / "pretrain.py"),
        "--deepspeed",
        str(REPO / "ds_configs" / "zero2.json"),
        "--run-dir",
        str(run_dir),
        "--max-steps",
        "3",
        "--save-interval",
        "3",
        *TINY_RUN,
    ]
    env = node_env(node0, PATH=f"{ssh.bin}:{VENV_BIN}:{os.environ.get('PATH', '')}")
    log = tmp_path / "pdsh.log"
    launcher = node0.start(command, log, env, cwd=str(tmp_path))
    [code] = wait_all([launcher], 240)
    text = read_log(log)
    assert code == 0, text[-5000:]
    assert "pdsh -S -f 1024 -w " + ",".join(ssh.names) in text  # DeepSpeed's pdsh runner ran it
    config = json.loads((run_dir / "config.json").read_text())  # the resolved config rank 0 saved
    assert config["derived"]["world_size"] == 2 and config["derived"]["launcher"] == "env"
    assert "step=3/3" in text and (run_dir / "checkpoints" / "global_step3" / "dsexit_checkpoint.json").exists()
    # Each host's rank wrote its own ZeRO-2 optimizer shard into the shared checkpoint.
    assert len(list((run_dir / "checkpoints" / "global_step3").glob("*zero_pp_rank_*optim_states.pt"))) == 2
