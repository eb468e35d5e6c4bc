"""Energy metering through pyJoules (docs/design.md §5): RAPL package and dram counters of every socket, NVML counters
of every NVIDIA GPU. Counters are read at each start/stop/phase boundary and every ``poll_s`` seconds in between;
a step backwards is a wrap-around, corrected with the domain's ``max_energy_range_uj`` (a package counter wraps
after about 262 kJ, every 20-60 minutes under load). No method raises because of pyJoules, NVML or sysfs: a reading
that measured nothing has ``energy_j = None`` and a note that says why. The meter is thread-safe.

pyJoules is optional (``pip install 'gradmatch[energy]'``): without it every reading is ``None`` with the note
``MISSING``, and the run reports its energy as n/a."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Iterator

# pyJoules logs a warning at import when pynvml is missing, which would configure the process's root logger.
_guard = logging.NullHandler()
logging.getLogger().addHandler(_guard)
try:
    from pyJoules.device import DeviceFactory, rapl_device
except ImportError:  # the [energy] extra is not installed
    DeviceFactory = rapl_device = None
finally:
    logging.getLogger().removeHandler(_guard)

MISSING = "pyJoules not installed: pip install 'gradmatch[energy]'"
# pyJoules' own root, used when no powercap_root is given (the same path when pyJoules is absent)
DEFAULT_POWERCAP_ROOT: str = rapl_device.RAPL_API_DIR if rapl_device is not None else "/sys/class/powercap/intel-rapl"
_PATH_LOCK = threading.Lock()
_Mark = tuple[dict[str, float], int]  # running totals of the counters read, and the number of issues so far


@dataclass(frozen=True)
class EnergyReading:
    """Joules over one interval: in all (None when nothing was measured), per pyJoules domain (``package_0``,
    ``dram_0``, ``nvidia_gpu_0``), and a note saying what was measured, or why nothing was."""
    energy_j: float | None
    by_domain: dict[str, float]
    note: str

    def to_dict(self) -> dict:
        return {"energy_j": self.energy_j, "by_domain": dict(self.by_domain), "note": self.note}


@dataclass
class _Counter:
    """A pyJoules device configured with one domain, with its running total in the device's unit."""
    name: str
    device: object
    source: str
    units_per_j: float
    wrap: float | None  # the counter's range; None when unknown
    last: float = 0.0
    total: float = 0.0
    ok: bool = True


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _max_range(device) -> float | None:
    """``max_energy_range_uj`` beside the ``energy_uj`` file a RAPL device reads; None when unreadable."""
    paths = getattr(device, "_api_file_names", None)
    if not paths:
        return None
    try:
        with open(os.path.join(os.path.dirname(paths[0]), "max_energy_range_uj")) as handle:
            value = float(handle.readline())
    except (OSError, ValueError):
        return None
    return value if value > 0 else None


def _counters(domains: list, source: str, units_per_j: float, prefix: str = "") -> tuple[list[_Counter], list[str]]:
    counters, notes = [], []
    for domain in domains:
        try:
            (device,) = DeviceFactory.create_devices([domain])
            counters.append(_Counter(str(domain), device, source, units_per_j, _max_range(device)))
        except Exception as exc:
            notes.append(f"{prefix}{domain} unusable ({_why(exc)})")
    return counters, notes


def _rapl_counters(root: str) -> tuple[list[_Counter], list[str]]:
    """Package and dram domains of every socket (core and uncore are parts of the package: not metered)."""
    if not os.path.isdir(root):
        return [], [f"no RAPL powercap tree at {root}"]
    # pyJoules takes no powercap root: it reads the module global RAPL_API_DIR when it lists domains and resolves
    # their files. It points at `root` only while devices are made (a device keeps absolute paths, so reads need
    # no patch), under a lock so that two meters never see each other's root.
    with _PATH_LOCK:
        saved, rapl_device.RAPL_API_DIR = rapl_device.RAPL_API_DIR, root
        try:
            rapl = rapl_device.RaplDevice
            domains = rapl.available_package_domains() + rapl.available_dram_domains()
            counters, notes = _counters(domains, f"RAPL at {root}", 1e6, "RAPL ")  # RAPL counts microjoules
        except Exception as exc:
            return [], [f"RAPL powercap tree at {root} unusable ({_why(exc)})"]
        finally:
            rapl_device.RAPL_API_DIR = saved
    return counters, notes + ([] if domains else [f"RAPL powercap tree at {root} has no package or dram domain"])


def _gpu_counters() -> tuple[list[_Counter], list[str]]:
    try:
        from pyJoules.device.nvidia_device import NvidiaGPUDevice
    except Exception as exc:  # ImportError when pynvml is not installed
        return [], [f"no NVIDIA GPU/NVML (pynvml unavailable: {_why(exc)})"]
    try:
        domains = NvidiaGPUDevice.available_domains()
    except Exception as exc:  # pyJoules turns an NVML init failure into NoSuchDeviceError
        return [], [f"no NVIDIA GPU/NVML (NVML init failed: {_why(exc)})"]
    return _counters(domains, "NVML", 1e3) if domains else ([], ["no NVIDIA GPU/NVML (NVML reports no GPU)"])


def _read(counter: _Counter) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # pyJoules leaves its RAPL files to the collector
        return float(counter.device.get_energy()[0])


def _joined(*notes: list[str]) -> str:
    return "; ".join(dict.fromkeys(n for part in notes for n in part if n))


