"""make bench: the cycle on a throwaway VM, timed against baselines of the same run.

Figures, each as median and spread over the runs:

- freeze: the snapshot call;
- time on the overlay (freeze to merged, less the simulated guest writes)
  against ``cp --sparse=always`` of the same images to the same destination,
  as a ratio per run (the two alternate, A B B A..., caches dropped before
  each when the kernel allows it);
- merge by commit against merge by pull, for WINDOW bytes written during
  the window into an image with DATA allocated;
- flush: writing the copied images from the page cache to disk (fsync),
  after the merge; the rest of the copy, which ``cp`` leaves to the kernel;
- helper overhead: everything that is not copy, flush, merge or the
  simulated writes (planning, journal, locks, and what the manifest adds
  beyond the flush it overlaps), per domain; also shown with the flush;
- total;
- ride-along (stage = freeze, backupninja's own .rsync action, stage = thaw,
  through the real backupninja): the time the VM spent frozen (the thaw's
  line) against the time of the ship action alone in the same backupninja
  run (two .sh actions around it note the time), as a difference per run.

Writes results/bench-STAMP.json, results/latest.json and results/latest.png.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import libvirt  # noqa: E402
import libvirt_qemu  # noqa: E402

from backupninja_kvm import config, report  # noqa: E402
from backupninja_kvm.backup import back_up_domain  # noqa: E402
from backupninja_kvm.hypervisor import Hypervisor  # noqa: E402

URI = "qemu:///system"
IMAGES = "/var/lib/libvirt/images/bnkvm-bench"
# the changed blocks' checkpoints' records go with the domain
UNDEFINE = libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
MiB = 1024 * 1024


def size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def fill_random(path: str, length: int, offset: int = 0) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        left = length
        while left:
            chunk = os.urandom(min(left, 64 * MiB))
            handle.write(chunk)
            left -= len(chunk)


def make_images(directory: str, image_size: int, data: int) -> dict[str, tuple[str, str]]:
    """vda: qcow2 of image_size with *data* random bytes; vdb: raw of the same
    size, half filled with random bytes, the rest a hole."""
    raw_seed = os.path.join(directory, "seed.raw")
    with open(raw_seed, "wb") as handle:
        handle.truncate(image_size)
    fill_random(raw_seed, data)
    vda = os.path.join(directory, "vda.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", raw_seed, vda)
    os.unlink(raw_seed)
    vdb = os.path.join(directory, "vdb.raw")
    with open(vdb, "wb") as handle:
        handle.truncate(image_size)
    fill_random(vdb, image_size // 2)
    return {"vda": (vda, "qcow2"), "vdb": (vdb, "raw")}


def domain_xml(name: str, disks: dict[str, tuple[str, str]]) -> str:
    devices = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
        f"<source file='{path}'/><target dev='{target}' bus='virtio'/></disk>"
        for target, (path, fmt) in disks.items()
    )
    return (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        f"<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>{devices}"
        f"<graphics type='vnc' autoport='yes' listen='127.0.0.1'/></devices></domain>"
    )


def drop_caches() -> bool:
    """Drop the page cache so that each copy reads from disk; False when not allowed."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return True
    except OSError:
        return False


def guest_write(domain: libvirt.virDomain, alias: str, offset: int, length: int) -> None:
    command = (
        f'qemu-io -d /machine/peripheral/{alias}/virtio-backend "write -P 0x5a {offset} {length}"'
    )
    libvirt_qemu.qemuMonitorCommand(
        domain, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
    )


def cp_baseline(paths: list[str], destination: str, cold: bool) -> float:
    os.makedirs(destination)
    if cold:
        drop_caches()
    started = time.monotonic()
    subprocess.run(["cp", "--sparse=always", *paths, destination], check=True)
    elapsed = time.monotonic() - started
    shutil.rmtree(destination)
    return elapsed


