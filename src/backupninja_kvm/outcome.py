"""What the backup of one domain did: the summary line and the timings."""

from __future__ import annotations

from dataclasses import dataclass, field

from backupninja_kvm.report import human_bytes, seconds


@dataclass
class Outcome:
    """What a backup of one domain did, for the summary line."""

    name: str
    disks: list[str] = field(default_factory=list)
    bytes_copied: int = 0  # data copied; for a remote set, bytes rsync sent over the wire
    remote: bool = False  # the summary then says "sent"
    overlay_seconds: float = 0.0  # from the freeze until verified back on its images
    merge: str = ""
    merge_seconds: float = 0.0
    freeze_seconds: float = 0.0  # the snapshot call
    freeze_time: float = 0.0  # the snapshot's instant (time.time()), or the shut-off copy's start
    copy_seconds: float = 0.0
    hook_seconds: float = 0.0  # the tests' and the benchmark's window hook
    quiesced: int | None = None  # guest filesystems frozen for the snapshot
    complete_seconds: float = 0.0  # flush, checksums, manifest, rename, prune
    flush_seconds: float = 0.0  # of which writing the copy to disk (fsync), local sets
    total_seconds: float = 0.0
    set_path: str = ""
    live: bool = True
    verified: bool = False  # [dest] verify = yes, and the new set passed
    rehearsed: bool | None = None  # [dest] rehearse = yes: whether the new set booted
    rehearse_seconds: float = 0.0
    problems: list[str] = field(default_factory=list)  # Error lines; the set is still good
    # changed blocks: target -> (bytes read, bytes written) of each disk made
    # from the previous set and its changes; the other disks were copied whole
    changes: dict[str, tuple[int, int]] = field(default_factory=dict)
    # image name -> bytes its sum read (b3tree; the rest was the previous set's)
    hashed: dict[str, int] = field(default_factory=dict)
    copied: dict[str, int] = field(default_factory=dict)  # file in the set -> bytes copied whole

    def summary(self) -> str:
        disks = ", ".join(self.disks) or "no disk"
        verb = "sent" if self.remote else "copied"
        text = f"{self.name}: backed up {disks}, {human_bytes(self.bytes_copied)} {verb}"
        if self.changes:
            text += " (" + "; ".join(
                f"{target} changed blocks only: {human_bytes(read)} read, "
                f"{human_bytes(written)} written"
                for target, (read, written) in sorted(self.changes.items())
            )
            whole = [d for d in self.disks if d not in self.changes]
            text += f"; {', '.join(whole)} whole)" if whole else ")"
        if self.live:
            text += (
                f", {'quiesced' if self.quiesced is not None else 'crash-consistent'}"
                f", {seconds(self.overlay_seconds)} on the overlay"
                f", {self.merge} merge in {seconds(self.merge_seconds)}"
            )
        else:
            text += " (shut off, copied without snapshot)"
        proofs = ["verified"] if self.verified else []
        if self.rehearsed:
            proofs.append(f"booted in {seconds(self.rehearse_seconds)}")
        return text + f", set {self.set_path}" + (f" ({', '.join(proofs)})" if proofs else "")
