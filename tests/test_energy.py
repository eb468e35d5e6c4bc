"""Tests of trainer.builtin.energy on fake powercap trees read by the real pyJoules code.

The fake tree follows the sysfs layout pyJoules parses::

    <root>/intel-rapl:0/name                         "package-0\\n"
    <root>/intel-rapl:0/energy_uj                    counter, microjoules
    <root>/intel-rapl:0/max_energy_range_uj          counter range
    <root>/intel-rapl:0/intel-rapl:0:0/name          "core\\n"
    <root>/intel-rapl:0/intel-rapl:0:1/name          "dram\\n"
    <root>/intel-rapl:0/intel-rapl:0:1/energy_uj     ...

Advancing a counter is rewriting its ``energy_uj`` file, as the hardware would.
"""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path

import pytest

from trainer.builtin.energy import DEFAULT_POWERCAP_ROOT, EnergyMeter, EnergyReading, rapl_device

MAX_UJ = 262143328850  # a typical package range


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _domain_dir(root: Path, socket: int, sub: int | None = None) -> Path:
    top = root / f"intel-rapl:{socket}"
    return top if sub is None else top / f"intel-rapl:{socket}:{sub}"


def add_socket(root: Path, socket: int, package_uj: int, dram_uj: int | None = None,
               with_core: bool = True, max_uj: int = MAX_UJ) -> None:
    """Add one socket: package, optionally core (sub 0) and dram (next sub)."""
    top = _domain_dir(root, socket)
    _write(top / "name", f"package-{socket}\n")
    _write(top / "energy_uj", f"{package_uj}\n")
    _write(top / "max_energy_range_uj", f"{max_uj}\n")
    sub = 0
    if with_core:
        core = _domain_dir(root, socket, sub)
        _write(core / "name", "core\n")
        _write(core / "energy_uj", "777\n")
        _write(core / "max_energy_range_uj", f"{max_uj}\n")
        sub += 1
    if dram_uj is not None:
        dram = _domain_dir(root, socket, sub)
        _write(dram / "name", "dram\n")
        _write(dram / "energy_uj", f"{dram_uj}\n")
        _write(dram / "max_energy_range_uj", f"{max_uj}\n")


def set_uj(root: Path, socket: int, value: int, dram: bool = False) -> None:
    """Advance a counter: rewrite the package (or dram) energy_uj of a socket."""
    if not dram:
        _write(_domain_dir(root, socket) / "energy_uj", f"{value}\n")
        return
    for sub in sorted(_domain_dir(root, socket).glob(f"intel-rapl:{socket}:*")):
        if (sub / "name").read_text() == "dram\n":
            _write(sub / "energy_uj", f"{value}\n")
            return
    raise AssertionError("no dram domain")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "intel-rapl"
    path.mkdir()
    return path


def meter_for(root: Path, **kwargs) -> EnergyMeter:
    kwargs.setdefault("use_gpu", False)
    kwargs.setdefault("poll_s", None)
    return EnergyMeter(powercap_root=str(root), **kwargs)


def test_one_socket_package_and_dram(root):
    add_socket(root, 0, package_uj=1_000_000, dram_uj=500_000)
    meter = meter_for(root)
    assert meter.domains == ["package_0", "dram_0"]  # core is part of package: not metered
    meter.start()
    set_uj(root, 0, 13_300_000)
    set_uj(root, 0, 1_700_000, dram=True)
    reading = meter.stop()
    assert reading.by_domain == {"package_0": 12.3, "dram_0": 1.2}
    assert reading.energy_j == pytest.approx(13.5, rel=1e-15)
    assert "package_0, dram_0" in reading.note and str(root) in reading.note
    assert meter.last == reading


def test_two_sockets(root):
    add_socket(root, 0, package_uj=10, dram_uj=20)
    add_socket(root, 1, package_uj=30, dram_uj=40, with_core=False)
    meter = meter_for(root)
    meter.start()
    set_uj(root, 0, 10 + 5_000_000)
    set_uj(root, 0, 20 + 250_000, dram=True)
    set_uj(root, 1, 30 + 7_000_000)
    set_uj(root, 1, 40 + 750_000, dram=True)
    reading = meter.stop()
    assert reading.by_domain == {"package_0": 5.0, "package_1": 7.0, "dram_0": 0.25, "dram_1": 0.75}
    assert reading.energy_j == 13.0


def test_wrap_around_uses_max_energy_range(root):
    add_socket(root, 0, package_uj=MAX_UJ - 328_850)
    meter = meter_for(root)
    meter.start()
    set_uj(root, 0, 671_150)  # wrapped: 328_850 up to the top, 671_150 after it
    reading = meter.stop()
    assert reading.by_domain == {"package_0": 1.0}
    assert reading.energy_j == 1.0