def backup_once(name, settings, window: int, image_size: int, cold: bool, stamp: str) -> dict:
    def hook(domain, _overlays):
        guest_write(domain._handle, "virtio-disk0", image_size - window, window)

    if cold:
        drop_caches()
    hypervisor = Hypervisor(URI)
    try:
        outcome = back_up_domain(hypervisor.domain(name), settings, stamp, hook)
    finally:
        hypervisor.close()
    shutil.rmtree(outcome.set_path)
    return {
        "freeze": outcome.freeze_seconds,
        "overlay": outcome.overlay_seconds - outcome.hook_seconds,
        "copy": outcome.copy_seconds,
        "merge": outcome.merge_seconds,
        # After the merge: writing the copy to disk (fsync, which cp leaves to
        # the kernel) overlaps hashing the manifest; the manifest counts only
        # for the time it adds beyond the flush.
        "flush": outcome.flush_seconds,
        "manifest": outcome.complete_seconds - outcome.flush_seconds,
        "bookkeeping": outcome.total_seconds
        - outcome.copy_seconds
        - outcome.merge_seconds
        - outcome.hook_seconds
        - outcome.complete_seconds,
        "overhead": outcome.total_seconds
        - outcome.copy_seconds
        - outcome.flush_seconds
        - outcome.merge_seconds
        - outcome.hook_seconds,
        "overhead_with_flush": outcome.total_seconds
        - outcome.copy_seconds
        - outcome.merge_seconds
        - outcome.hook_seconds,
        "total": outcome.total_seconds - outcome.hook_seconds,
        "bytes": outcome.bytes_copied,
    }


def parse_seconds(text: str) -> float:
    """The report's durations back into seconds: "0.04 s", "12.3 s", "4 min 05 s"."""
    words = text.split()
    if len(words) >= 4 and words[1] == "min":
        return int(words[0]) * 60 + float(words[2])
    return float(words[0])


def ride_along_once(name: str, scratch: str, window: int, image_size: int) -> dict:
    """One night of freeze, rsync ship and thaw through the real backupninja."""
    from tests.support.ninja import Ninja
    from tests.support.riding import freeze_text, rsync_text, thaw_text

    if os.path.exists(scratch):
        shutil.rmtree(scratch)
    os.makedirs(scratch, mode=0o700)
    ninja = Ninja(scratch)
    view = os.path.join(scratch, "view")
    dest = os.path.join(scratch, "dest")
    os.makedirs(os.path.join(dest, "host"))
    ninja.action("10-vms.kvm", freeze_text(view, name))
    alias = "virtio-disk0"
    write = f"write -P 0x5a {image_size - window} {window}"
    ninja.action(
        "15-window.sh",
        f"virsh -q qemu-monitor-command --hmp {name} "
        f"'qemu-io -d /machine/peripheral/{alias}/virtio-backend \"{write}\"'\n"
        f"date +%s.%N > {scratch}/ship-start\n",
    )
    ninja.action("20-vms.rsync", rsync_text(view, dest))
    ninja.action("25-shipped.sh", f"date +%s.%N > {scratch}/ship-end\n")
    ninja.action("90-vms.kvm", thaw_text(view))
    helper = os.path.join(os.path.dirname(sys.executable), "backupninja-kvm")
    result = ninja.run_all(helper=helper)
    thawed = [line for line in result.log.splitlines() if f"{name}: thawed: frozen " in line]
    if not thawed or result.lines("Error") or result.lines("Fatal"):
        raise RuntimeError(f"the ride-along night failed:\n{result.log}")
    frozen = parse_seconds(thawed[0].split("thawed: frozen ", 1)[1].split(",")[0])
    with open(f"{scratch}/ship-start") as start, open(f"{scratch}/ship-end") as end:
        ship = float(end.read()) - float(start.read())
    shutil.rmtree(scratch)
    return {"frozen": frozen, "ship": ship, "extra": frozen - ship}


