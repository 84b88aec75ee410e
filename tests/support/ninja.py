"""Running the real backupninja on a scratch configuration.

The scratch backupninja.conf points scriptdirectory at this checkout's
handlers/ and logs to a scratch file, so nothing under /etc/backup.d or
/usr/share/backupninja is touched; the handler finds the helper through
BACKUPNINJA_KVM (the checkout's venv).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

from tests.support.cli import HELPER

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HANDLERS = os.path.join(ROOT, "handlers")


@dataclass
class NinjaRun:
    returncode: int
    output: str
    log: str

    def lines(self, prefix: str) -> list[str]:
        return [line for line in self.log.splitlines() if f" {prefix}: " in f" {line}"]


class Ninja:
    def __init__(self, scratch: str, extra_conf: str = "") -> None:
        self.scratch = scratch
        self.configdir = os.path.join(scratch, "backup.d")
        os.makedirs(self.configdir, mode=0o700, exist_ok=True)
        self.logfile = os.path.join(scratch, "backupninja.log")
        self.conf = os.path.join(scratch, "backupninja.conf")
        with open(self.conf, "w") as handle:
            handle.write(
                f"loglevel = 5\nreportemail =\nreportsuccess = no\nreportwarning = no\n"
                f"logfile = {self.logfile}\nconfigdirectory = {self.configdir}\n"
                f"scriptdirectory = {HANDLERS}\nlibdirectory = /usr/lib/backupninja\n"
                f"usecolors = no\n{extra_conf}"
            )

    def action(self, name: str, text: str) -> str:
        path = os.path.join(self.configdir, name)
        with open(path, "w") as handle:
            handle.write(text)
        os.chmod(path, 0o600)
        return path

    def run(self, action: str, *options: str, helper: str = HELPER) -> NinjaRun:
        if os.path.exists(self.logfile):
            os.unlink(self.logfile)
        env = dict(os.environ, BACKUPNINJA_KVM=helper)
        result = subprocess.run(
            ["backupninja", "-f", self.conf, *options, "--now", "--run", action],
            capture_output=True,
            text=True,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        with open(self.logfile) as handle:
            log = handle.read()
        return NinjaRun(result.returncode, result.stdout + result.stderr, log)
