"""Where the per-batch work of a run happens: in this process, or on a Ray Data actor pool.

Evaluation and hidden-state collection are a map over request batches followed by an append on the
driver. An executor runs that map::

    for index, result in executor.map(make_worker, items, shared):
        ...  # the driver writes `result` (the single writer), in whatever order results arrive

`make_worker(**shared)` builds the per-item function once per worker (once in-process for
:class:`LocalExecutor`, once per actor for :class:`RayExecutor`): that is where a backbone and heads
are loaded. `shared` holds the big fitted objects; Ray sends them by object reference, once.
Every item index is yielded exactly once, or the iterator raises :class:`ExecutorError`.

Ray is optional (``pip install 'mhee-sdk[ray]'``) and imported only when a Ray executor runs.
"""

from __future__ import annotations

import importlib.util
import math
import os
import pickle
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from mhee_sdk.config import RunConfig

EXECUTORS = ("local", "ray")
RAY_EXTRA = "executor='ray' needs the ray extra: pip install 'mhee-sdk[ray]'"

Worker = Callable[[Any], Any]  # one item -> its result
MakeWorker = Callable[..., Worker]  # make_worker(**shared) -> Worker; picklable for Ray


class ExecutorError(RuntimeError):
    """A map that could not deliver every item exactly once; the cause is chained and named in the message."""


@runtime_checkable
class Executor(Protocol):
    """Runs ``make_worker(**shared)`` on each worker and maps items through it."""

    in_process: bool  # True: workers are this process, so live objects (a loaded backbone) can be shared as they are

    def map(
        self, make_worker: MakeWorker, items: Sequence[Any], shared: Mapping[str, Any] | None = None
    ) -> Iterator[tuple[int, Any]]:
        """Yield ``(item index, result)`` for every item exactly once, in completion order."""
        ...