def restore_once(name: str, settings, scratch: str, cold: bool, number: int) -> dict:
    """Back up once, restore the set as a copy (the product's restore: copy,
    check against the manifest, define), and cp the same images, in the
    same run; the copy's domain and files are removed again."""
    from backupninja_kvm import restore
    from backupninja_kvm.sets import local_set

    hypervisor = Hypervisor(URI)
    try:
        outcome = back_up_domain(hypervisor.domain(name), settings, f"20260103T0000{number:02d}")
        ref = local_set(outcome.set_path)
        images = [os.path.join(ref.path, n) for n in sorted(os.listdir(ref.path)) if "-" in n]
        target = os.path.join(scratch, f"restore-{number}")
        os.makedirs(target)
        baseline = 0.0
        if number % 2:
            baseline = cp_baseline(images, os.path.join(scratch, "cp"), cold)
        if cold:
            drop_caches()
        copy = f"{name}-r{number}"
        started = time.monotonic()
        restore.restore(hypervisor, ref, restore.Options(new_name=copy, to=target))
        elapsed = time.monotonic() - started
        if not number % 2:
            baseline = cp_baseline(images, os.path.join(scratch, "cp"), cold)
        hypervisor.domain(copy)._handle.undefineFlags(UNDEFINE)
    finally:
        hypervisor.close()
    shutil.rmtree(target)
    shutil.rmtree(outcome.set_path)
    return {"restore": elapsed, "cp": baseline, "ratio": elapsed / baseline}