def _merged(old: EnergyReading | None, new: EnergyReading) -> EnergyReading:
    if old is None:
        return new
    by_domain = {n: old.by_domain.get(n, 0.0) + new.by_domain.get(n, 0.0) for n in {**old.by_domain, **new.by_domain}}
    note = _joined(old.note.split("; "), new.note.split("; "))
    return EnergyReading(sum(by_domain.values()) if by_domain else None, by_domain, note)


class EnergyMeter:
    """Measure energy between ``start`` and ``stop``, and per named ``phase``.

    Parameters
    ----------
    powercap_root : str, optional
        Root of the powercap ``intel-rapl`` tree (default: pyJoules' own, ``DEFAULT_POWERCAP_ROOT``).
    use_gpu : bool, default True
        Also meter NVIDIA GPUs through NVML.
    poll_s : float or None, default 60.0
        Seconds between readings while an interval is open, so no counter wraps twice unseen; None: no polling.
    """

    def __init__(self, powercap_root: str | None = None, use_gpu: bool = True, poll_s: float | None = 60.0):
        self._root, self._poll_s, self._lock = powercap_root or DEFAULT_POWERCAP_ROOT, poll_s, threading.RLock()
        self._issues: list[str] = []
        self._start_mark: _Mark | None = None
        self._open_phases, self._phases, self._halt = 0, {}, None
        self.last: EnergyReading | None = None  # the reading the latest stop() returned
        if rapl_device is None:
            counters, self._absent, use_gpu = [], [MISSING], False
        else:
            counters, self._absent = _rapl_counters(self._root)
        if use_gpu:
            gpus, notes = _gpu_counters()
        else:
            gpus, notes = [], [] if rapl_device is None else ["GPU not metered (use_gpu=False)"]
        self._absent += notes
        self._counters: list[_Counter] = []
        for counter in counters + gpus:  # a first reading: a counter that cannot be read is left out
            try:
                counter.last = _read(counter)
                self._counters.append(counter)
            except Exception as exc:
                self._absent.append(f"{counter.name} unreadable ({_why(exc)})")
        self.domains = [c.name for c in self._counters]

    def start(self) -> None:
        """Begin (or restart) the main interval."""
        with self._lock:
            self._start_mark = self._advance()
            self._sync_poller()

    def stop(self) -> EnergyReading:
        """End the main interval and return its energy (None, with a note, when ``start`` was not called)."""
        with self._lock:
            if self._start_mark is None:
                return EnergyReading(None, {}, "stop() called before start()")
            self.last, self._start_mark = self._reading_since(self._start_mark), None
            self._sync_poller()
            return self.last

    def __enter__(self) -> "EnergyMeter":
        self.start()
        return self

    def __exit__(self, *exc_info) -> bool:
        self.stop()
        return False

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the energy of a block to phase ``name``; phases may nest, repeat, and run outside start/stop."""
        with self._lock:
            self._open_phases += 1
            self._sync_poller()
            mark = self._advance()
        try:
            yield
        finally:
            with self._lock:
                self._phases[name] = _merged(self._phases.get(name), self._reading_since(mark))
                self._open_phases = max(0, self._open_phases - 1)
                self._sync_poller()

    def phases(self) -> dict[str, EnergyReading]:
        """The energy of every phase seen so far."""
        with self._lock:
            return dict(self._phases)

    def close(self) -> None:
        """Stop background polling; the meter stays usable."""
        with self._lock:
            self._start_mark, self._open_phases = None, 0
            self._sync_poller()

    def _advance(self) -> _Mark:
        """Read every counter, add its step since the previous reading to its total, and mark the moment."""
        with self._lock:
            for c in self._counters:
                try:
                    value = _read(c)
                except Exception as exc:
                    c.ok = False
                    self._issues.append(f"{c.name} read failed ({_why(exc)})")
                    continue
                step = value - c.last
                if step < 0 and c.wrap is not None:
                    step += c.wrap
                elif step < 0:
                    self._issues.append(f"{c.name} counter went backwards with no known range; step counted as 0")
                    step = 0.0
                c.total, c.last, c.ok = c.total + step, value, True
            return {c.name: c.total for c in self._counters if c.ok}, len(self._issues)

    def _reading_since(self, mark: _Mark) -> EnergyReading:
        with self._lock:
            (start, first_issue), (end, end_issue) = mark, self._advance()
            by_domain, sources, issues = {}, {}, self._issues[first_issue:end_issue]
            for c in self._counters:
                if c.name in start and c.name in end:
                    by_domain[c.name] = (end[c.name] - start[c.name]) / c.units_per_j
                    sources.setdefault(c.source, []).append(c.name)
                else:
                    issues.append(f"{c.name} left out (not read at both ends)")
        measured = [f"measured {', '.join(names)} via {source}" for source, names in sources.items()]
        return EnergyReading(sum(by_domain.values()) if by_domain else None, by_domain,
                             _joined(measured, self._absent, issues))

    def _sync_poller(self) -> None:
        """Run the polling thread exactly while an interval is open."""
        wanted = bool(self._counters and self._poll_s) and (self._start_mark is not None or self._open_phases > 0)
        if wanted and self._halt is None:
            self._halt = threading.Event()
            threading.Thread(target=self._poll, args=(self._halt,), daemon=True, name="energy-poll").start()
        elif not wanted and self._halt is not None:
            self._halt.set()
            self._halt = None

    def _poll(self, halt: threading.Event) -> None:
        while not halt.wait(self._poll_s):
            self._advance()