def test_boundary_readings_count_more_than_one_wrap(root):
    add_socket(root, 0, package_uj=900_000, max_uj=1_000_000)
    meter = meter_for(root)
    meter.start()
    with meter.phase("a"):
        set_uj(root, 0, 100_000)  # +200_000 across a wrap
    set_uj(root, 0, 950_000)  # +850_000
    reading = meter.stop()
    set_uj(root, 0, 50_000)
    assert meter.phases()["a"].by_domain == {"package_0": 0.2}
    assert reading.by_domain == {"package_0": 1.05}  # more than one whole range


def test_polling_catches_wraps_between_boundaries(root):
    add_socket(root, 0, package_uj=0, max_uj=1_000_000)
    meter = meter_for(root, poll_s=0.005)

    def seen(value: int) -> None:
        deadline = time.monotonic() + 3.0
        while meter._counters[0].last != value:  # wait for the poller's read
            assert time.monotonic() < deadline, "poller never read the counter"
            time.sleep(0.005)

    meter.start()
    for value in (600_000, 100_000, 700_000, 200_000):  # two wraps, all between boundaries
        set_uj(root, 0, value)
        seen(value)
    reading = meter.stop()
    assert reading.by_domain == {"package_0": 2.2}
    assert meter._halt is None  # polling ends with the interval


def test_missing_tree_gives_none_and_names_the_path(tmp_path):
    missing = tmp_path / "no" / "intel-rapl"
    meter = EnergyMeter(powercap_root=str(missing), use_gpu=False, poll_s=None)
    meter.start()
    reading = meter.stop()
    assert reading.energy_j is None and reading.by_domain == {}
    assert f"no RAPL powercap tree at {missing}" in reading.note
    assert "use_gpu=False" in reading.note


def test_missing_tree_with_gpu_lookup_never_raises(tmp_path):
    missing = tmp_path / "absent"
    with EnergyMeter(powercap_root=str(missing), poll_s=None) as meter:
        with meter.phase("train"):
            pass
    reading = meter.last
    assert str(missing) in reading.note
    if not reading.by_domain:  # no GPU on this machine
        assert reading.energy_j is None and "NVIDIA" in reading.note


def test_tree_without_package_domains(root):
    _write(root / "intel-rapl:0" / "name", "psys\n")
    meter = meter_for(root)
    meter.start()
    reading = meter.stop()
    assert reading.energy_j is None and "no package or dram domain" in reading.note


def test_phases_accumulate(root):
    add_socket(root, 0, package_uj=0, dram_uj=0)
    meter = meter_for(root)
    package = dram = 0

    def burn(p: int, d: int) -> None:
        nonlocal package, dram
        package, dram = package + p, dram + d
        set_uj(root, 0, package)
        set_uj(root, 0, dram, dram=True)

    meter.start()
    with meter.phase("train"):
        burn(2_000_000, 100_000)
    with meter.phase("select"):
        burn(500_000, 0)
    with meter.phase("train"):
        burn(3_000_000, 400_000)
    burn(1_000_000, 0)  # outside every phase
    total = meter.stop()
    phases = meter.phases()
    assert set(phases) == {"train", "select"}
    assert phases["train"].by_domain == {"package_0": 5.0, "dram_0": 0.5}
    assert phases["train"].energy_j == 5.5
    assert phases["select"].by_domain == {"package_0": 0.5, "dram_0": 0.0}
    assert total.by_domain == {"package_0": 6.5, "dram_0": 0.5}
    assert total.energy_j == 7.0


def test_nested_phase_without_main_interval(root):
    add_socket(root, 0, package_uj=0)
    meter = meter_for(root)
    with meter.phase("epoch"):
        set_uj(root, 0, 1_000_000)
        with meter.phase("summary"):
            set_uj(root, 0, 1_500_000)
    assert meter.phases()["epoch"].energy_j == 1.5
    assert meter.phases()["summary"].energy_j == 0.5
    assert meter.stop().energy_j is None  # start() was never called


def test_pyjoules_path_is_restored(root):
    add_socket(root, 0, package_uj=0)
    before = rapl_device.RAPL_API_DIR
    meter = meter_for(root)
    meter.start()
    meter.stop()
    assert rapl_device.RAPL_API_DIR == before == DEFAULT_POWERCAP_ROOT


def test_unreadable_domain_is_dropped_with_a_note(root):
    add_socket(root, 0, package_uj=0, dram_uj=0)
    dram_file = _domain_dir(root, 0, 1) / "energy_uj"
    dram_file.unlink()
    meter = meter_for(root)
    assert meter.domains == ["package_0"]
    meter.start()
    set_uj(root, 0, 2_000_000)
    reading = meter.stop()
    assert reading.by_domain == {"package_0": 2.0}
    assert "dram_0 unreadable" in reading.note