class LocalExecutor:
    """Items in order, in this process: the behaviour (and timing) of a plain loop."""

    in_process = True

    def map(
        self, make_worker: MakeWorker, items: Sequence[Any], shared: Mapping[str, Any] | None = None
    ) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, worker(item))`` for each item, in order."""
        worker = make_worker(**dict(shared or {}))
        for index, item in enumerate(items):
            yield index, worker(item)

    def __repr__(self) -> str:
        return "LocalExecutor()"


def ray_available() -> bool:
    """Whether the ray extra is installed (``import ray`` would work)."""
    return importlib.util.find_spec("ray") is not None


def start_local_ray(num_cpus: int | None = None, attempts: int = 2, **kwargs: Any) -> None:
    """``ray.init`` of a new local cluster, retried when the raylet times out waiting for its agent.

    ``address="local"``: a bare ``ray.init()`` would attach to a ``ray start`` cluster on this machine
    instead. Ray 2.60's raylet waits a hard-coded 15 s for its dashboard agent (ray#65983); on an
    overloaded machine startup then fails with "node timed out during startup", so retry.
    """
    import ray

    kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": "warning", **kwargs}
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", num_cpus=num_cpus, **kwargs)
            return
        except Exception as err:  # ray raises plain Exception for a failed node start
            ray.shutdown()
            if "timed out during startup" not in str(err) or attempt == attempts:
                if "timed out during startup" in str(err):
                    err.add_note("the machine is too busy for Ray's 15 s startup wait (ray#65983); retry when idle")
                raise


def _enable_token_auth() -> None:
    """Ray 2.60: a driver given an explicit address does not turn token auth on by itself.

    Clusters started on this machine (``ray start`` or ``ray.init()``) use token auth once
    ``~/.ray/auth_token`` exists; a driver connecting with an address then fails with
    ``ConnectionError`` after ~40 s unless ``RAY_AUTH_MODE=token`` is set before Ray reads its config.
    """
    if "RAY_AUTH_MODE" in os.environ or not (Path.home() / ".ray" / "auth_token").exists():
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    if "ray" in sys.modules:  # Ray read its config at import: make it read it again
        from ray._raylet import Config

        Config.initialize("")


# DataContext is process-global: these are the fields a run changes, restored afterwards.
_CONTEXT_FIELDS = (
    "enable_progress_bars", "enable_operator_progress_bars", "print_on_execution_start", "enable_auto_log_stats",
    "actor_task_retry_on_errors", "max_errored_blocks", "raise_original_map_exception",
    "execution_no_progress_timeout_s",
)  # fmt: skip


class _BatchActor:
    """A Ray Data actor: builds the worker once, then maps rows ``{index, payload}`` of pickled items."""

    def __init__(self, make_worker: MakeWorker, shared_refs: Mapping[str, Any], threads: int) -> None:
        import ray

        # refs inside fn_constructor_kwargs are not resolved by Ray Data: get them here
        shared = {name: ray.get(ref) for name, ref in shared_refs.items()}
        self.worker = make_worker(**shared)
        if "torch" in sys.modules:  # Ray sets OMP_NUM_THREADS from num_cpus; say it explicitly to torch too
            sys.modules["torch"].set_num_threads(threads)

    def __call__(self, rows: dict) -> dict:
        import numpy as np

        out = [pickle.dumps(self.worker(pickle.loads(p)), protocol=pickle.HIGHEST_PROTOCOL) for p in rows["payload"]]
        return {"index": rows["index"], "payload": np.array(out, dtype=object)}


class RayExecutor:
    """Items on a Ray Data actor pool; each actor builds the worker once (loads the backbone once).

    Args:
        address: a cluster (``"ray://..."``, ``"host:port"``, ``"auto"``); None: ``RAY_ADDRESS`` if set,
            else the Ray already initialized in this process, else a new local cluster.
        num_workers: actors in the pool; None: as many as the cluster's CPUs (and GPUs) allow.
        cpus_per_worker: Ray CPUs per actor; also its torch threads (at least 1).
        gpus_per_worker: Ray GPUs per actor (fractions share a GPU).
        max_task_retries: how often one item is re-run after its actor died or raised.
        no_progress_timeout_s: fail instead of hanging when no item finishes for this long.
    """

    in_process = False

    def __init__(
        self,
        address: str | None = None,
        num_workers: int | None = None,
        cpus_per_worker: float = 1.0,
        gpus_per_worker: float = 0.0,
        max_task_retries: int = 3,
        no_progress_timeout_s: float = 600.0,
    ) -> None:
        if not ray_available():
            raise ImportError(RAY_EXTRA)
        check_executor_settings("ray", address, num_workers, cpus_per_worker, gpus_per_worker)
        if not isinstance(max_task_retries, int) or max_task_retries < 0:  # -1 (Ray's default) retries forever
            raise ValueError(f"max_task_retries={max_task_retries!r} must be a non-negative integer")
        self.address, self.num_workers = address, num_workers
        self.cpus_per_worker, self.gpus_per_worker = float(cpus_per_worker), float(gpus_per_worker)
        self.max_task_retries, self.no_progress_timeout_s = max_task_retries, float(no_progress_timeout_s)
        self.started = False  # this executor started a local cluster (close() stops it)

    def __repr__(self) -> str:
        return (f"RayExecutor(address={self.address!r}, num_workers={self.num_workers}, "
                f"cpus_per_worker={self.cpus_per_worker:g}, gpus_per_worker={self.gpus_per_worker:g})")  # fmt: skip

    def connect(self) -> None:
        """Make sure Ray is initialized: reuse this process's Ray, connect to `address`, or start a local cluster.

        A local cluster started here stays up for later runs; it stops at exit or on :meth:`close`.
        """
        address = self.address or os.environ.get("RAY_ADDRESS")
        if address:
            _enable_token_auth()  # before `import ray` reads the auth mode
        import ray

        if ray.is_initialized():
            return
        if address:
            ray.init(address=address, log_to_driver=False, logging_level="warning")
        else:
            start_local_ray()
            self.started = True

    def close(self) -> None:
        """Stop the local cluster this executor started (a cluster it only joined keeps running)."""
        if self.started:
            import ray

            ray.shutdown()
            self.started = False

    def pool_size(self, items: int) -> int:
        """Actors for `items` items: `num_workers`, or what the cluster's CPUs/GPUs fit; warns when they do not fit."""
        import ray

        resources = ray.cluster_resources()
        fit = math.floor(resources.get("CPU", 0) / self.cpus_per_worker + 1e-9)
        if self.gpus_per_worker:
            fit = min(fit, math.floor(resources.get("GPU", 0) / self.gpus_per_worker + 1e-9))
        wanted = self.num_workers or max(1, fit)
        if wanted > fit:  # Ray would start the ones that fit and leave the rest pending, silently
            warnings.warn(
                f"{wanted} workers x {self.cpus_per_worker:g} CPUs / {self.gpus_per_worker:g} GPUs do not fit the "
                f"cluster ({resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs): only {max(fit, 0)} "
                "run at a time",
                stacklevel=3,
            )
        return max(1, min(wanted, items))

    def map(
        self, make_worker: MakeWorker, items: Sequence[Any], shared: Mapping[str, Any] | None = None
    ) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, result)`` for every item exactly once, as actors finish them (any order)."""
        if not items:
            return
        self.connect()
        import ray
        import ray.data

        context = ray.data.DataContext.get_current()
        saved = {name: getattr(context, name) for name in _CONTEXT_FIELDS}
        seen: set[int] = set()
        try:
            context.enable_progress_bars = context.enable_operator_progress_bars = False  # the caller draws its own
            context.print_on_execution_start = context.enable_auto_log_stats = False
            context.actor_task_retry_on_errors = True  # an item whose worker raised is re-run, max_task_retries times
            context.max_errored_blocks = 0  # never skip a failed item
            context.raise_original_map_exception = True  # the cause is the worker's own exception
            context.execution_no_progress_timeout_s = self.no_progress_timeout_s  # a stall fails instead of hanging
            # kept referenced until the run ends: actors restarted later still find them
            shared_refs = {name: ray.put(value) for name, value in (shared or {}).items()}
            rows = [{"index": i, "payload": pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)}
                    for i, item in enumerate(items)]  # fmt: skip
            # from_items: no read task competing with the actors for CPUs (a 2-CPU cluster with 2 actors and a
            # read stage deadlocks); one block per item, so one Ray task, and one retry, per item
            data = ray.data.from_items(rows, override_num_blocks=len(rows))
            del rows
            env = {name: value for name, value in os.environ.items() if name.startswith("MHEE_")}
            with warnings.catch_warnings():  # max_restarts/max_task_retries as remote args: deprecated, still needed
                warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
                data = data.map_batches(
                    _BatchActor,
                    fn_constructor_kwargs={
                        "make_worker": make_worker,
                        "shared_refs": shared_refs,
                        "threads": max(1, math.floor(self.cpus_per_worker)),
                    },
                    compute=ray.data.ActorPoolStrategy(size=self.pool_size(len(items))),
                    num_cpus=self.cpus_per_worker,
                    num_gpus=self.gpus_per_worker or None,
                    batch_size=1,
                    max_restarts=-1,  # a dead actor is replaced ...
                    max_task_retries=self.max_task_retries,  # ... and its item re-run; Ray Data's default -1 loops
                    runtime_env={"env_vars": env},  # the driver's MHEE_HOME etc.: workers on a cluster lack them
                )
            try:
                for block in data.iter_batches(batch_size=None, prefetch_batches=2):
                    for index, payload in zip(block["index"], block["payload"], strict=True):
                        index = int(index)
                        if not 0 <= index < len(items):
                            raise ExecutorError(f"a worker returned item {index}, but there are {len(items)} items")
                        if index in seen:  # never observed; never write a result twice either
                            continue
                        seen.add(index)
                        yield index, pickle.loads(payload)
            except ExecutorError:
                raise
            except Exception as err:  # KeyboardInterrupt passes through as it is
                raise ExecutorError(
                    f"Ray run failed after {len(seen)}/{len(items)} items: {describe_error(err)}"
                ) from err
            if len(seen) != len(items):
                missing = sorted(set(range(len(items))) - seen)
                raise ExecutorError(f"{len(missing)} of {len(items)} items never came back: {missing[:10]}")
        finally:
            for name, value in saved.items():
                setattr(context, name, value)


def describe_error(err: BaseException) -> str:
    """The innermost cause of a Ray error as one line ``Type: message`` (the worker's own exception)."""
    for _ in range(5):  # RayTaskError / ActorDiedError wrap the worker's exception in .cause
        inner = getattr(err, "cause", None)
        if not isinstance(inner, BaseException):
            break
        err = inner
    text = str(err).strip()
    if not text:
        return type(err).__name__
    lines = text.splitlines()
    raised = [line.strip() for line in lines if re.match(r"^\s*[A-Za-z_.]*(Error|Exception): ", line)]
    if len(lines) > 1 and raised:  # a traceback in the message (an actor that died): its last raise is the cause
        return f"{type(err).__name__}: {raised[-1]}"
    return f"{type(err).__name__}: {lines[0]}"


def check_executor_settings(
    executor: str, address: str | None, num_workers: int | None, cpus_per_worker: float, gpus_per_worker: float
) -> None:
    """One-line ValueError naming the first bad executor setting."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor={executor!r} is unknown; choose from: {', '.join(EXECUTORS)}")
    if address is not None and (not isinstance(address, str) or not address.strip()):
        raise ValueError(f"ray_address={address!r} must be a non-empty string (e.g. 'auto' or 'host:6379') or None")
    if num_workers is not None and (not isinstance(num_workers, int) or isinstance(num_workers, bool)
                                    or num_workers < 1):  # fmt: skip
        raise ValueError(f"num_workers={num_workers!r} must be a positive integer or None (as many as fit)")
    for name, value, low in (("cpus_per_worker", cpus_per_worker, 0.0), ("gpus_per_worker", gpus_per_worker, None)):
        number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not number or (value <= 0 if low is not None else value < 0):
            need = "a positive number" if low is not None else "a non-negative number"
            raise ValueError(f"{name}={value!r} must be {need}")


def executor_for(config: RunConfig) -> Executor:
    """The executor a run config asks for (`executor`, `ray_address`, `num_workers`, `*_per_worker`)."""
    if config.executor == "local":
        return LocalExecutor()
    return RayExecutor(config.ray_address, config.num_workers, config.cpus_per_worker, config.gpus_per_worker)
