"""Which accelerator QEMU can really use here: KVM where a guest boots under it, TCG otherwise.

Opening /dev/kvm is not proof: a PVM nested hypervisor ("kvm_pvm") creates VMs happily, then
every stock guest kernel dies in its instruction emulator. So KVM counts as usable only when the
host has hardware virtualisation and a probe boot of our own kernel reached the agent.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from matchlock.errors import MatchlockError
from matchlock.paths import cache_dir

ACCELS = ("auto", "kvm", "tcg")


@dataclass(frozen=True)
class KvmStatus:
    usable: bool
    reason: str


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    return set(m.group(1).split()) if m else set()


def kvm_precheck() -> KvmStatus:
    """What the host says about KVM before any probe boot."""
    if not os.path.exists("/dev/kvm"):
        return KvmStatus(False, "/dev/kvm does not exist (no KVM module loaded)")
    if Path("/sys/module/kvm_pvm").exists():
        return KvmStatus(
            False,
            "/dev/kvm is the kvm_pvm nested hypervisor (no VMX/SVM): stock guest kernels "
            "crash under it",
        )
    if not _cpu_flags() & {"vmx", "svm"}:
        return KvmStatus(False, "the CPU exposes neither vmx nor svm")
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return KvmStatus(False, f"cannot open /dev/kvm: {e.strerror}")
    os.close(fd)
    return KvmStatus(True, "hardware virtualisation and /dev/kvm available")


def _probe_cache(key: str) -> Path:
    return cache_dir() / "accel" / f"kvm-probe-{key}.json"


def cached_probe(key: str) -> KvmStatus | None:
    try:
        data = json.loads(_probe_cache(key).read_text())
        return KvmStatus(bool(data["usable"]), str(data["reason"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store_probe(key: str, status: KvmStatus) -> None:
    path = _probe_cache(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(status)))
    tmp.replace(path)


def requested_accel(flag: str | None) -> str:
    value = (flag or os.environ.get("MATCHLOCK_ACCEL") or "auto").strip().lower()
    if value not in ACCELS:
        raise MatchlockError(
            f"unknown accelerator {value!r}", hint="use --accel kvm, tcg or auto"
        )
    return value


def host_tsc_khz() -> int:
    """The host TSC rate; a TCG guest told this skips PIT calibration, which can hang it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return 2_000_000
