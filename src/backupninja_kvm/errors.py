"""The project's user-facing error types.

Each is raised where the problem is understood, with the domain, disk, file or
key concerned and what to do next, and reported once at the top.
"""


class BackupNinjaKvmError(Exception):
    """Base class: a problem to report on one line, never with a traceback."""


class ConfigError(BackupNinjaKvmError):
    """The action file is invalid; carries every problem found."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: " + "; ".join(problems))


class HypervisorError(BackupNinjaKvmError):
    """libvirt refused or failed; ``code`` is libvirt's error code when known,
    ``reason`` libvirt's own message (without what we were doing)."""

    def __init__(self, message: str, code: int | None = None, reason: str = "") -> None:
        self.code = code
        self.reason = reason or message
        super().__init__(message)


class DomainError(BackupNinjaKvmError):
    """This domain's backup failed, and the domain runs on its own images."""


class OverlayLeftError(BackupNinjaKvmError):
    """This domain still runs on one of our overlays: report as Fatal."""


class TransferError(BackupNinjaKvmError):
    """Copying to the destination, or reaching it, failed; ``status`` is the
    exit status of ssh or rsync when one failed."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)
