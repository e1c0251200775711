"""The worker: claims workflows, runs them in threads, renews their leases."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Collection
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any

from django.db import DatabaseError, Error, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.utils import timezone

from . import encoding, telemetry
from .backends import backend_for
from .bus import (
    Waiter,
    flush_notifications,
    poll_interval,
    publish_changes,
    queue_topic,
    subscribe,
)
from .conf import get_config
from .db import ConnectionKeeper, alias, take_write_lock
from .exceptions import Interrupted, LeaseLost, Suspended, WorkflowNotRegistered
from .models import Claim, Status, WorkerProcess, Workflow, WorkflowQuerySet
from .models.workers import GONE_AFTER_BEATS
from .runtime import execution as runtime
from .runtime import registry, writer
from .scheduler import Scheduler

logger = logging.getLogger("durable_streams.worker")

# How often a worker looks for enqueued runs of workflows it does not know, and how
# long it keeps quiet about one it has already warned of.
UNKNOWN_CHECK_SECONDS = 60.0
UNKNOWN_WARNING_SECONDS = 600.0
# Rows of gone workers are swept at every this many beats of a live worker's own row.
SWEEP_EVERY_BEATS = 3
# When this process loaded the worker: with the pid, it tells a process from a later one
# that reuses its pid.
PROCESS_STARTED_AT = timezone.now()


class WorkflowAdapter(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        # extra, None for the stubs, is always given: {"workflow_id": ...}.
        return f"[{self.extra['workflow_id']}] {msg}", kwargs  # type: ignore[index]


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    """Runs workflows from ``queues`` with up to ``concurrency`` at once.

    ``run()`` returns when ``stop()`` is called (or a signal arrives, when
    ``handle_signals`` is set), or, in ``burst`` mode, when no work is left.
    """

    def __init__(
        self,
        *,
        queues: Collection[str] = ("default",),
        concurrency: int = 4,
        burst: bool = False,
        worker_id: str | None = None,
        handle_signals: bool = False,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(
                f"concurrency must be a whole number of at least 1, not {concurrency!r}."
            )
        if not queues:
            raise ValueError("A worker needs at least one queue.")
        self.queues = list(dict.fromkeys(queues))
        self.concurrency = concurrency
        self.burst = burst
        self.worker_id = worker_id or default_worker_id()
        self.handle_signals = handle_signals
        self.using = alias()
        self._stopping = threading.Event()
        self._heartbeat_done = threading.Event()
        # Rung when work is announced, a slot frees up, or the worker stops.
        self._waiter: Waiter | None = None
        self._lock = threading.Lock()
        self._running: dict[str, runtime.Execution | None] = {}
        # Pool threads keep their connection from one workflow to the next: opening
        # one costs more than a short workflow. The idle ones are closed at shutdown.
        self._parked_lock = threading.Lock()
        self._parked: dict[int, BaseDatabaseWrapper] = {}
        self._keepers = threading.local()
        self._signals = 0
        self._next_exhausted_check = 0.0
        self._next_unknown_check = 0.0
        self._unknown_warned: dict[str, float] = {}
        self._registered = False
        # The earliest timer of the waiting runs of this worker's queues, as last read.
        self._next_wake: datetime | None = None
        self._wake_known = False
        self._beats = 0
        self.completed = 0
        # A burst worker drains the queues: it starts no scheduled run.
        self._scheduler = None if burst else Scheduler(self.queues, self.using)

    # Control

    def stop(self) -> None:
        """Stop claiming work; running workflows stop at their next step boundary."""
        self._stopping.set()
        self._ring()
        with self._lock:
            for execution in self._running.values():
                if execution is not None:
                    execution.stop_reason = "the worker is shutting down"
                    execution.stop.set()

    def _ring(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            waiter.ring()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            logger.warning("Second signal: exiting now; leases expire and other workers resume.")
            os._exit(1)
        logger.info(
            "%s received: no new work; running workflows stop at their next step "
            "(within %ss), then go back to the queue. Signal again to exit now.",
            signal.Signals(signum).name,
            get_config().SHUTDOWN_GRACE_SECONDS,
        )
        # The handler runs in the main thread between any two bytecodes, maybe while the
        # loop holds self._lock: stop from another thread, which can wait for the lock.
        threading.Thread(target=self.stop, name="durable-streams-stop", daemon=True).start()

    # The loop

    def run(self) -> None:
        if self.handle_signals:
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        names = registry.names()
        logger.info(
            "Worker %s started: queues %s, concurrency %d, %d workflows registered.",
            self.worker_id,
            ", ".join(self.queues),
            self.concurrency,
            len(names),
        )
        self._describe_registry()
        self._register()
        heartbeat = threading.Thread(
            target=self._heartbeat, name="durable-streams-heartbeat", daemon=True
        )
        heartbeat.start()
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="durable-streams-workflow")
        try:
            with subscribe([queue_topic(q) for q in self.queues]) as waiter:
                self._waiter = waiter
                interval = poll_interval(self.using)
                keeper = ConnectionKeeper(self.using)
                while not self._stopping.is_set():
                    waiter.clear()
                    free = self.concurrency - len(self._running)
                    try:
                        keeper.ready()
                        names = registry.names()
                        if self._scheduler is not None:
                            self._scheduler.start_due()
                        claimed = self._claim(free, names) if free > 0 else []
                        self._warn_unknown(names)
                    except DatabaseError as exc:
                        # The database restarted or the network blipped: try again later.
                        hint = backend_for(self.using).explain(exc)
                        if hint is None:
                            logger.exception("Could not claim work; retrying in %ss.", interval)
                        else:
                            logger.warning(
                                "Could not claim work: %s Retrying in %ss.", hint, interval
                            )
                        keeper.broken()
                        claimed = []
                    for claim in claimed:
                        with self._lock:
                            self._running[claim.workflow_id] = None
                        future = pool.submit(self._execute, claim)
                        future.add_done_callback(self._done_callback(claim.workflow_id))
                    if claimed and len(claimed) == free:
                        continue
                    # Only when nothing ran during the claim either: a run that ended
                    # meanwhile may have gone back to the queue (a database fault).
                    idle = free == self.concurrency and not self._running
                    # A burst worker stays for the timers of its waiting runs (a sleep,
                    # a recv's deadline): they are work that is already there.
                    if self.burst and not claimed and idle and not self._timers(names):
                        break
                    if not self._stopping.is_set() and waiter.wait(
                        self._wait_for(interval, names, keeper)
                    ):
                        # Rung: a run may have been suspended with a new timer.
                        self._wake_known = False
        finally:
            self._waiter = None
            self._shutdown(pool)
            # No beat may bring the row back once it is deleted.
            heartbeat.join(get_config().WORKER_HEARTBEAT_SECONDS + 5)
            self._unregister()
            # Workflows handed back at shutdown are announced to the other workers.
            flush_notifications()
            writer.release_connections()
            connections.close_all()

    def _timers(self, names: list[str]) -> bool:
        try:
            return Workflow.objects.using(self.using).next_wake(self.queues, names) is not None
        except DatabaseError:
            return False

    def _wait_for(self, interval: float, names: list[str], keeper: ConnectionKeeper) -> float:
        """The idle wait, cut short for the next scheduled tick to start on time."""
        wait = self._idle_wait(interval, names, keeper)
        left = None if self._scheduler is None else self._scheduler.seconds_left()
        return wait if left is None else min(wait, left)

    def _idle_wait(self, interval: float, names: list[str], keeper: ConnectionKeeper) -> float:
        """How long the loop may wait for an announcement: at most until the next timer
        of a waiting run, so that it fires on time without a polling loop.

        The timer is read from the database again only after a ring (a suspension
        announces its queue) or once it is due: an idle loop costs no query for it.
        """
        if len(self._running) >= self.concurrency or not names:
            return interval
        if not self._wake_known:
            try:
                keeper.ready()
                self._next_wake = Workflow.objects.using(self.using).next_wake(self.queues, names)
            except DatabaseError:
                keeper.broken()
                return interval
            self._wake_known = True
        if self._next_wake is None:
            return interval
        left = (self._next_wake - timezone.now()).total_seconds()
        if left <= 0:
            # Due: the next claim takes it; read the timer after it again.
            self._wake_known = False
        return max(0.0, min(interval, left))

    def _describe_registry(self) -> None:
        """Say which workflows this worker can run, and which of its queues none uses."""
        queues_of = {name: registry.get(name).queue for name in registry.names()}
        logger.debug(
            "Registered workflows: %s.",
            ", ".join(f"{name} (queue {queue!r})" for name, queue in sorted(queues_of.items()))
            or "none",
        )
        if not queues_of:
            logger.warning(
                "No workflow is registered in this process, so it will run nothing. Define "
                "workflows in a workflows.py module of an installed app (it is imported at "
                "start-up, like admin.py)."
            )
            return
        used = set(queues_of.values())
        for queue in self.queues:
            if queue not in used:
                logger.warning(
                    "No registered workflow uses queue %r by default (they use %s); this "
                    "worker runs only what is started with queue=%r.",
                    queue,
                    ", ".join(repr(q) for q in sorted(used)),
                    queue,
                )

    def _warn_unknown(self, names: list[str]) -> None:
        """Warn, now and then, about enqueued runs of workflows this worker does not know.

        No claim ever takes them, so without this they would wait in silence.
        """
        now = time.monotonic()
        if now < self._next_unknown_check:
            return
        self._next_unknown_check = now + UNKNOWN_CHECK_SECONDS
        waiting = list(
            Workflow.objects.using(self.using)
            .filter(status=Status.ENQUEUED, queue__in=self.queues)
            .exclude(name__in=names)
            .values_list("name", "queue")
            .order_by()
            .distinct()[:20]
        )
        if not waiting:
            return
        # Another live worker may run them: only a name that none knows is worth a warning.
        known = WorkerProcess.objects.using(self.using).known_names()
        if known is None:
            return
        for name, queue in waiting:
            if name in known or now < self._unknown_warned.get(name, 0.0):
                continue
            self._unknown_warned[name] = now + UNKNOWN_WARNING_SECONDS
            logger.warning(
                "Runs of workflow %r wait in queue %r, but no running worker has it registered, "
                "so none takes them. Is the module that defines it a workflows.py module "
                "of an installed app, and are the workers running the same code as the process "
                "that started them?",
                name,
                queue,
            )

    def _done_callback(self, workflow_id: str) -> Any:
        def done(future: Future[None]) -> None:
            with self._lock:
                self._running.pop(workflow_id, None)
            self._ring()

        return done

    def _shutdown(self, pool: ThreadPoolExecutor) -> None:
        self.stop()
        grace = get_config().SHUTDOWN_GRACE_SECONDS
        deadline = time.monotonic() + grace
        while self._running and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            left = list(self._running)
        if left:
            try:
                released, changes = Workflow.objects.using(self.using).release(self.worker_id, left)
                publish_changes(changes, self.using)
            except Error:
                logger.exception("Could not release %d workflows; their leases expire.", len(left))
                released = 0
            logger.warning(
                "%d workflows still in a step after %ss; released %d of them to other workers.",
                len(left),
                grace,
                released,
            )
        self._heartbeat_done.set()
        pool.shutdown(wait=False, cancel_futures=True)
        self._close_parked_connections()
        logger.info("Worker %s stopped after %d workflows.", self.worker_id, self.completed)

    # Claims

    def _claim(self, limit: int, names: list[str]) -> list[Claim]:
        until = timezone.now() + timedelta(seconds=get_config().LEASE_SECONDS)
        runs = Workflow.objects.using(self.using)
        with self._lock:
            # A run still stopping here (cancelled, then resumed) must not start twice.
            busy = list(self._running)
        claimed = runs.claim(
            self.worker_id, self.queues, names, limit, lease_until=until, exclude=busy
        )
        for claim in claimed:
            if claim.previous_status == Status.RUNNING:
                logger.warning(
                    "[%s] Lease of worker %s expired; resuming from checkpoints.",
                    claim.workflow_id,
                    claim.previous_owner,
                )
        # No claim takes the workflows that used their attempts: end them, now and then
        # (they only come from crashed runs), and before a burst worker leaves.
        now = time.monotonic()
        leaving = self.burst and not claimed and not busy
        if len(claimed) < limit and (now >= self._next_exhausted_check or leaving):
            self._next_exhausted_check = now + get_config().HEARTBEAT_SECONDS
            exhausted = runs.exhausted(self.queues, names).exclude(pk__in=busy)
            for pk, attempts, lease_owner in exhausted.values_list("pk", "attempts", "lease_owner")[
                :100
            ]:
                self._give_up(exhausted, pk, attempts, lease_owner)
        return claimed

    def _give_up(
        self,
        exhausted: WorkflowQuerySet,
        workflow_id: str,
        attempts: int,
        lease_owner: str | None,
    ) -> None:
        message = (
            f"Workflow {workflow_id!r} was claimed {attempts} times (max_attempts) without "
            f"finishing; the last worker to hold it was {lease_owner!r}. Its worker kept "
            "stopping before the end: look for a crash, a kill or an out-of-memory in that run."
        )
        error = encoding.dumps({"type": "MaxAttemptsExceeded", "message": message, "traceback": ""})
        # Through the same filter: a workflow resumed or ended meanwhile is left alone.
        finished, changes = exhausted.finish(workflow_id, Status.ERROR, error=error)
        publish_changes(changes, self.using)
        if finished:
            logger.error("[%s] %s", workflow_id, message)

    # This worker's row in the worker processes table

    def _register(self) -> bool:
        try:
            WorkerProcess.objects.using(self.using).register(
                self.worker_id,
                hostname=socket.gethostname(),
                pid=os.getpid(),
                process_started_at=PROCESS_STARTED_AT,
                queues=self.queues,
                concurrency=self.concurrency,
                names=registry.names(),
            )
        except Error:
            # The heartbeat tries again: the row only informs operators.
            logger.exception("Could not record this worker in the worker processes table.")
            return False
        self._registered = True
        return True

    def _beat(self) -> None:
        """Refresh this worker's row (inserting it again if it was swept), now and then
        deleting the rows of gone workers."""
        workers = WorkerProcess.objects.using(self.using)
        beating = self._registered and workers.beat(self.worker_id)
        if not beating and not self._register():
            return
        self._beats += 1
        if self._beats % SWEEP_EVERY_BEATS == 1:
            swept = workers.sweep()
            if swept:
                logger.info(
                    "Removed %d workers from the worker processes table: no heartbeat for %ss.",
                    swept,
                    GONE_AFTER_BEATS * get_config().WORKER_HEARTBEAT_SECONDS,
                )

    def _unregister(self) -> None:
        try:
            WorkerProcess.objects.using(self.using).filter(pk=self.worker_id).delete()
        except Error:
            logger.warning(
                "Could not remove this worker from the worker processes table; it counts "
                "as gone once its heartbeat is %ss old.",
                GONE_AFTER_BEATS * get_config().WORKER_HEARTBEAT_SECONDS,
            )

    # Heartbeats

    def _heartbeat(self) -> None:
        # Runs until the shutdown is over: leases of workflows finishing their last
        # step during the grace period must not expire. It also beats the worker's row,
        # on its own schedule: no claim pays a query for it.
        config = get_config()
        keeper = ConnectionKeeper(self.using)
        started = time.monotonic()
        next_renewal = started + config.HEARTBEAT_SECONDS
        next_beat = started + config.WORKER_HEARTBEAT_SECONDS
        while not self._heartbeat_done.wait(
            max(min(next_renewal, next_beat) - time.monotonic(), 0.0)
        ):
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + config.WORKER_HEARTBEAT_SECONDS
                try:
                    keeper.ready()
                    self._beat()
                except Exception as exc:
                    hint = (
                        backend_for(self.using).explain(exc)
                        if isinstance(exc, DatabaseError)
                        else None
                    )
                    if hint is None:
                        logger.exception(
                            "Worker heartbeat failed; retrying in %ss.",
                            config.WORKER_HEARTBEAT_SECONDS,
                        )
                    else:
                        logger.warning(
                            "Worker heartbeat failed: %s Retrying in %ss.",
                            hint,
                            config.WORKER_HEARTBEAT_SECONDS,
                        )
                    keeper.broken()
            if now < next_renewal:
                continue
            next_renewal = now + config.HEARTBEAT_SECONDS
            with self._lock:
                ids = list(self._running)
            if not ids:
                continue
            try:
                keeper.ready()
                until = timezone.now() + timedelta(seconds=config.LEASE_SECONDS)
                with transaction.atomic(using=self.using):
                    take_write_lock(self.using)
                    held = Workflow.objects.using(self.using).renew_leases(
                        self.worker_id, ids, until
                    )
            except Exception:
                logger.exception("Lease renewal failed; retrying in %ss.", config.HEARTBEAT_SECONDS)
                keeper.broken()
                continue
            with self._lock:
                for workflow_id in ids:
                    execution = self._running.get(workflow_id)
                    if workflow_id not in held and execution is not None:
                        execution.stop_reason = (
                            "the workflow was cancelled or reclaimed by another worker"
                        )
                        execution.stop.set()
        connections.close_all()

    # Running one workflow

    def _execute(self, claim: Claim) -> None:
        log = WorkflowAdapter(logger, {"workflow_id": claim.workflow_id})
        try:
            self._unpark_connection()
            with telemetry.workflow_run(claim, registry.queue_of(claim.name)):
                self._run_workflow(claim, log)
        except Exception:
            log.exception("Worker error while running the workflow; its lease will expire.")
        finally:
            self._park_connection()

    def _unpark_connection(self) -> None:
        with self._parked_lock:
            self._parked.pop(threading.get_ident(), None)
        keeper = getattr(self._keepers, "keeper", None)
        if keeper is None:
            keeper = self._keepers.keeper = ConnectionKeeper(self.using)
        keeper.ready()

    def _park_connection(self) -> None:
        """Keep this thread's connection for its next workflow; close the others."""
        for connection in connections.all(initialized_only=True):
            if connection.alias != self.using:
                connection.close()
        connection = connections[self.using]
        with self._parked_lock:
            if self._stopping.is_set() or connection.in_atomic_block:
                connection.close()
            elif connection.connection is not None:
                self._parked[threading.get_ident()] = connection

    def _close_parked_connections(self) -> None:
        # Under the lock: a pool thread starting late waits, then opens a new one.
        with self._parked_lock:
            for connection in self._parked.values():
                connection.inc_thread_sharing()
                try:
                    connection.close()
                finally:
                    connection.dec_thread_sharing()
            self._parked.clear()

    def _run_workflow(self, claim: Claim, log: WorkflowAdapter) -> None:
        workflow_id = claim.workflow_id
        runs = Workflow.objects.using(self.using)
        try:
            wf = registry.get(claim.name)
        except WorkflowNotRegistered as exc:
            failure = encoding.dumps(runtime.error_record(exc))
            finished, changes = runs.finish_held(
                self.worker_id, workflow_id, Status.ERROR, error=failure
            )
            publish_changes(changes, self.using)
            if finished:
                telemetry.workflow_ended(Status.ERROR, failure)
            log.error("%s", exc)
            return
        if claim.has_history:
            try:
                execution = runtime.Execution.load(workflow_id, self.worker_id, self.using)
            except Error as exc:
                log.warning("Could not read what earlier runs recorded (%s).", exc)
                self._hand_back(workflow_id, log)
                return
        else:
            execution = runtime.Execution(workflow_id, self.worker_id, self.using)
        with self._lock:
            if self._stopping.is_set():
                execution.stop_reason = "the worker is shutting down"
                execution.stop.set()
            self._running[workflow_id] = execution
        replaying = bool(execution.history)
        log.info(
            "Running %s (attempt %d%s).",
            claim.name,
            claim.attempts,
            f", replaying {len(execution.history)} recorded operations" if replaying else "",
        )
        inputs = encoding.loads(claim.inputs)
        started = time.monotonic()
        status, output, error = Status.SUCCESS, None, None
        with runtime.executing(execution):
            try:
                try:
                    args = inputs["args"]
                    if wf.schedule is not None and len(args) == 1 and isinstance(args[0], str):
                        # The tick, stored as JSON text: the workflow takes a datetime.
                        args = [datetime.fromisoformat(args[0])]
                    result = wf.fn(*args, **inputs["kwargs"])
                    output = encoding.encode(result, f"The result of workflow {claim.name!r}")
                except LeaseLost:
                    raise
                except Exception as exc:
                    status, error = Status.ERROR, encoding.dumps(runtime.error_record(exc))
                # What the body wrote is stored before its end is recorded.
                execution.flush()
            except Interrupted as stop:
                # A shutdown hands the run back uncounted; a failed write or statement
                # counts, so that a database that keeps failing ends the run at
                # max_attempts instead of looping.
                if execution.write_error is not None or execution.fault is not None:
                    log.warning("Stopped (%s); replaying from its checkpoints.", stop.reason)
                    # Values still queued are stored (or fail) before the run is handed
                    # back: none may land after a replay has read the history.
                    with contextlib.suppress(Interrupted, LeaseLost):
                        execution.flush()
                    self._hand_back(workflow_id, log)
                else:
                    released, changes = runs.release(self.worker_id, [workflow_id])
                    publish_changes(changes, self.using)
                    if released:
                        log.info("Stopped at a step boundary (%s); back in the queue.", stop.reason)
                    else:
                        log.info("Stopped: %s.", stop.reason)
                return
            except LeaseLost:
                log.info("Stopped: %s.", execution.stop_reason)
                return
            except Suspended as wait:
                self._suspend(execution, wait, log)
                return
        if execution.fatal is not None:
            status, output = Status.ERROR, None
            error = encoding.dumps(runtime.error_record(execution.fatal))
        try:
            finished, changes = runs.finish_held(
                self.worker_id, workflow_id, status, output=output, error=error
            )
            publish_changes(changes, self.using)
        except Error as exc:
            # Not recorded: a replay from the checkpoints ends it again.
            log.warning("Could not record the end (%s); replaying from its checkpoints.", exc)
            self._hand_back(workflow_id, log)
            return
        if finished:
            telemetry.workflow_ended(status, error)
            self.completed += 1
            took = time.monotonic() - started
            if status == Status.ERROR:
                record = encoding.loads(error) if error else {}
                log.error(
                    "ERROR in %.3fs: %s: %s",
                    took,
                    record.get("type", "Exception"),
                    record.get("message", ""),
                )
            else:
                log.info("%s in %.3fs.", status, took)
        else:
            log.info(
                "Ended with %s, but it was cancelled or reclaimed meanwhile; nothing recorded.",
                status,
            )

    def _suspend(self, execution: runtime.Execution, wait: Suspended, log: WorkflowAdapter) -> None:
        """Leave the run WAITING: its slot and lease are free until its timer or message."""
        wake_at = None if wait.wake_at is None else datetime.fromtimestamp(wait.wake_at, tz=UTC)
        try:
            suspended, changes = Workflow.objects.using(self.using).suspend(
                self.worker_id, execution.workflow_id, wait.operation, wait.topic, wake_at
            )
            publish_changes(changes, self.using)
        except Error as exc:
            log.warning("Could not suspend the run (%s); replaying from its checkpoints.", exc)
            self._hand_back(execution.workflow_id, log)
            return
        if not suspended:
            log.info("Stopped: it was cancelled or reclaimed meanwhile.")
        elif wait.topic is None:
            log.info("Sleeping until %s; its worker slot is free.", wake_at)
        else:
            log.info(
                "Waiting for a message on topic %r%s; its worker slot is free.",
                wait.topic or None,
                "" if wake_at is None else f" until {wake_at}",
            )

    def _hand_back(self, workflow_id: str, log: WorkflowAdapter) -> None:
        """Send a run that a database fault stopped back to the queue, counting the attempt.

        The fault may have broken this thread's connection, and the database may still
        be failing: a few tries, then the lease expires and a claim resumes the run.
        """
        keeper = ConnectionKeeper(self.using)
        failure: Error | None = None
        for delay in (0.0, 0.5, 1.0, 2.0):
            if delay:
                time.sleep(delay)
            try:
                keeper.ready()
                released, changes = Workflow.objects.using(self.using).release(
                    self.worker_id, [workflow_id], count_attempt=True
                )
                publish_changes(changes, self.using)
                if released:
                    log.info("Back in the queue.")
                return
            except Error as exc:
                keeper.broken()
                failure = exc
        log.warning("Could not hand the run back (%s); it resumes once its lease expires.", failure)
