"""Running the real backupninja on a scratch configuration.

The scratch backupninja.conf points scriptdirectory at a scratch folder of
symlinks (backupninja's own handlers, and this checkout's kvm) and logs to
a scratch file, so nothing under /etc/backup.d or /usr/share/backupninja is
touched; the handler finds the helper through
BACKUPNINJA_KVM (the checkout's venv).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

from tests.support.cli import HELPER

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HANDLERS = os.path.join(ROOT, "handlers")
SHIPPED = "/usr/share/backupninja"


@dataclass
class NinjaRun:
    returncode: int
    output: str
    log: str

    def lines(self, prefix: str) -> list[str]:
        return [line for line in self.log.splitlines() if f" {prefix}: " in f" {line}"]


class Ninja:
    def __init__(self, scratch: str, extra_conf: str = "", kvm_handlers: str = HANDLERS) -> None:
        """*kvm_handlers*: the folder of the kvm handler and kvm.helper to run
        (this checkout's by default; SHIPPED for an installed package's)."""
        self.scratch = scratch
        self.configdir = os.path.join(scratch, "backup.d")
        os.makedirs(self.configdir, mode=0o700, exist_ok=True)
        self.logfile = os.path.join(scratch, "backupninja.log")
        self.conf = os.path.join(scratch, "backupninja.conf")
        # backupninja's own handlers (sh, rsync, borg, restic...) and this
        # checkout's kvm, as an installed system has them side by side
        self.scriptdir = os.path.join(scratch, "handlers")
        os.makedirs(self.scriptdir, exist_ok=True)
        for name in os.listdir(SHIPPED):
            if name not in ("kvm", "kvm.helper") or kvm_handlers == SHIPPED:
                os.symlink(os.path.join(SHIPPED, name), os.path.join(self.scriptdir, name))
        for name in ("kvm", "kvm.helper"):
            if kvm_handlers != SHIPPED:
                os.symlink(os.path.join(kvm_handlers, name), os.path.join(self.scriptdir, name))
        with open(self.conf, "w") as handle:
            handle.write(
                f"loglevel = 5\nreportemail =\nreportsuccess = no\nreportwarning = no\n"
                f"logfile = {self.logfile}\nconfigdirectory = {self.configdir}\n"
                f"scriptdirectory = {self.scriptdir}\nlibdirectory = /usr/lib/backupninja\n"
                f"usecolors = no\n{extra_conf}"
            )

    def action(self, name: str, text: str) -> str:
        path = os.path.join(self.configdir, name)
        with open(path, "w") as handle:
            handle.write(text)
        os.chmod(path, 0o600)
        return path

    def run(self, action: str, *options: str, helper: str = HELPER) -> NinjaRun:
        """``backupninja --now --run ACTION``: that action alone."""
        return self._run([*options, "--now", "--run", action], helper)

    def run_all(
        self,
        *options: str,
        helper: str = HELPER,
        env: dict[str, str] | None = None,
        now: bool = True,
    ) -> NinjaRun:
        """``backupninja --now``: every action of the folder, in backupninja's
        order; with *now* False, each action only when its ``when`` matches."""
        return self._run([*options, *(["--now"] if now else [])], helper, env)

    def _run(self, options: list[str], helper: str, env: dict[str, str] | None = None) -> NinjaRun:
        if os.path.exists(self.logfile):
            os.unlink(self.logfile)
        env = dict(env or os.environ, BACKUPNINJA_KVM=helper)
        result = subprocess.run(
            ["backupninja", "-f", self.conf, *options],
            capture_output=True,
            text=True,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        with open(self.logfile) as handle:
            log = handle.read()
        return NinjaRun(result.returncode, result.stdout + result.stderr, log)
