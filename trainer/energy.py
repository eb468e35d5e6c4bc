"""Energy metering through pyJoules.

The meter reads the RAPL ``package`` and ``dram`` counters of every CPU socket
that exposes them (Linux powercap tree) and the total-energy counter of every
NVIDIA GPU whose NVML counter works, all through pyJoules' device classes.
When no domain can be read, a reading carries ``energy_j = None`` and a note
that says why; a number is never made up.

Counters are read at every ``start``/``stop``/phase boundary and, while an
interval is open, every ``poll_s`` seconds from a daemon thread.  Each reading
adds the step since the previous one to a running total; a step that goes
backwards is a counter wrap-around and is corrected with the domain's
``max_energy_range_uj`` (pyJoules itself just subtracts).  A RAPL package
counter wraps after roughly 262 kJ, i.e. every 20-60 minutes under load, so
polling matters for long phases.

Examples
--------
>>> meter = EnergyMeter()
>>> with meter:
...     with meter.phase("train"):
...         pass
>>> meter.last.energy_j is None or meter.last.energy_j >= 0
True
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Iterator


def _import_pyjoules():
    """Import pyJoules' device layer without side effects on logging.

    pyJoules logs a warning at import time when ``pynvml`` is missing, which
    would configure the root logger of the whole process.  A temporary null
    handler absorbs it; the same fact reaches the user through the notes.

    Returns
    -------
    tuple
        ``(DeviceFactory, rapl_device module)``.
    """
    root = logging.getLogger()
    guard = logging.NullHandler()
    root.addHandler(guard)
    try:
        from pyJoules.device import DeviceFactory
        from pyJoules.device import rapl_device
    finally:
        root.removeHandler(guard)
    return DeviceFactory, rapl_device


DeviceFactory, rapl_device = _import_pyjoules()

#: pyJoules' own powercap path, used when no ``powercap_root`` is given.
DEFAULT_POWERCAP_ROOT: str = rapl_device.RAPL_API_DIR

_RAPL_UNITS_PER_J = 1e6  # RAPL counts microjoules
_NVML_UNITS_PER_J = 1e3  # NVML counts millijoules
_PATH_LOCK = threading.RLock()


@dataclass(frozen=True)
class EnergyReading:
    """Energy used over one interval.

    Attributes
    ----------
    energy_j : float or None
        Total joules over all measured domains; ``None`` when nothing could
        be measured.
    by_domain : dict of str to float
        Joules per domain, named as pyJoules names them (``package_0``,
        ``dram_0``, ``nvidia_gpu_0``).
    note : str
        What was measured, or exactly why nothing was.
    """

    energy_j: float | None
    by_domain: dict[str, float]
    note: str

    def to_dict(self) -> dict:
        """Return a plain, JSON-ready dictionary.

        Returns
        -------
        dict
            Keys ``energy_j``, ``by_domain`` and ``note``.
        """
        return {"energy_j": self.energy_j, "by_domain": dict(self.by_domain), "note": self.note}


@dataclass
class _Counter:
    """One pyJoules device configured with exactly one domain."""

    name: str
    device: object
    source: str
    units_per_j: float
    wrap: float | None
    last: float | None = None
    total: float = 0.0
    ok: bool = False


@dataclass(frozen=True)
class _Mark:
    """Running totals (native units) of the readable counters at one moment."""

    totals: dict[str, float]
    issue_index: int


@contextlib.contextmanager
def _rapl_root(path: str) -> Iterator[None]:
    """Point pyJoules' RAPL module at ``path`` for the duration of a block.

    Parameters
    ----------
    path : str
        Root of a powercap ``intel-rapl`` tree.

    Yields
    ------
    None
    """
    with _PATH_LOCK:
        saved = rapl_device.RAPL_API_DIR
        rapl_device.RAPL_API_DIR = path
        try:
            yield
        finally:
            rapl_device.RAPL_API_DIR = saved


def _why(exc: BaseException) -> str:
    """Describe an exception in a few words.

    Parameters
    ----------
    exc : BaseException
        The exception.

    Returns
    -------
    str
        Its message, or its type name when the message is empty.
    """
    return str(exc) or type(exc).__name__


def _dedupe(parts: list[str]) -> list[str]:
    """Drop empty and repeated strings, keeping the first order.

    Parameters
    ----------
    parts : list of str
        Note fragments.

    Returns
    -------
    list of str
    """
    return [p for p in dict.fromkeys(parts) if p]


def _max_range(energy_path: str) -> float | None:
    """Read ``max_energy_range_uj`` next to an ``energy_uj`` file.

    Parameters
    ----------
    energy_path : str
        Path of the domain's ``energy_uj`` file.

    Returns
    -------
    float or None
        The counter's range in microjoules, ``None`` when unreadable.
    """
    path = os.path.join(os.path.dirname(energy_path), "max_energy_range_uj")
    try:
        with open(path) as handle:
            value = float(handle.readline())
    except (OSError, ValueError):
        return None
    return value if value > 0 else None


def _rapl_counter(domain, root: str) -> _Counter:
    """Create a pyJoules RAPL device for one domain.

    Parameters
    ----------
    domain : pyJoules.device.rapl_device.RaplDomain
        A package or dram domain.
    root : str
        Powercap root, used in the note.

    Returns
    -------
    _Counter
    """
    (device,) = DeviceFactory.create_devices([domain])
    # pyJoules keeps the energy_uj path it reads; its sibling holds the range.
    paths = getattr(device, "_api_file_names", None) or []
    wrap = _max_range(paths[0]) if paths else None
    return _Counter(str(domain), device, f"RAPL at {root}", _RAPL_UNITS_PER_J, wrap)


def _rapl_counters(root: str) -> tuple[list[_Counter], list[str]]:
    """Find the RAPL package and dram domains of every socket under ``root``.

    Core and uncore domains are left out: they are parts of the package and
    would be counted twice.

    Parameters
    ----------
    root : str
        Powercap ``intel-rapl`` root.

    Returns
    -------
    tuple
        ``(counters, notes)``; notes say why domains are missing.
    """
    if not os.path.isdir(root):
        return [], [f"no RAPL powercap tree at {root}"]
    counters, notes = [], []
    with _rapl_root(root):
        try:
            rapl = rapl_device.RaplDevice
            domains = rapl.available_package_domains() + rapl.available_dram_domains()
        except Exception as exc:
            return [], [f"RAPL powercap tree at {root} unusable ({_why(exc)})"]
        for domain in domains:
            try:
                counters.append(_rapl_counter(domain, root))
            except Exception as exc:
                notes.append(f"RAPL {domain} unusable ({_why(exc)})")
    if not domains:
        notes.append(f"RAPL powercap tree at {root} has no package or dram domain")
    return counters, notes


def _gpu_counters() -> tuple[list[_Counter], list[str]]:
    """Find every NVIDIA GPU that NVML reports.

    Returns
    -------
    tuple
        ``(counters, notes)``; notes say why GPUs are missing.
    """
    try:
        from pyJoules.device.nvidia_device import NvidiaGPUDevice
    except Exception as exc:  # ImportError when pynvml is not installed
        return [], [f"no NVIDIA GPU/NVML (pynvml unavailable: {_why(exc)})"]
    try:
        domains = NvidiaGPUDevice.available_domains()
    except Exception as exc:  # pyJoules turns an NVML init failure into NoSuchDeviceError
        return [], [f"no NVIDIA GPU/NVML (NVML init failed: {_why(exc)})"]
    if not domains:
        return [], ["no NVIDIA GPU/NVML (NVML reports no GPU)"]
    counters, notes = [], []
    for domain in domains:
        try:
            (device,) = DeviceFactory.create_devices([domain])
            counters.append(_Counter(str(domain), device, "NVML", _NVML_UNITS_PER_J, None))
        except Exception as exc:
            notes.append(f"{domain} unusable ({_why(exc)})")
    return counters, notes


def _discover(root: str, use_gpu: bool) -> tuple[list[_Counter], list[str]]:
    """Find every domain this machine can meter.

    Parameters
    ----------
    root : str
        Powercap ``intel-rapl`` root.
    use_gpu : bool
        Whether to look for NVIDIA GPUs.

    Returns
    -------
    tuple
        ``(counters, notes)``.
    """
    counters, notes = _rapl_counters(root)
    if not use_gpu:
        return counters, notes + ["GPU not metered (use_gpu=False)"]
    gpu_counters, gpu_notes = _gpu_counters()
    return counters + gpu_counters, notes + gpu_notes


def _read(counter: _Counter) -> float:
    """Read a counter's raw value through pyJoules.

    Parameters
    ----------
    counter : _Counter
        The counter.

    Returns
    -------
    float
        Raw value in the device's native unit.
    """
    with warnings.catch_warnings():
        # pyJoules leaves its RAPL file handles to the garbage collector.
        warnings.simplefilter("ignore", ResourceWarning)
        return float(counter.device.get_energy()[0])


def _merge(old: EnergyReading | None, new: EnergyReading) -> EnergyReading:
    """Add two readings of the same phase.

    Parameters
    ----------
    old : EnergyReading or None
        The phase's total so far.
    new : EnergyReading
        Its latest interval.

    Returns
    -------
    EnergyReading
    """
    if old is None:
        return new
    names = list(dict.fromkeys([*old.by_domain, *new.by_domain]))
    by_domain = {n: old.by_domain.get(n, 0.0) + new.by_domain.get(n, 0.0) for n in names}
    energy = sum(by_domain.values()) if by_domain else None
    note = "; ".join(_dedupe(old.note.split("; ") + new.note.split("; ")))
    return EnergyReading(energy, by_domain, note)


class EnergyMeter:
    """Measure energy between ``start`` and ``stop`` and per named phase.

    Parameters
    ----------
    powercap_root : str, optional
        Root of the powercap ``intel-rapl`` tree; pyJoules' own default
        (``/sys/class/powercap/intel-rapl``) when ``None``.  pyJoules' module
        path is pointed here while devices are created and read.
    use_gpu : bool, default True
        Also meter NVIDIA GPUs through NVML.
    poll_s : float or None, default 60.0
        Seconds between background readings while an interval is open, so
        that no counter wraps twice unseen; ``None`` disables polling.

    Notes
    -----
    No method raises because of pyJoules, NVML or the sysfs files: failures
    end up in the readings' notes.  The meter is thread-safe.
    """

    def __init__(self, powercap_root: str | None = None, use_gpu: bool = True,
                 poll_s: float | None = 60.0):
        self._root = powercap_root or DEFAULT_POWERCAP_ROOT
        self._poll_s = poll_s
        self._lock = threading.RLock()
        self._issues: list[str] = []
        self._start_mark: _Mark | None = None
        self._open_phases = 0
        self._phases: dict[str, EnergyReading] = {}
        self._last: EnergyReading | None = None
        self._halt: threading.Event | None = None
        counters, self._absent = _discover(self._root, use_gpu)
        self._counters = self._keep_readable(counters)

    # ----------------------------------------------------------------- public

    @property
    def domains(self) -> list[str]:
        """list of str: Names of the domains being metered."""
        return [c.name for c in self._counters]

    @property
    def last(self) -> EnergyReading | None:
        """EnergyReading or None: The reading returned by the latest ``stop``."""
        return self._last

    def start(self) -> None:
        """Begin (or restart) the main interval."""
        with self._lock:
            self._start_mark = self._mark()
            self._sync_poller()

    def stop(self) -> EnergyReading:
        """End the main interval.

        Returns
        -------
        EnergyReading
            Energy since ``start``; ``energy_j`` is ``None`` when nothing was
            measured or ``start`` was never called.
        """
        with self._lock:
            if self._start_mark is None:
                return EnergyReading(None, {}, "stop() called before start()")
            reading = self._reading_since(self._start_mark)
            self._start_mark = None
            self._last = reading
            self._sync_poller()
            return reading

    def __enter__(self) -> "EnergyMeter":
        self.start()
        return self

    def __exit__(self, *exc_info) -> bool:
        self.stop()
        return False

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Meter a block and add its energy to phase ``name``.

        Phases may nest, repeat and run with or without the main interval.

        Parameters
        ----------
        name : str
            Phase name, e.g. ``"train"`` or ``"select"``.

        Yields
        ------
        None
        """
        mark = self._open_phase()
        try:
            yield
        finally:
            self._close_phase(name, mark)

    def phases(self) -> dict[str, EnergyReading]:
        """Return the accumulated energy of every phase seen so far.

        Returns
        -------
        dict of str to EnergyReading
        """
        with self._lock:
            return dict(self._phases)

    def close(self) -> None:
        """Stop background polling; the meter stays usable."""
        with self._lock:
            self._start_mark = None
            self._open_phases = 0
            self._sync_poller()

    # --------------------------------------------------------------- internal

    def _keep_readable(self, counters: list[_Counter]) -> list[_Counter]:
        """Take a first reading and drop the counters that cannot be read."""
        kept = []
        with _rapl_root(self._root):
            for counter in counters:
                try:
                    counter.last, counter.ok = _read(counter), True
                    kept.append(counter)
                except Exception as exc:
                    self._absent.append(f"{counter.name} unreadable ({_why(exc)})")
        return kept

    def _advance(self) -> None:
        """Read every counter once and add the steps to the running totals."""
        with self._lock, _rapl_root(self._root):
            for counter in self._counters:
                self._step(counter)

    def _step(self, counter: _Counter) -> None:
        """Read one counter and add its step, noting a failed read."""
        try:
            value = _read(counter)
        except Exception as exc:
            counter.ok = False
            self._issues.append(f"{counter.name} read failed ({_why(exc)})")
            return
        if counter.last is not None:
            counter.total += self._delta(counter, value)
        counter.last, counter.ok = value, True

    def _delta(self, counter: _Counter, value: float) -> float:
        """Step from the previous raw value, correcting one wrap-around."""
        step = value - counter.last
        if step >= 0:
            return step
        if counter.wrap is not None:
            return step + counter.wrap
        self._issues.append(f"{counter.name} counter went backwards with no known range; step counted as 0")
        return 0.0

    def _mark(self) -> _Mark:
        """Read now and return the running totals of the readable counters."""
        with self._lock:
            self._advance()
            totals = {c.name: c.total for c in self._counters if c.ok}
            return _Mark(totals, len(self._issues))

    def _reading_since(self, mark: _Mark) -> EnergyReading:
        """Build the reading for the interval that began at ``mark``."""
        with self._lock:
            end = self._mark()
            by_domain, lost = {}, []
            for c in self._counters:
                if c.name in mark.totals and c.name in end.totals:
                    by_domain[c.name] = (end.totals[c.name] - mark.totals[c.name]) / c.units_per_j
                else:
                    lost.append(f"{c.name} left out (not read at both ends)")
            issues = self._issues[mark.issue_index:end.issue_index] + lost
        energy = sum(by_domain.values()) if by_domain else None
        return EnergyReading(energy, by_domain, self._note(by_domain, issues))

    def _note(self, by_domain: dict[str, float], issues: list[str]) -> str:
        """Say what was measured, what was not, and what went wrong."""
        sources: dict[str, list[str]] = {}
        for c in self._counters:
            if c.name in by_domain:
                sources.setdefault(c.source, []).append(c.name)
        measured = [f"measured {', '.join(names)} via {src}" for src, names in sources.items()]
        return "; ".join(_dedupe(measured + self._absent + issues))

    def _open_phase(self) -> _Mark:
        """Count an open phase and mark its start."""
        with self._lock:
            self._open_phases += 1
            self._sync_poller()
            return self._mark()

    def _close_phase(self, name: str, mark: _Mark) -> None:
        """Add the phase's interval to its total."""
        with self._lock:
            reading = self._reading_since(mark)
            self._phases[name] = _merge(self._phases.get(name), reading)
            self._open_phases = max(0, self._open_phases - 1)
            self._sync_poller()

    def _sync_poller(self) -> None:
        """Run the polling thread exactly while an interval is open."""
        busy = self._start_mark is not None or self._open_phases > 0
        wanted = bool(self._counters) and bool(self._poll_s) and busy
        if wanted and self._halt is None:
            self._halt = threading.Event()
            args = (self._halt,)
            threading.Thread(target=self._poll, args=args, daemon=True, name="energy-poll").start()
        elif not wanted and self._halt is not None:
            self._halt.set()
            self._halt = None

    def _poll(self, halt: threading.Event) -> None:
        """Body of the polling thread; ends once ``halt`` is set."""
        while not halt.wait(self._poll_s):
            self._advance()