def test_read_failure_mid_interval_leaves_domain_out(root):
    add_socket(root, 0, package_uj=0, dram_uj=0)
    meter = meter_for(root)
    meter.start()
    set_uj(root, 0, 3_000_000, dram=True)
    (_domain_dir(root, 0) / "energy_uj").unlink()
    reading = meter.stop()
    assert reading.by_domain == {"dram_0": 3.0}
    assert "package_0 read failed" in reading.note
    assert "package_0 left out" in reading.note


def test_backwards_counter_without_range_counts_zero(root):
    add_socket(root, 0, package_uj=5_000_000)
    (_domain_dir(root, 0) / "max_energy_range_uj").unlink()
    meter = meter_for(root)
    meter.start()
    set_uj(root, 0, 1_000_000)
    reading = meter.stop()
    assert reading.by_domain == {"package_0": 0.0}
    assert "went backwards" in reading.note


class _FakeNVMLError(Exception):
    pass


def _fake_pynvml(energy_mj: list[int], fail_init: bool = False) -> types.ModuleType:
    """A stand-in for pynvml with the calls pyJoules makes."""
    fake = types.ModuleType("pynvml")
    fake.NVMLError = _FakeNVMLError

    def init():
        if fail_init:
            raise _FakeNVMLError("driver not loaded")

    fake.nvmlInit = init
    fake.nvmlDeviceGetCount = lambda: len(energy_mj)
    fake.nvmlDeviceGetHandleByIndex = lambda index: index
    fake.nvmlDeviceGetTotalEnergyConsumption = lambda handle: energy_mj[handle]
    return fake


@pytest.fixture
def fake_nvml(monkeypatch):
    """Install a fake pynvml; pyJoules' nvidia module is re-imported on it and dropped after."""
    import pyJoules.device

    module = "pyJoules.device.nvidia_device"
    monkeypatch.setitem(sys.modules, module, None)  # undo restores the real state
    monkeypatch.setattr(pyJoules.device, "nvidia_device", None, raising=False)

    def install(energy_mj: list[int], fail_init: bool = False) -> None:
        monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(energy_mj, fail_init))
        del sys.modules[module]

    return install


def test_gpu_through_pyjoules_nvidia_device(root, fake_nvml):
    add_socket(root, 0, package_uj=0)
    counters = [1_000, 50_000]
    fake_nvml(counters)
    meter = meter_for(root, use_gpu=True)
    assert meter.domains == ["package_0", "nvidia_gpu_0", "nvidia_gpu_1"]
    meter.start()
    set_uj(root, 0, 4_000_000)
    counters[0] += 40_000  # millijoules
    counters[1] += 2_500
    reading = meter.stop()
    assert reading.by_domain == {"package_0": 4.0, "nvidia_gpu_0": 40.0, "nvidia_gpu_1": 2.5}
    assert reading.energy_j == 46.5
    assert "via NVML" in reading.note


def test_nvml_init_failure_is_a_note(tmp_path, fake_nvml):
    fake_nvml([0], fail_init=True)
    meter = EnergyMeter(powercap_root=str(tmp_path / "x"), poll_s=None)
    meter.start()
    reading = meter.stop()
    assert reading.energy_j is None
    assert "no NVIDIA GPU/NVML" in reading.note and "no RAPL powercap tree" in reading.note


def test_reading_is_frozen_and_serialisable():
    reading = EnergyReading(1.5, {"package_0": 1.5}, "measured package_0")
    with pytest.raises(AttributeError):
        reading.energy_j = 2.0  # type: ignore[misc]
    assert reading.to_dict() == {"energy_j": 1.5, "by_domain": {"package_0": 1.5},
                                 "note": "measured package_0"}


def test_without_pyjoules_every_reading_is_none_and_names_the_extra(tmp_path):
    """pyJoules is the [energy] extra: hidden by an import blocker, the meter still works and says how to get it."""
    import json
    import os
    import subprocess

    blocker = tmp_path / "pyJoules"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'pyJoules'\", name='pyJoules')\n")
    root = Path(__file__).resolve().parents[1]
    code = ("import json\nfrom trainer.builtin.energy import EnergyMeter\nmeter = EnergyMeter()\nmeter.start()\n"
            "with meter.phase('training'):\n    pass\n"
            "print(json.dumps([meter.stop().to_dict(), meter.phases()['training'].to_dict(), meter.domains]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)])})
    assert done.returncode == 0, done.stderr[-2000:]
    total, phase, domains = json.loads(done.stdout)
    missing = {"energy_j": None, "by_domain": {}, "note": "pyJoules not installed: pip install 'gradmatch[energy]'"}
    assert total == phase == missing and domains == []
