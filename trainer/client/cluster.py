"""Connecting to Ray, placing and starting the selector, releasing actors. ``start_service`` does all of it in
one call: ``AdaptiveSubset`` (``trainer.client.api``) when it is given no selector, and ``python -m trainer.run``
(``trainer.launch``) both start their Ray and selector with it; the experiment runner and the benchmarks use
the pieces. This is the one module of ``trainer/`` that names ``service/``: it starts the selector actor.

A run joins a cluster only when one was started with ``ray start`` (its address is in Ray's bootstrap file)
or ``RAY_ADDRESS`` names one; otherwise it starts a private local Ray that no other program joins. That is
how ``ray.init()`` without an address decides; Ray's "auto" address would also join another program's
private local Ray and die with it. ``--ray local|cluster|ADDRESS`` (``ray=`` of the Python API) makes the
choice explicit (``choose_ray``); a cluster that cannot be joined is refused within seconds, in one line.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from protocol.config import ROUND_STRATEGIES, SelectorConfig
from protocol.errors import RunFailed, one_line
from protocol.receipts import Rejection


def _freeze_before_fork() -> None:
    """Before any fork: move every live object out of the cycle collector's reach (``gc.freeze``).

    A forked child (a ``DataLoader`` worker: the client's own summary loaders, or a user's) inherits the
    parent's unreachable cycles; if its collector finalizes one holding a Ray handle, the handle's ``__del__``
    calls into a Ray core worker whose locks belonged to threads the child does not have, and the worker hangs
    for good. Frozen objects are never collected in the child; the parent collects them as before."""
    global _frozen_here
    _frozen_here = gc.get_freeze_count() == 0
    gc.freeze()


def _thaw_after_fork() -> None:
    """In the parent after a fork: give the frozen objects back to the collector (unless someone else froze
    objects before, whose choice is kept)."""
    if _frozen_here:
        gc.unfreeze()


_frozen_here = False
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_freeze_before_fork, after_in_parent=_thaw_after_fork)


# the dashboard is off unless asked for (``--dashboard``), and then listens on 127.0.0.1 only; Ray 2.60 itself turns a node address of 127.0.0.1 into
# the machine's address and its gRPC servers listen on every interface, guarded by token authentication
LOCAL_OPTIONS = {"include_dashboard": False, "dashboard_host": "127.0.0.1", "log_to_driver": False,
                 "logging_level": "ERROR"}


RAY_CHOICES = ("auto", "local", "cluster")
PROBE_TIMEOUT_S = 5.0  # a cluster that does not answer the probe by then is refused


class RayUnavailable(ConnectionError):
    """The Ray asked for cannot be joined; the message is one line naming the address, the cause and the fix."""


@dataclass(frozen=True)
class RayConnection:
    """Which Ray this process is connected to and why; ``started``: a private Ray started here."""

    started: bool
    address: str
    why: str
    dashboard: str | None = None  # the private Ray's dashboard URL, when ``--dashboard`` started it

    def describe(self) -> str:
        kind = "private local Ray" if self.started else "cluster"
        return f"{kind} at {self.address} ({self.why})" + (f", dashboard {self.dashboard}" if self.dashboard else "")


connection: RayConnection | None = None  # the last connection ``connect_ray`` made in this process


def _bootstrap_file() -> str:
    try:
        from ray._common.utils import get_ray_address_file

        return get_ray_address_file(None)
    except ImportError:
        return "/tmp/ray/ray_current_cluster"


def recorded_address() -> str | None:
    """The address the last ``ray start`` on this machine recorded (Ray's bootstrap file), if any."""
    try:
        from ray._private.services import find_bootstrap_address

        return find_bootstrap_address(None)
    except (ImportError, OSError):  # a Ray without the helper, or an unreadable bootstrap file: no cluster
        return None


def cluster_address() -> str | None:
    """The address of the cluster to join: ``RAY_ADDRESS``, else the one the last ``ray start`` recorded."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    return address or recorded_address()


def _reachable(address: str, timeout_s: float = 2.0) -> bool:
    """Whether something listens at ``host:port`` (a cluster that was stopped leaves its address behind)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def choose_ray(choice: str = "auto") -> tuple[str | None, str]:
    """``(address to join or None for a private Ray, why)`` for ``--ray`` / ``ray=``.

    ``local``: always a private Ray. ``cluster``: ``RAY_ADDRESS``, else the cluster ``ray start`` recorded; none
    is an error. An address: that cluster. ``auto`` (the default): ``RAY_ADDRESS``, else the recorded cluster
    while something listens there (a stale one is passed over with a warning), else a private Ray.
    """
    choice = (choice or "auto").strip()
    if choice == "local":
        return None, "--ray local"
    if choice not in RAY_CHOICES:
        return choice, "--ray ADDRESS"
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env:
        return env, "RAY_ADDRESS"
    recorded = recorded_address()
    where = f"recorded by `ray start` in {_bootstrap_file()}"
    if choice == "cluster":
        if not recorded:
            raise RayUnavailable(f"--ray cluster: no cluster was started with `ray start` on this machine (nothing "
                                 f"recorded in {_bootstrap_file()}) and RAY_ADDRESS is not set; start one with "
                                 "`ray start --head`, name one with RAY_ADDRESS, or use --ray local")
        return recorded, where
    if recorded and _reachable(recorded):
        return recorded, where
    if recorded:
        print(f"warning: the Ray cluster recorded at {recorded} is not running; starting a private local Ray",
              file=sys.stderr)
        return None, f"the cluster recorded at {recorded} is not running"
    return None, "no cluster started with `ray start`, RAY_ADDRESS not set"


def _token_auth() -> bool:
    """Join with a token as Ray's own clients do: unless ``RAY_AUTH_MODE`` is set, a token that is available
    (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) turns token authentication on for
    this process and its children, as ``ray.init()`` does for the cluster it finds itself (it does not when
    given an address). Returns whether a token is sent."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None:
        return mode.strip().lower() == "token"
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication
        return False
    try:
        has_token = AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)
    except Exception as exc:  # noqa: BLE001 - e.g. RAY_AUTH_TOKEN_PATH names no readable file
        raise RayUnavailable(f"cannot read the Ray token: {one_line(exc).split('. ')[0]}; fix RAY_AUTH_TOKEN_PATH or "
                             "RAY_AUTH_TOKEN, or use --ray local for a private Ray") from None
    if has_token:
        os.environ["RAY_AUTH_MODE"] = "token"
        Config.initialize("")  # Ray caches its config: make this process see the mode too
    return has_token


@contextlib.contextmanager
def _quiet_stderr():
    """Ray's C++ client prints its retries on fd 2; a refused probe is reported in one line instead."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def probe_cluster(address: str, source: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Ask the cluster's GCS for its metadata before ``ray.init``, which retries for half a minute: an address
    where nothing listens, a refused token and another Ray or Python version each raise ``RayUnavailable``
    within seconds."""
    fix_local = "or use --ray local for a private Ray"
    where = f"the Ray cluster at {address} ({source})"
    if not _reachable(address, timeout_s=min(2.0, timeout_s)):
        raise RayUnavailable(f"{where}: nothing answers there (the cluster is not running or the address is "
                             f"wrong); start it with `ray start --head`, fix the address, {fix_local}")
    token = _token_auth()
    result: dict = {}

    def ask():
        try:
            from ray._raylet import GcsClient

            client = GcsClient(address=address)
            result["metadata"] = client.internal_kv_get(b"CLUSTER_METADATA", namespace=b"cluster",
                                                        timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - reported below, by type
            result["error"] = exc

    thread = threading.Thread(target=ask, daemon=True)
    with _quiet_stderr():
        thread.start()
        thread.join(timeout_s)
    if thread.is_alive():
        raise RayUnavailable(f"{where}: no Ray answered within {timeout_s:g} s; check that a Ray head runs at that "
                             f"address, {fix_local}")
    error = result.get("error")
    if error is not None:
        from ray.exceptions import AuthenticationError

        if isinstance(error, AuthenticationError):
            cause = ("refused this program's token" if token else
                     "requires token authentication and this program has no token")
            raise RayUnavailable(f"{where} {cause}; copy the cluster's token (`ray get-auth-token` on its head) into "
                                 f"~/.ray/auth_token or RAY_AUTH_TOKEN, {fix_local}")
        raise RayUnavailable(f"{where}: {one_line(error)}; check the address, {fix_local}")
    try:
        from ray._private.utils import check_version_info

        metadata = json.loads(result["metadata"]) if result.get("metadata") else None
        if metadata:
            check_version_info(metadata, "this program")
    except (ImportError, ValueError, KeyError, TypeError):
        pass  # nothing to compare with
    except Exception as exc:  # noqa: BLE001 - Ray raises a plain Exception on a version mismatch
        raise RayUnavailable(f"{where} runs another Ray or Python version: {one_line(exc)}; run this program with "
                             f"the cluster's versions, {fix_local}") from None


def connect_ray(num_cpus: int | None = None, ray_choice: str | None = "auto", dashboard: bool = False) -> bool:
    """Join a cluster or start a private local Ray, as ``ray_choice`` says (``choose_ray``).

    A cluster is probed first (``probe_cluster``): one that cannot be joined raises ``RayUnavailable`` within
    seconds. ``dashboard``: start the private Ray's dashboard on 127.0.0.1 (its URL in ``connection.dashboard``);
    refused for a cluster, whose dashboard is its own. The choice and its reason are kept in ``connection``.
    Returns True when the Ray was started here (the caller shuts it down).
    """
    global connection
    if ray.is_initialized():  # called from a program that is already connected
        return False
    address, why = choose_ray(ray_choice or "auto")
    if address and dashboard:
        raise RayUnavailable(f"--dashboard: this run joins the Ray cluster at {address} ({why}), whose dashboard "
                             "belongs to the cluster: start it with `ray start --head --dashboard-host 127.0.0.1`, "
                             "or drop --dashboard, or use --ray local for a private Ray with its own dashboard")
    if address:
        probe_cluster(address, why)
        try:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RayUnavailable(f"the Ray cluster at {address} ({why}): {one_line(exc)}; check the address, or use "
                                 "--ray local for a private Ray") from None
        connection = RayConnection(False, ray.get_runtime_context().gcs_address, why)
        return False
    context = ray.init(address="local", num_cpus=num_cpus or os.cpu_count(),
                       **{**LOCAL_OPTIONS, "include_dashboard": bool(dashboard)})
    url = getattr(context, "dashboard_url", None) if dashboard else None
    connection = RayConnection(True, ray.get_runtime_context().gcs_address, why, f"http://{url}" if url else None)
    return True


def actor_options(device: str) -> dict:
    """Both actors on one GPU (halves of one placement-group bundle) when there is one, else CPU only.

    No actor holds a CPU for life (``num_cpus=0``): on a 2-core machine a held core would starve the other.
    The placement group, if any, is under the key ``"placement_group"`` of the returned options.
    """
    gpus = ray.cluster_resources().get("GPU", 0)
    if device == "cpu" or gpus < 1:
        return {"num_cpus": 0, "num_gpus": 0}

    group = placement_group([{"GPU": 1}], strategy="STRICT_PACK")
    ray.get(group.ready(), timeout=120)
    strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=0)
    return {"num_cpus": 0, "num_gpus": 0.5, "scheduling_strategy": strategy, "placement_group": group}


def start_selector(selector_config: SelectorConfig, options: dict | None = None):
    """A selector actor for ``selector_config`` (the run config's ``selector`` branch), placed by ``options``.

    With ``shards > 1`` and a strategy with rounds it is the sharded selector (docs/scaling.md): a coordinator
    with the same interface, placed by ``options``, that places its shards itself; ``RunFailed`` when they
    cannot all be placed, before anything else starts.
    """
    # imported here: a trainer actor, which imports this module too, never loads the selector's code (scipy...)
    from service import actor as selector_actor
    from service.actor import SelectorActor, ShardedSelectorActor

    options = options or {"num_cpus": 0, "num_gpus": 0}
    shards = selector_config.shards
    if shards <= 1 or selector_config.strategy not in ROUND_STRATEGIES:
        return SelectorActor.options(**options).remote(selector_config)
    selector = ShardedSelectorActor.options(**options).remote(selector_config)
    timeout_s = selector_actor.SHARD_PLACE_TIMEOUT_S  # read at each call (tests shorten it)
    try:
        answer = ray.get(selector.placed.remote(timeout_s), timeout=timeout_s + 60)
        reason = answer.rule if isinstance(answer, Rejection) else None
    except Exception as exc:  # the coordinator itself could not start
        reason = one_line(exc)
    if reason is None:
        return selector
    try:
        ray.get(selector.stop.remote(), timeout=30)  # frees the shards' placement group
    except Exception:
        pass
    release(selector)
    raise RunFailed(f"--shards {shards}: {reason}")


def release(*actors, group=None) -> None:
    """Stop actors (their open rounds fail at once) and free their placement group; never raises."""
    for actor in actors:
        if actor is None:
            continue
        try:
            ray.kill(actor)
        except Exception:  # already gone
            pass
    if group is not None:
        try:
            remove_placement_group(group)
        except Exception:
            pass


# services of this process on the private Ray one of them started; the last to close shuts it down
_private_ray = {"started": False, "users": 0}


def _join_private_ray(started_here: bool) -> bool:
    """Count a service as a user of the private Ray when it (or an earlier service) started it."""
    _private_ray["started"] = _private_ray["started"] or started_here
    if _private_ray["started"]:
        _private_ray["users"] += 1
    return _private_ray["started"]


def _leave_private_ray() -> None:
    _private_ray["users"] -= 1
    if _private_ray["users"] <= 0:
        _private_ray.update(started=False, users=0)
        ray.shutdown()


def _cluster_resources() -> dict:
    return ray.cluster_resources()


@dataclass
class Service:
    """A running selector and what was started for it (``start_service``).

    ``options`` place another actor beside the selector (the built-in trainer: the other half of its GPU bundle,
    no CPU held); ``group`` is their placement group (None without a GPU); ``private_ray``: this service uses the
    private Ray that this process started, which the last such service to close shuts down (a cluster, or a
    Ray the program had already joined, is never shut down here).
    """

    selector: object
    options: dict = field(default_factory=lambda: {"num_cpus": 0, "num_gpus": 0})
    group: object = None
    private_ray: bool = False
    closed: bool = False

    def close(self) -> None:
        """Stop the selector (its open rounds fail at once), free the placement group, and shut down the private
        Ray this process started once no other service uses it. Safe to call twice; never raises for an actor
        already gone."""
        if self.closed:
            return
        self.closed = True
        release(self.selector, group=self.group)
        if self.private_ray:
            _leave_private_ray()

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_service(selector_config: SelectorConfig, *, ray: str | None = "auto", device: str = "auto",
                  dashboard: bool = False, num_cpus: int | None = None, options: dict | None = None,
                  check: Callable[[dict], None] | None = None) -> Service:
    """Join or start Ray (``connect_ray``: ``ray`` is ``--ray`` / ``ray=``, ``dashboard`` and ``num_cpus`` are a
    private Ray's), place the selector (``actor_options(device)``: on one GPU bundle when there is one and
    ``device`` is not ``"cpu"``) and start it (``start_selector``). The one way the command line and
    ``AdaptiveSubset`` start a selector. ``options``, when given, place the selector instead (the caller's own
    placement, as an experiment's trial in its bundle): no placement group is made.

    ``check(resources)``, when given, is called once Ray is joined and before anything is placed, with
    ``ray.cluster_resources()``; what it raises (a cluster that cannot hold the run) propagates. On any failure
    what was started here is released (a private Ray started here shut down) before the error propagates:
    ``RayUnavailable`` for a Ray that cannot be joined, ``RunFailed`` for shards that cannot be placed.
    """
    private = _join_private_ray(connect_ray(num_cpus=num_cpus, ray_choice=ray, dashboard=dashboard))
    service = Service(selector=None, private_ray=private)
    try:
        if check is not None:
            check(_cluster_resources())
        options = dict(actor_options(device) if options is None else options)
        service.group = options.pop("placement_group", None)
        service.options = options
        service.selector = start_selector(selector_config, options)
    except BaseException:
        service.close()
        raise
    return service
