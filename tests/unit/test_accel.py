"""The accelerator decision: KVM only when asked for or proven by a probe boot."""

from __future__ import annotations

from pathlib import Path

import pytest

from matchlock.errors import MatchlockError
from matchlock.sandbox import boot
from matchlock.vm import accel, qemu

ARTS = boot.BootArtifacts(Path("/k"), Path("/i"), "key")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATCHLOCK_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MATCHLOCK_ACCEL", raising=False)
    monkeypatch.setattr(qemu, "qemu_version", lambda binary=None: "7.2.0")


def _host(monkeypatch: pytest.MonkeyPatch, usable: bool, probe: bool | None = None) -> list[int]:
    calls: list[int] = []
    monkeypatch.setattr(accel, "kvm_precheck",
                        lambda: accel.KvmStatus(usable, "pre-reason"))

    def fake_probe() -> accel.KvmStatus:
        calls.append(1)
        return accel.KvmStatus(bool(probe), "probe-reason")

    monkeypatch.setattr(boot, "_probe_boot", fake_probe)
    return calls


def test_requested_accel_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert accel.requested_accel(None) == "auto"
    assert accel.requested_accel(" TCG ") == "tcg"
    monkeypatch.setenv("MATCHLOCK_ACCEL", "kvm")
    assert accel.requested_accel(None) == "kvm"
    assert accel.requested_accel("tcg") == "tcg"  # the flag beats the environment
    with pytest.raises(MatchlockError, match="unknown accelerator"):
        accel.requested_accel("hvf")


def test_auto_without_usable_kvm_is_tcg_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _host(monkeypatch, usable=False)
    choice = boot.choose_accel(None, ARTS)
    assert (choice.accel, choice.reason) == ("tcg", "KVM not usable: pre-reason")
    assert calls == []


def test_forced_kvm_on_an_unusable_host_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _host(monkeypatch, usable=False)
    with pytest.raises(MatchlockError, match="KVM was requested but is not usable: pre-reason"):
        boot.choose_accel("kvm", ARTS)


def test_auto_probes_once_and_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _host(monkeypatch, usable=True, probe=True)
    assert boot.choose_accel(None, ARTS).accel == "kvm"
    assert boot.choose_accel(None, ARTS).accel == "kvm"
    assert calls == [1]


def test_failed_probe_falls_back_to_tcg(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _host(monkeypatch, usable=True, probe=False)
    choice = boot.choose_accel(None, ARTS)
    assert (choice.accel, choice.reason) == ("tcg", "KVM probe failed: probe-reason")
    assert boot.choose_accel("tcg", ARTS).accel == "tcg"
    assert calls == [1]


def test_pvm_host_is_recognised(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if not Path("/sys/module/kvm_pvm").exists():
        pytest.skip("not a PVM host")
    status = accel.kvm_precheck()
    assert not status.usable and "kvm_pvm" in status.reason


def test_tcg_command_line_carries_the_tsc_rate() -> None:
    line = qemu.kernel_cmdline("tcg")
    khz = accel.host_tsc_khz()
    assert f"tsc_early_khz={khz}" in line and f"lpj={khz * 4}" in line
    assert "no_timer_check" in line
    assert "tsc_early_khz" not in qemu.kernel_cmdline("kvm")