def change_data(domain: libvirt.virDomain, data: int, fraction: float, seed: int) -> int:
    """Rewrite *fraction* of the first *data* bytes of vda, in 1 MiB pieces
    at distinct places; returns the bytes changed."""
    import random

    pieces = max(1, round(data / MiB * fraction))
    rng = random.Random(seed)
    for piece in rng.sample(range(data // MiB), pieces):
        command = (
            f"qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "
            f'"write -P {rng.randrange(1, 255):#x} {piece * MiB} {MiB}"'
        )
        libvirt_qemu.qemuMonitorCommand(
            domain, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
        )
    return pieces * MiB


def changed_blocks_case(
    connection, scratch: str, image_size: int, data: int, fractions, cold: bool, kinds
) -> list[dict]:
    """A qcow2 of *image_size* with *data* random bytes, backed up to each
    filesystem of *kinds* (xfs: reflinks; ext4: none):
    for each fraction, a night that copies it whole (changed_blocks = no),
    then the guest changes that fraction of its data, then a night of
    changed blocks, and cp of the image, all in this run."""
    name = f"bnkvm-bench-cb-{uuid.uuid4().hex[:6]}"
    directory = os.path.join(IMAGES, name)
    os.makedirs(directory, mode=0o755)
    disks = {"vda": make_images(directory, image_size, data)["vda"]}
    os.unlink(os.path.join(directory, "vdb.raw"))
    results = []
    try:
        domain = connection.defineXML(domain_xml(name, disks))
        domain.create()
        from tests.support.vms import loop_filesystem

        for kind in kinds:
            with loop_filesystem(scratch, 4 * image_size + 1024 * MiB, kind) as mount:
                changed_nights(
                    name, domain, disks, mount, kind, scratch, data, fractions, cold, results
                )
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            domain = connection.lookupByName(name)
            if domain.isActive():
                domain.destroy()
            domain.undefineFlags(UNDEFINE)
        shutil.rmtree(directory, ignore_errors=True)
    return results


def changed_nights(name, domain, disks, mount, kind, scratch, data, fractions, cold, results):
    """The nights of changed_blocks_case on the filesystem mounted at *mount*."""
    sets = os.path.join(mount, "sets")
    os.makedirs(sets)
    settings = {}
    for mode in ("auto", "no"):
        action = os.path.join(scratch, f"cb-{kind}-{mode}.kvm")
        with open(action, "w") as handle:
            handle.write(
                f"[source]\ndomains = {name}\n[dest]\ndirectory = {mount}/sets\n"
                f"keep = 2\nchanged_blocks = {mode}\n"
            )
        os.chmod(action, 0o600)
        settings[mode] = config.load(action)
    for number, fraction in enumerate(fractions):
        # the full night's set is the changed night's previous set
        full = backup_night(name, settings["no"], cold, f"20260104T{number:02d}0000")
        first = backup_night(name, settings["auto"], cold, f"20260104T{number:02d}0001")
        changed = change_data(domain, data, fraction, number)
        night = backup_night(name, settings["auto"], cold, f"20260104T{number:02d}0002")
        baseline = cp_baseline([disks["vda"][0]], os.path.join(mount, "cp"), cold)
        read, written = night["changes"].get("vda", (data, data))
        results.append(
            {
                "fraction": fraction,
                "filesystem": kind,
                "changed": changed,
                "hashed": night["hashed"],
                "read": read,
                "written": written,
                "changed_overlay": night["overlay"],
                "changed_total": night["total"],
                "full_overlay": full["overlay"],
                "full_total": full["total"],
                "changed_complete": night["complete"],
                "full_complete": full["complete"],
                "first_total": first["total"],
                "cp": baseline,
            }
        )
        print(
            f"changed blocks {fraction:.0%} on {kind}: {changed // MiB} MiB changed, read "
            f"{read / MiB:.1f} MiB, wrote {written / MiB:.1f} MiB; on overlay "
            f"{night['overlay']:.3f} s (full {full['overlay']:.3f} s), total "
            f"{night['total']:.3f} s (full {full['total']:.3f} s), cp {baseline:.3f} s",
            flush=True,
        )
        shutil.rmtree(sets)
        os.makedirs(sets)


def backup_night(name: str, settings, cold: bool, stamp: str) -> dict:
    """One night into a destination that keeps its sets (no window writes)."""
    if cold:
        drop_caches()
    hypervisor = Hypervisor(URI)
    try:
        outcome = back_up_domain(hypervisor.domain(name), settings, stamp)
    finally:
        hypervisor.close()
    return {
        "overlay": outcome.overlay_seconds,
        "total": outcome.total_seconds,
        "complete": outcome.complete_seconds,  # flush, manifest, rename
        "changes": dict(outcome.changes),
        "hashed": sum(outcome.hashed.values()),  # bytes the manifest's sums read
    }


def summary(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": len(values),
    }


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
        platform.processor(),
    )
    memory = next(int(line.split()[1]) // 1024 for line in meminfo if line.startswith("MemTotal"))
    filesystem = run("df", "--output=fstype", "/var/lib/libvirt/images").split()[-1]
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_mib": memory,
        "kernel": platform.release(),
        "filesystem": filesystem,
        "qemu": run("qemu-img", "--version").splitlines()[0],
        "libvirt": ".".join(str(libvirt.getVersion() // 10**i % 1000) for i in (6, 3, 0)),
    }


def chart(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = results["figures"]
    names = [
        ("cp --sparse=always", figures["cp_baseline"]),
        ("time on overlay", figures["overlay"]),
        ("copy", figures["copy"]),
        ("merge: commit", figures["merge_commit"]),
        ("merge: pull", figures["merge_pull"]),
        ("flush to disk", figures["flush"]),
        ("helper overhead", figures["overhead"]),
        ("total", figures["total"]),
    ]
    labels = [n for n, _ in names]
    medians = [f["median"] for _, f in names]
    lower = [f["median"] - f["min"] for _, f in names]
    upper = [f["max"] - f["median"] for _, f in names]
    fig, axis = plt.subplots(figsize=(9, 4.5))
    axis.barh(labels, medians, xerr=[lower, upper], color="#4a7ab5", capsize=4)
    axis.invert_yaxis()
    axis.set_xlabel("seconds (median, min-max)")
    params = results["parameters"]
    axis.set_title(
        f"backupninja-kvm: 2 disks of {params['image_size_mib']} MiB, "
        f"{params['window_mib']} MiB written during the backup "
        f"({results['machine']['cores']} cores)"
    )
    for y, (_, figure) in enumerate(names):
        axis.text(figure["max"], y, f"  {figure['median']:.2f} s", va="center")
    axis.set_xlim(0, max(f["max"] for _, f in names) * 1.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(results: dict) -> str:
    f, r = results["figures"], results["ratios"]
    rows = [
        ("freeze (snapshot)", f["freeze"]),
        ("cp --sparse=always (baseline)", f["cp_baseline"]),
        ("time on the overlay", f["overlay"]),
        ("  of which copy", f["copy"]),
        ("merge by commit", f["merge_commit"]),
        ("merge by pull", f["merge_pull"]),
        ("flush of the copy to disk (fsync)", f["flush"]),
        ("helper overhead per domain", f["overhead"]),
        ("  manifest, beyond the flush", f["manifest"]),
        ("  the rest (plan, journal, XML...)", f["bookkeeping"]),
        ("total per domain (commit)", f["total"]),
        ("restore --as (copy, check, define)", f["restore"]),
        ("  cp --sparse=always of the set", f["restore_cp"]),
    ]
    lines = [f"{'figure':34} {'median':>8} {'min':>8} {'max':>8}  runs"]
    for label, figure in rows:
        lines.append(
            f"{label:34} {figure['median']:8.3f} {figure['min']:8.3f} {figure['max']:8.3f}"
            f"  {figure['runs']}"
        )
    lines.append("")
    lines.append(
        f"time on overlay / cp baseline: median {r['overlay_vs_cp']['median']:.3f} "
        f"(min {r['overlay_vs_cp']['min']:.3f}, max {r['overlay_vs_cp']['max']:.3f}); "
        f"target <= 1.15"
    )
    lines.append(f"merge pull / commit: {r['pull_vs_commit']:.1f}x; target >= 20x")
    lines.append(
        f"helper overhead: median {f['overhead']['median']:.3f} s per domain "
        f"(B3SUMS manifest {f['manifest']['median']:.3f} s beyond the flush, the rest "
        f"{f['bookkeeping']['median']:.3f} s); target < 1 s"
    )
    lines.append(
        f"  counting the flush of the copy to disk as overhead too: median "
        f"{f['overhead_with_flush']['median']:.3f} s"
    )
    ride = f["ride_extra"]
    lines.append(
        f"ride-along: frozen time - ship time: median {ride['median']:.3f} s (min "
        f"{ride['min']:.3f}, max {ride['max']:.3f}; frozen {f['ride_frozen']['median']:.3f} s, "
        f"ship action {f['ride_ship']['median']:.3f} s); target <= 0.5 s"
    )
    restore_ratio = r["restore_vs_cp"]
    lines.append(
        f"restore / cp of the same images: median {restore_ratio['median']:.3f} (min "
        f"{restore_ratio['min']:.3f}, max {restore_ratio['max']:.3f}); target <= 1.5"
    )
    for case, ratio in zip(
        results["runs"].get("changed_blocks", []), r.get("changed_blocks", []), strict=True
    ):
        lines.append(
            f"changed blocks on {case.get('filesystem', 'xfs')}, {case['fraction']:.0%} of the "
            f"data changed "
            f"({case['changed'] // MiB} MiB): read {case['read'] / MiB:.1f} MiB, wrote "
            f"{case['written'] / MiB:.1f} MiB ({ratio['io_vs_changed']:.2f} x the change; "
            f"target <= 1.1); on the overlay {ratio['overlay_vs_full']:.3f} x and in all "
            f"{ratio['total_vs_full']:.3f} x a full night's ({case['changed_total']:.2f} s vs "
            f"{case['full_total']:.2f} s, of which flush and manifest "
            f"{case['changed_complete']:.2f} s vs {case['full_complete']:.2f} s, its sum "
            f"reading {case.get('hashed', 0) / MiB:.0f} MiB; "
            f"cp {case['cp']:.2f} s)" + ("; target <= 0.1" if case["fraction"] <= 0.01 else "")
        )
    lines.append(f"caches dropped before each copy: {results['parameters']['cold_cache']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="2G", help="image size of each disk (default 2G)")
    parser.add_argument("--data", default="1G", help="random data in the qcow2 image (1G)")
    parser.add_argument("--window", default="64M", help="written during the window (64M)")
    parser.add_argument("--runs", type=int, default=5, help="runs with merge = commit (5)")
    parser.add_argument("--pull-runs", type=int, default=3, help="runs with merge = pull (3)")
    parser.add_argument("--ride-runs", type=int, default=3, help="ride-along nights (3)")
    parser.add_argument(
        "--restore-runs", type=int, default=3, help="restores of a set as a copy (3)"
    )
    parser.add_argument(
        "--changed",
        default="0.01,0.1,0.5",
        help="fractions of the data changed per night, for the changed-blocks case "
        "(0.01,0.1,0.5; empty: none)",
    )
    parser.add_argument(
        "--changed-fs",
        default="xfs,ext4",
        help="filesystems of the changed-blocks sets: xfs (reflinks), ext4 (none) (xfs,ext4)",
    )
    parser.add_argument("--results", default=os.path.join(ROOT, "results"))
    args = parser.parse_args(argv)
    image_size, data, window = size(args.size), size(args.data), size(args.window)
    report.setup(io.StringIO())  # the figures are the output, not the report lines

    name = f"bnkvm-bench-{uuid.uuid4().hex[:6]}"
    directory = os.path.join(IMAGES, name)
    os.makedirs(directory, mode=0o755)
    os.chmod(IMAGES, 0o755)
    destination = tempfile.mkdtemp(prefix="bnkvm-bench-", dir="/var/tmp")
    connection = libvirt.open(URI)
    cold = drop_caches()
    try:
        print(f"preparing {name}: images of {args.size}, {args.data} random data ...", flush=True)
        disks = make_images(directory, image_size, data)
        domain = connection.defineXML(domain_xml(name, disks))
        domain.create()
        action = os.path.join(destination, "bench.kvm")
        with open(action, "w") as handle:
            handle.write(
                f"[general]\nmerge = commit\n[source]\ndomains = {name}\n"
                f"[dest]\ndirectory = {destination}\nkeep = 1\n"
            )
        commit_settings = config.load(action)
        runs, baselines, ratios = [], [], []
        for number in range(args.runs):
            stamp = f"20260101T0000{number:02d}"
            paths = [p for p, _ in disks.values()]
            if number % 2 == 0:
                baseline = cp_baseline(paths, os.path.join(destination, "cp"), cold)
                measured = backup_once(name, commit_settings, window, image_size, cold, stamp)
            else:
                measured = backup_once(name, commit_settings, window, image_size, cold, stamp)
                baseline = cp_baseline(paths, os.path.join(destination, "cp"), cold)
            runs.append(measured)
            baselines.append(baseline)
            ratios.append(measured["overlay"] / baseline)
            print(
                f"commit run {number + 1}: on overlay {measured['overlay']:.3f} s, "
                f"cp {baseline:.3f} s, merge {measured['merge']:.3f} s",
                flush=True,
            )
        pull_settings = dataclasses.replace(commit_settings, merge="pull")
        pulls = []
        for number in range(args.pull_runs):
            measured = backup_once(
                name, pull_settings, window, image_size, cold, f"20260102T0000{number:02d}"
            )
            pulls.append(measured)
            print(f"pull run {number + 1}: merge {measured['merge']:.3f} s", flush=True)

        rides = []
        for number in range(args.ride_runs):
            measured = ride_along_once(name, os.path.join(destination, "ride"), window, image_size)
            rides.append(measured)
            print(
                f"ride-along run {number + 1}: frozen {measured['frozen']:.3f} s, ship action "
                f"{measured['ship']:.3f} s",
                flush=True,
            )

        restores = []
        for number in range(args.restore_runs):
            measured = restore_once(name, commit_settings, destination, cold, number)
            restores.append(measured)
            print(
                f"restore run {number + 1}: restore {measured['restore']:.3f} s, "
                f"cp {measured['cp']:.3f} s",
                flush=True,
            )

        fractions = [float(f) for f in args.changed.split(",") if f.strip()]
        changes = changed_blocks_case(
            connection,
            os.path.join(destination, "cb"),
            image_size,
            data,
            fractions,
            cold,
            [k for k in args.changed_fs.split(",") if k.strip()],
        )

        def figure(key, source=runs):
            return summary([r[key] for r in source])

        figures = {
            "freeze": figure("freeze"),
            "cp_baseline": summary(baselines),
            "overlay": figure("overlay"),
            "copy": figure("copy"),
            "merge_commit": figure("merge"),
            "merge_pull": figure("merge", pulls),
            "flush": figure("flush"),
            "overhead": figure("overhead"),
            "manifest": figure("manifest"),
            "bookkeeping": figure("bookkeeping"),
            "overhead_with_flush": figure("overhead_with_flush"),
            "total": figure("total"),
            "ride_frozen": figure("frozen", rides),
            "ride_ship": figure("ship", rides),
            "ride_extra": figure("extra", rides),
            "restore": figure("restore", restores),
            "restore_cp": figure("cp", restores),
        }
        results = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": machine(),
            "parameters": {
                "image_size_mib": image_size // MiB,
                "qcow2_data_mib": data // MiB,
                "raw_data_mib": image_size // 2 // MiB,
                "window_mib": window // MiB,
                "commit_runs": args.runs,
                "pull_runs": args.pull_runs,
                "ride_runs": args.ride_runs,
                "restore_runs": args.restore_runs,
                "cold_cache": cold,
            },
            "figures": figures,
            "ratios": {
                "overlay_vs_cp": summary(ratios),
                "pull_vs_commit": figures["merge_pull"]["median"]
                / figures["merge_commit"]["median"],
                "restore_vs_cp": summary([r["ratio"] for r in restores]),
                "changed_blocks": [
                    {
                        "fraction": c["fraction"],
                        "filesystem": c["filesystem"],
                        "io_vs_changed": (c["read"] + c["written"]) / (2 * c["changed"]),
                        "overlay_vs_full": c["changed_overlay"] / c["full_overlay"],
                        "total_vs_full": c["changed_total"] / c["full_total"],
                    }
                    for c in changes
                ],
            },
            "runs": {
                "commit": runs,
                "pull": pulls,
                "cp_baseline": baselines,
                "ride": rides,
                "restore": restores,
                "changed_blocks": changes,
            },
        }
        os.makedirs(args.results, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for path in (f"bench-{stamp}.json", "latest.json"):
            with open(os.path.join(args.results, path), "w") as handle:
                json.dump(results, handle, indent=1)
        text = table(results)
        with open(os.path.join(args.results, "latest.txt"), "w") as handle:
            handle.write(text + "\n")
        chart(results, os.path.join(args.results, "latest.png"))
        print()
        print(f"machine: {results['machine']}")
        print(text)
        print(f"\nwritten: {args.results}/latest.json, latest.txt, latest.png")
        return 0
    finally:
        try:
            domain = connection.lookupByName(name)
            if domain.isActive():
                domain.destroy()
            domain.undefineFlags(UNDEFINE)
        except libvirt.libvirtError:
            pass
        connection.close()
        shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(destination, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(IMAGES)  # only when no other benchmark uses it


if __name__ == "__main__":
    sys.exit(main())
