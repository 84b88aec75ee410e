"""A real sshd on 127.0.0.1, root login by key only, for remote destinations."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass


@dataclass
class SshServer:
    port: int
    key: str  # the client's private key
    process: subprocess.Popen

    @property
    def options(self) -> str:
        return (
            f"-i {self.key} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
            f"-o LogLevel=ERROR"
        )

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(directory: str) -> SshServer:
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation
    host_key = os.path.join(directory, "host_key")
    client_key = os.path.join(directory, "client_key")
    for key in (host_key, client_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    authorized = os.path.join(directory, "authorized_keys")
    with open(client_key + ".pub") as source, open(authorized, "w") as target:
        target.write(source.read())
    os.chmod(authorized, 0o600)
    port = free_port()
    config = os.path.join(directory, "sshd_config")
    with open(config, "w") as handle:
        handle.write(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"AuthorizedKeysFile {authorized}\nPermitRootLogin prohibit-password\n"
            f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            f"StrictModes no\nPidFile {directory}/sshd.pid\n"
            f"Subsystem sftp internal-sftp\n"
        )
    process = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-e", "-f", config],
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(directory, "sshd.log"), "w"),  # noqa: SIM115
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return SshServer(port, client_key, process)
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    log = open(os.path.join(directory, "sshd.log")).read()  # noqa: SIM115
    raise RuntimeError(f"sshd did not start: {log}")
