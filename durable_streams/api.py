"""The public API: decorators, starting and inspecting workflows, and reading streams."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime
import functools
import inspect
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Generic, ParamSpec, TypeVar, cast, overload

from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import DatabaseError, InterfaceError, OperationalError, connections
from django.db.models import Model

from . import cron, encoding, schema, telemetry
from .bus import (
    event_topic,
    poll_interval,
    publish_changes,
    stream_topic,
    subscribe,
    workflow_topic,
)
from .conf import MAXIMA, get_config
from .db import alias
from .exceptions import (
    DatabaseUnavailable,
    EventTimeout,
    StreamTimeout,
    WorkflowCancelled,
    WorkflowConflict,
    WorkflowFailed,
    WorkflowNotFound,
    WorkflowTimeout,
)
from .models import Status, Stream, StreamEntry, Workflow
from .retry import ReadRetry
from .runtime import execution as runtime
from .runtime import registry, waiting

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger("durable_streams.api")

__all__ = [
    "WorkflowFunction",
    "WorkflowHandle",
    "aget_event",
    "aread_stream",
    "asend",
    "cancel_workflow",
    "close_stream",
    "current_workflow_id",
    "get_event",
    "get_workflow",
    "read_stream",
    "recv",
    "run_step",
    "send",
    "set_event",
    "sleep",
    "start_workflow",
    "step",
    "workflow",
    "write_stream",
]

write_stream = runtime.write_stream
close_stream = runtime.close_stream
sleep = waiting.sleep
recv = waiting.recv
set_event = waiting.set_event


def _qualified_name(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


# The options of a start, by name: ``using()`` takes them, and so does ``start_workflow()``
# before the function's own keyword arguments.
OPTION_NAMES = frozenset({"workflow_id", "queue", "owner", "public"})


@dataclasses.dataclass(frozen=True)
class _StartOptions:
    """What ``using()`` bound: None (or False) is the default of each."""

    queue: str | None = None
    workflow_id: str | None = None
    owner: Any = None
    public: bool = False


class WorkflowFunction(Generic[P, R]):
    """A registered workflow. Call ``start()`` to run it durably on a worker.

    ``using()`` returns a copy bound to start options; the workflow itself never changes.
    """

    _options = _StartOptions()

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        name: str | None,
        queue: str,
        max_attempts: int | None,
        schedule: str | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"@workflow decorates a function, not {type(fn).__name__}.")
        if inspect.iscoroutinefunction(fn):
            raise TypeError(
                f"@workflow cannot decorate the coroutine function {_qualified_name(fn)}: "
                "workflows run in worker threads; write a plain def."
            )
        if max_attempts is not None and (
            isinstance(max_attempts, bool)
            or not isinstance(max_attempts, int)
            or not 1 <= max_attempts <= MAXIMA["MAX_ATTEMPTS"]
        ):
            # Beyond the bound of the setting it would overflow its column on the first start.
            raise ValueError(
                "max_attempts must be a whole number from 1 to "
                f"{MAXIMA['MAX_ATTEMPTS']}, not {max_attempts!r}."
            )
        _check_name("queue", queue)
        self.fn = fn
        self.name = _check_name("name", name) if name is not None else _qualified_name(fn)
        self.queue = queue
        self._max_attempts = max_attempts
        try:
            self._signature: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):
            # Some callables implemented in C have none: then only the run's call checks.
            self._signature = None
        self.schedule = None if schedule is None else self._check_schedule(schedule)
        functools.update_wrapper(self, fn)
        registry.register(self)

    def _check_schedule(self, schedule: str) -> cron.Schedule:
        """Parse ``schedule`` and check that this workflow can be started by its ticks."""
        parsed = cron.Schedule(schedule, what=f"The schedule of workflow {self.name!r}")
        if len(self.name) > cron.MAX_NAME_LENGTH:
            raise ValueError(
                f"The scheduled workflow {self.name!r} has a name of {len(self.name)} characters; "
                f"a scheduled workflow's name may have at most {cron.MAX_NAME_LENGTH}, so that "
                "the ids of its runs (the name and the tick) fit. Pass @workflow(name=...)."
            )
        if self._signature is not None:
            try:
                self._signature.bind(None)
            except TypeError as exc:
                raise TypeError(
                    f"The scheduled workflow {self.name!r} must take exactly one argument, the "
                    f"time of the tick that starts it, but it cannot be called with one: {exc}."
                ) from None
        return parsed

    @property
    def max_attempts(self) -> int:
        return self._max_attempts if self._max_attempts is not None else get_config().MAX_ATTEMPTS

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the body directly, in this thread, without durability (handy in tests)."""
        return self.fn(*args, **kwargs)

    def using(
        self,
        *,
        queue: str | None = None,
        workflow_id: str | None = None,
        owner: Any = None,
        public: bool | None = None,
    ) -> WorkflowFunction[P, R]:
        """A copy of this workflow whose ``start()`` takes these options.

        Each option is checked now. One left out (None) keeps what this workflow
        has bound, so ``using()`` calls chain; this workflow is left unchanged.
        """
        changes: dict[str, Any] = {}
        if queue is not None:
            changes["queue"] = _check_name("queue", queue)
        if workflow_id is not None:
            changes["workflow_id"] = check_workflow_id(workflow_id)
        if owner is not None:
            # The type now; whether the user exists is asked at start, when it counts.
            _owner_id(owner, look_up=False)
            changes["owner"] = owner
        if public is not None:
            changes["public"] = _check_public(public)
        bound = copy.copy(self)  # not registered: the registry keeps the decorated workflow
        bound._options = dataclasses.replace(self._options, **changes)
        return bound

    def start(self, *args: P.args, **kwargs: P.kwargs) -> WorkflowHandle:
        """Enqueue a run of ``fn(*args, **kwargs)``; a worker picks it up.

        Every keyword argument goes to the function: options are bound with ``using()``.
        """
        return _start(self, args, kwargs)

    def __repr__(self) -> str:
        options = self._options
        bound = [
            f"{field.name}={getattr(options, field.name)!r}"
            for field in dataclasses.fields(options)
            if getattr(options, field.name) != field.default
        ]
        return f"<Workflow {self.name}{' using ' + ', '.join(bound) if bound else ''}>"


# The lengths of the columns that store them.
_MAX_LENGTHS = {"queue": 100}


def _check_name(what: str, value: object) -> str:
    limit = _MAX_LENGTHS.get(what, 255)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise ValueError(
            f"A workflow {what} must be a non-empty string of at most {limit} characters, "
            f"not {value!r}."
        )
    return encoding.check_text(f"A workflow {what}", value)


@overload
def workflow(fn: Callable[P, R], /) -> WorkflowFunction[P, R]: ...
@overload
def workflow(
    *,
    name: str | None = None,
    queue: str = "default",
    max_attempts: int | None = None,
    schedule: str | None = None,
) -> Callable[[Callable[P, R]], WorkflowFunction[P, R]]: ...
def workflow(
    fn: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    queue: str = "default",
    max_attempts: int | None = None,
    schedule: str | None = None,
) -> WorkflowFunction[P, R] | Callable[[Callable[P, R]], WorkflowFunction[P, R]]:
    """Register a function as a durable workflow, under ``name`` (default: module.qualname).

    With ``schedule`` (a cron expression), the workers start it once per tick, with
    the tick's time (an aware datetime in UTC) as its one argument.
    """
    if fn is not None:
        return WorkflowFunction(fn, name=name, queue=queue, max_attempts=max_attempts)

    def decorate(fn: Callable[P, R]) -> WorkflowFunction[P, R]:
        return WorkflowFunction(
            fn, name=name, queue=queue, max_attempts=max_attempts, schedule=schedule
        )

    return decorate


@overload
def step(fn: Callable[P, R], /) -> Callable[P, R]: ...
@overload
def step(
    *,
    name: str | None = None,
    retries: int = 0,
    backoff: float = 1.0,
    atomic: bool = False,
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...
def step(
    fn: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    retries: int = 0,
    backoff: float = 1.0,
    atomic: bool = False,
) -> Callable[P, R] | Callable[[Callable[P, R]], Callable[P, R]]:
    """Checkpoint a function's result when a workflow calls it.

    A failing step is retried up to ``retries`` times, waiting ``backoff`` seconds,
    then twice that, and so on. Its result must be JSON; the workflow receives the
    decoded JSON (what a replay would return). Outside a workflow it is a plain call.

    A step runs at least once: a worker that dies after the step's effect but before
    its checkpoint commits runs it again. With ``atomic=True`` the step runs inside a
    transaction that also records its checkpoint, so its writes to the database
    happen exactly once.
    """
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be a whole number of at least 0, not {retries!r}.")
    if isinstance(backoff, bool) or not isinstance(backoff, (int, float)) or backoff < 0:
        raise ValueError(f"backoff must be a number of seconds of at least 0, not {backoff!r}.")

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        if inspect.iscoroutinefunction(fn):
            raise TypeError(
                f"@step cannot decorate the coroutine function {_qualified_name(fn)}: "
                "steps run in the workflow's thread; write a plain def."
            )
        step_name = name if name is not None else _qualified_name(fn)
        _check_name("step name", step_name)

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            # A replayed step returns its checkpoint: the decoded JSON of what it returned.
            return cast(
                R,
                runtime.run_step(
                    fn, step_name, retries, float(backoff), args, kwargs, atomic=atomic
                ),
            )

        wrapper.step_name = step_name  # type: ignore[attr-defined]  # read by run_step()
        return wrapper

    if fn is not None:
        return decorate(fn)
    return decorate


def current_workflow_id() -> str | None:
    """The id of the workflow running in this thread (in its body or its steps), else None."""
    execution = runtime.current_execution()
    return None if execution is None else execution.workflow_id


def run_step(fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
    """Run an undecorated callable as a step (no retries), named module.qualname."""
    name = getattr(fn, "step_name", None) or _qualified_name(fn)
    return cast(R, runtime.run_step(fn, name, 0, 0.0, args, kwargs))


# Starting and inspecting workflows


def start_workflow(
    wf: WorkflowFunction[..., Any] | str,
    /,
    *args: Any,
    workflow_id: str | None = None,
    queue: str | None = None,
    owner: Any = None,
    public: bool | None = None,
    **kwargs: Any,
) -> WorkflowHandle:
    """Enqueue a run of ``wf`` and return its handle: ``wf.using(options).start(...)``.

    The options are taken out of the keyword arguments, so a workflow with a
    parameter named like one is refused (start it with ``using().start()``).
    With a ``workflow_id`` that already exists, return that run's handle if this
    start repeats it (same workflow, owner, public and inputs), else raise
    ``WorkflowConflict``: a run is never started twice, nor handed to another
    caller. ``owner`` (a user) and ``public`` decide who may read its streams.
    Called from a workflow body, the child's id defaults to one derived from the
    parent, so a replay finds the same child.
    """
    if isinstance(wf, str):
        # Only a WorkflowFunction registers itself (in its __init__).
        wf = cast("WorkflowFunction[..., Any]", registry.get(wf))
    elif not isinstance(wf, WorkflowFunction):
        raise TypeError(
            f"start_workflow() takes a @workflow function or its name, not {type(wf).__name__}."
        )
    _refuse_option_parameters(wf)
    bound = wf.using(workflow_id=workflow_id, queue=queue, owner=owner, public=public)
    return _start(bound, args, kwargs)


def _refuse_option_parameters(wf: WorkflowFunction[..., Any]) -> None:
    """Refuse a workflow that has a parameter start_workflow() would take as an option."""
    if wf._signature is None:
        return
    for parameter in wf._signature.parameters.values():
        if parameter.name in OPTION_NAMES and parameter.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        ):
            raise TypeError(
                f"start_workflow() cannot start workflow {wf.name!r}: its parameter "
                f"{parameter.name!r} has the name of a start_workflow() option "
                f"({', '.join(sorted(OPTION_NAMES))}). Start it with "
                f"{wf.fn.__name__}.using(...).start(...), which passes every keyword argument "
                "to the function."
            )


def _check_arguments(
    wf: WorkflowFunction[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Refuse arguments the function cannot take, before anything is stored.

    Found by the worker instead, they would fail every attempt of a run already stored.
    """
    if wf.schedule is not None:
        tick = args[0] if len(args) == 1 else None
        if kwargs or not isinstance(tick, datetime.datetime) or tick.utcoffset() is None:
            raise TypeError(
                f"The scheduled workflow {wf.name!r} starts with one argument, the time of a "
                "tick: an aware datetime (e.g. datetime.now(UTC)), and nothing else."
            )
    if wf._signature is None:
        return
    try:
        wf._signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"Workflow {wf.name!r} cannot start with these arguments: {exc}.") from None


def _check_public(public: object) -> bool:
    if not isinstance(public, bool):
        # bool("no") is True: anything but a bool would guess at who may read.
        raise TypeError(f"public must be True or False, not {public!r}.")
    return public


def _start(
    wf: WorkflowFunction[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> WorkflowHandle:
    """Store a run of ``wf`` with these arguments and the options ``wf`` is bound to."""
    return store_run(wf, args, kwargs)[0]


def store_run(
    wf: WorkflowFunction[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[WorkflowHandle, bool]:
    """``_start``, and whether this call stored the run (False: the same start was stored)."""
    # Checked before the child id below takes an operation number.
    _check_arguments(wf, args, kwargs)
    options = wf._options
    owner_id = _owner_id(options.owner)
    inputs = encoding.encode_inputs(args, kwargs, wf.name)
    size = len(inputs.encode("utf-8"))
    limit = get_config().MAX_INPUT_BYTES
    if size > limit:
        raise ValueError(
            f"The inputs of workflow {wf.name!r} are {size} bytes once encoded; the limit is "
            f"{limit} (settings.DURABLE_STREAMS['MAX_INPUT_BYTES'])."
        )
    workflow_id = options.workflow_id
    if workflow_id is None:
        workflow_id = runtime.child_workflow_id() or None
    queue = options.queue if options.queue is not None else wf.queue
    using = alias()
    run = Workflow(
        name=wf.name,
        queue=queue,
        inputs=inputs,
        max_attempts=wf.max_attempts,
        owner_id=owner_id,
        is_public=options.public,
    )
    if workflow_id is not None:
        run.id = workflow_id
    runs = Workflow.objects.using(using)
    # A taken id is kept; the second try is for a run deleted between the two queries.
    for _ in range(2):
        with runtime.on_behalf_of_body(f"starting workflow {wf.name!r}"):
            try:
                inserted, changes = runs.enqueue(run)
                publish_changes(changes, using)
                if inserted:
                    telemetry.workflow_started(wf.name, queue)
                    return WorkflowHandle(run.id), True
                existing = (
                    runs.filter(pk=run.id)
                    .values_list("name", "owner_id", "is_public", "inputs")
                    .first()
                )
            except DatabaseError as exc:
                _raise_if_unmigrated(exc, using)
                raise
        if existing is None:
            continue
        _check_same_run(run, *existing)
        break
    return WorkflowHandle(run.id), False


def _raise_if_unmigrated(exc: DatabaseError, using: str) -> None:
    """Turn "no such table" into the error that says to run ``migrate``."""
    connection = connections[using]
    if connection.in_atomic_block:
        # The failed statement may have broken the caller's transaction: asking the
        # migration recorder now would fail too, and hide the original error.
        return
    missing = schema.explain(exc, using)
    if missing is not None:
        raise missing from exc


def _owner_id(owner: Any, *, look_up: bool = True) -> Any:
    """The primary key of the user ``owner``, checked here rather than by the database.

    The foreign key is checked at commit, so a bad owner would fail the caller's
    transaction far from this call, with a raw IntegrityError. Without ``look_up``,
    a primary key is checked for its type only, not looked up.
    """
    if owner is None:
        return None
    user_model = get_user_model()
    label = f"{user_model._meta.label} (settings.AUTH_USER_MODEL)"
    if isinstance(owner, Model):
        if not isinstance(owner, user_model):
            raise TypeError(
                f"owner must be a {label} or its primary key, not a {owner._meta.label}."
            )
        if owner.pk is None or owner._state.adding:
            raise ValueError(f"owner must be a saved user; this {label} was never saved.")
        return owner.pk
    if getattr(owner, "is_authenticated", True) is False:
        return None  # AnonymousUser, say request.user of a visitor: no owner
    if isinstance(owner, (bool, float)) or not isinstance(owner, (int, str, uuid.UUID)):
        raise TypeError(f"owner must be a {label} or its primary key, not {type(owner).__name__}.")
    try:
        pk = user_model._meta.pk.to_python(owner)
    except ValidationError:
        raise TypeError(
            f"owner must be a {label} or its primary key; {owner!r} cannot be one."
        ) from None
    if look_up and not user_model._default_manager.filter(pk=pk).exists():
        raise ValueError(f"owner is {owner!r}, but no {label} has that primary key.")
    return pk


def _check_same_run(run: Workflow, name: str, owner_id: Any, is_public: bool, inputs: str) -> None:
    """Refuse a start whose id is taken by a run it does not repeat.

    Ids may be built from user input: returning whatever run has the id would hand
    one user's run to another. Only an identical start is idempotent.
    """
    if name != run.name:
        raise WorkflowConflict(
            f"Workflow id {run.id!r} is already used by a run of {name!r}, not {run.name!r}."
        )
    differs = []
    if owner_id != run.owner_id:
        differs.append("owner")
    if is_public != run.is_public:
        differs.append("public")
    if inputs != run.inputs and _canonical(inputs) != _canonical(run.inputs):
        differs.append("inputs")
    if differs:
        raise WorkflowConflict(
            f"Workflow id {run.id!r} is already used by a run of {name!r} with a different "
            f"{', '.join(differs)}; a start with an existing id must repeat it exactly."
        )


def _canonical(text: str) -> str:
    # Keyword arguments in another order are the same inputs; 1 and 1.0 and true are not.
    return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))


def check_workflow_id(workflow_id: object) -> str:
    """Refuse an id no workflow can have: PostgreSQL fails a query that holds a NUL."""
    if not isinstance(workflow_id, str) or not workflow_id or len(workflow_id) > 255:
        raise ValueError(
            "workflow_id must be a non-empty string of at most 255 characters, "
            f"not {workflow_id!r}."
        )
    return encoding.check_text("workflow_id", workflow_id)


def get_workflow(workflow_id: str) -> WorkflowHandle:
    """Return the handle of an existing run; ``WorkflowNotFound`` if there is none."""
    check_workflow_id(workflow_id)
    handle = WorkflowHandle(workflow_id)
    handle.status  # noqa: B018 - raises WorkflowNotFound
    return handle


def cancel_workflow(workflow_id: str) -> bool:
    """Cancel an enqueued, running or waiting workflow; False if it had already ended.

    A running workflow stops at its next step boundary, a waiting (suspended) one at
    once. Its open streams end now as interrupted, not closed: resuming the workflow
    reopens them.
    """
    check_workflow_id(workflow_id)
    using = alias()
    with runtime.on_behalf_of_body(f"cancelling workflow {workflow_id!r}"):
        changed, changes = (
            Workflow.objects.using(using).active().finish(workflow_id, Status.CANCELLED)
        )
        publish_changes(changes, using)
        if not changed and not Workflow.objects.using(using).filter(pk=workflow_id).exists():
            raise WorkflowNotFound(workflow_id)
    return changed


def _check_timeout(timeout: object) -> None:
    # NaN would never run out, and a string would fail deep in the arithmetic.
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not math.isfinite(timeout)
        or timeout < 0
    ):
        raise ValueError(
            f"timeout must be None or a number of seconds of at least 0, not {timeout!r}."
        )


# What a database that restarts, or a network that blips, raises.
_TRANSIENT = (OperationalError, InterfaceError)


class _Reconnecting:
    """How a reader or result waiter rides out a failing database (``retry.ReadRetry``).

    After a failed read it drops its connection (the next read opens a new one) and
    waits a little longer each time, for up to ``READER_RETRY_SECONDS`` from the
    first failure; then it raises ``DatabaseUnavailable``. A successful read starts
    the count again. In a workflow body the run stops and replays instead.
    """

    def __init__(self, using: str, what: str) -> None:
        self.using = using
        self.what = what
        self._retry = ReadRetry(warn=self._warn, recovered=self._recovered, give_up=self._give_up)

    def _warn(self, exc: Exception, limit: float) -> None:
        logger.warning(
            "Database %r failed while %s (%s); reconnecting for up to %ss.",
            self.using,
            self.what,
            exc,
            limit,
        )

    def _recovered(self) -> None:
        logger.info("Database %r is back: %s goes on.", self.using, self.what)

    def _give_up(self, exc: Exception, limit: float) -> BaseException:
        return DatabaseUnavailable(
            f"Database {self.using!r} could not be reached for {limit} seconds "
            f"(READER_RETRY_SECONDS) while {self.what}: {exc}"
        )

    def succeeded(self) -> None:
        self._retry.succeeded()

    def failed(self, exc: Exception) -> float:
        """Call in the thread whose read failed; return the seconds to wait before the next."""
        execution = runtime.current_execution()
        if execution is not None and execution.step_name is None:
            raise runtime.database_failed(execution, self.what, exc) from exc
        connection = connections[self.using]
        if connection.in_atomic_block:
            # The caller's transaction is lost with its connection: nothing to resume.
            raise DatabaseUnavailable(
                f"Database {self.using!r} failed inside a transaction while {self.what}: {exc}"
            ) from exc
        connection.close()
        return self._retry.failed(exc)


class WorkflowHandle:
    """A reference to one workflow run. Every attribute is read fresh from the database."""

    def __init__(self, workflow_id: str) -> None:
        self.workflow_id = workflow_id

    def __repr__(self) -> str:
        return f"<WorkflowHandle {self.workflow_id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WorkflowHandle) and other.workflow_id == self.workflow_id

    def __hash__(self) -> int:
        return hash(self.workflow_id)

    def get(self) -> Workflow:
        """The workflow's row, as stored now."""
        try:
            with runtime.on_behalf_of_body(f"reading workflow {self.workflow_id!r}"):
                return Workflow.objects.using(alias()).get(pk=self.workflow_id)
        except Workflow.DoesNotExist:
            raise WorkflowNotFound(self.workflow_id) from None

    @property
    def status(self) -> str:
        """ENQUEUED, RUNNING, WAITING (suspended in a long sleep or recv), SUCCESS, ERROR or
        CANCELLED, read fresh from the database."""
        with runtime.on_behalf_of_body(f"reading workflow {self.workflow_id!r}"):
            status = (
                Workflow.objects.using(alias())
                .filter(pk=self.workflow_id)
                .values_list("status", flat=True)
                .first()
            )
        if status is None:
            raise WorkflowNotFound(self.workflow_id)
        return status

    def cancel(self) -> bool:
        return cancel_workflow(self.workflow_id)

    def _outcome(self) -> tuple[bool, Any]:
        row = (
            Workflow.objects.using(alias())
            .filter(pk=self.workflow_id)
            .values_list("status", "output", "error")
            .first()
        )
        if row is None:
            raise WorkflowNotFound(self.workflow_id)
        status, output, error = row
        if status == Status.SUCCESS:
            return True, None if output is None else encoding.loads(output)
        if status == Status.ERROR:
            record = encoding.loads(error or "{}")
            raise WorkflowFailed(
                self.workflow_id, record.get("type", "Error"), record.get("message", "")
            )
        if status == Status.CANCELLED:
            raise WorkflowCancelled(self.workflow_id)
        return False, None

    def _try_outcome(self, reconnecting: _Reconnecting) -> tuple[bool, Any, float | None]:
        """``_outcome()``, or the seconds to wait before trying again after a database fault."""
        try:
            done, value = self._outcome()
        except _TRANSIENT as exc:
            return False, None, reconnecting.failed(exc)
        reconnecting.succeeded()
        return done, value, None

    def _wait(self, wait: float, deadline: float | None, timeout: float | None) -> float:
        """``wait``, cut to what is left before ``deadline``; ``WorkflowTimeout`` once it passed."""
        if deadline is None:
            return wait
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WorkflowTimeout(
                f"Workflow {self.workflow_id!r} did not end within {timeout} seconds."
            )
        return min(wait, remaining)

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the end and return the output, or raise what ended the workflow.

        While the database fails, it reconnects for ``READER_RETRY_SECONDS``, then
        raises ``DatabaseUnavailable``.
        """
        using = alias()
        _check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        reconnecting = _Reconnecting(using, f"waiting for workflow {self.workflow_id!r}")
        with subscribe([workflow_topic(self.workflow_id)]) as waiter:
            interval = poll_interval(using)
            while True:
                waiter.clear()
                done, value, retry = self._try_outcome(reconnecting)
                if done:
                    return value
                wait = self._wait(interval if retry is None else retry, deadline, timeout)
                waiter.wait(wait)

    async def aresult(self, timeout: float | None = None) -> Any:
        """``result()`` for async code."""
        using = alias()
        _check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        reconnecting = _Reconnecting(using, f"waiting for workflow {self.workflow_id!r}")
        outcome = sync_to_async(self._try_outcome)
        with subscribe(
            [workflow_topic(self.workflow_id)], loop=asyncio.get_running_loop()
        ) as waiter:
            interval = await sync_to_async(poll_interval)(using)
            while True:
                waiter.clear()
                done, value, retry = await outcome(reconnecting)
                if done:
                    return value
                wait = self._wait(interval if retry is None else retry, deadline, timeout)
                await waiter.async_wait(wait)


# Reading streams


class _StreamCursor:
    """The reader's position in one stream and the queries that move it forward."""

    def __init__(self, workflow_id: str, key: str, offset: int, timeout: float | None) -> None:
        check_workflow_id(workflow_id)
        encoding.check_key(key)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a whole number of at least 0, not {offset!r}.")
        _check_timeout(timeout)
        self.workflow_id = workflow_id
        self.key = key
        self.offset = offset
        self.timeout = timeout
        self.using = alias()
        self.batch_size = get_config().READ_BATCH_SIZE
        self.topics = [stream_topic(workflow_id, key), workflow_topic(workflow_id)]
        self._deadline: float | None = None
        # What the last read of the stream's row said; values below ``_length``
        # exist, so reading them needs no new look at the row.
        self._stream_id: int | None = None
        self._length = 0
        self._closed = False  # ended: closed for good, or interrupted
        # The workflow's status (ERROR or CANCELLED) if its end interrupted the stream,
        # and after a failure its error record (type and message).
        self.interrupted: str | None = None
        self._error: dict[str, Any] | None = None
        self._check_row = False
        self.reconnecting = _Reconnecting(
            self.using, f"reading stream {key!r} of workflow {workflow_id!r}"
        )
        self.restart_clock()

    def try_fetch(self) -> tuple[list[Any], bool, float | None]:
        """``fetch()``, or the seconds to wait before trying again after a database fault.

        A failed read moves nothing: the next one starts from the same offset.
        """
        try:
            values, ended = self.fetch()
        except _TRANSIENT as exc:
            return [], False, self.reconnecting.failed(exc)
        self.reconnecting.succeeded()
        return values, ended, None

    def restart_clock(self) -> None:
        if self.timeout is not None:
            self._deadline = time.monotonic() + self.timeout

    def fetch(self) -> tuple[list[Any], bool]:
        """Return the next batch of values, and whether the stream has ended after them.

        Once the stream's row was read, values are read directly (one query per
        batch); the row is read again after a short batch or when nothing new is found.
        """
        if self._stream_id is not None:
            if self._closed and self.offset >= self._length:
                return [], True
            if not self._check_row:
                values = self._read_values(self.batch_size)
                if values:
                    # A short batch was all there was: whether the stream closed
                    # meanwhile, only its row says, so the next fetch reads it.
                    self._check_row = len(values) < self.batch_size
                    self._length = max(self._length, self.offset)
                    return values, self._closed and self.offset >= self._length
        self._check_row = False
        position = Stream.objects.using(self.using).position(self.workflow_id, self.key)
        if position is None:
            raise WorkflowNotFound(self.workflow_id)
        stream_id, length, closed, self.interrupted = position
        if self.interrupted == Status.ERROR and self._error is None:
            # Read here, where a database fault is retried like any read.
            error = (
                Workflow.objects.using(self.using)
                .filter(pk=self.workflow_id)
                .values_list("error", flat=True)
                .first()
            )
            self._error = encoding.loads(error or "{}")
        if stream_id is None:
            # A workflow that ended without writing to this stream has nothing to give.
            return [], closed
        self._stream_id, self._length, self._closed = stream_id, length, closed
        if length <= self.offset:
            return [], closed
        values = self._read_values(min(self.batch_size, length - self.offset))
        return values, closed and self.offset >= length

    def _read_values(self, limit: int) -> list[Any]:
        """Decode up to ``limit`` stored values from ``offset`` on, and move past them."""
        assert self._stream_id is not None
        rows = StreamEntry.objects.using(self.using).texts_from(self._stream_id, self.offset, limit)
        texts: list[str] = []
        for offset, text in rows:
            if offset != self.offset + len(texts):
                break  # offsets are dense; never step over one
            texts.append(text)
        self.offset += len(texts)
        return encoding.loads_many(texts)

    def ended(self) -> None:
        """Return at the stream's close; raise if its workflow's end interrupted it instead."""
        if self.interrupted is None:
            return
        if self.interrupted == Status.CANCELLED:
            raise WorkflowCancelled(self.workflow_id, key=self.key, length=self._length)
        record = self._error or {}
        raise WorkflowFailed(
            self.workflow_id,
            record.get("type", "Error"),
            record.get("message", ""),
            key=self.key,
            length=self._length,
        )

    def wait_time(self, interval: float) -> float:
        if self._deadline is None:
            return interval
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise StreamTimeout(self.workflow_id, self.key, self.offset, self.timeout or 0.0)
        return min(interval, remaining)


def read_stream(
    workflow_id: str, key: str, *, offset: int = 0, timeout: float | None = None
) -> Iterator[Any]:
    """Yield the values of a stream from ``offset`` on, waiting while it is open.

    Ends after the last value once the stream is closed (by ``close_stream`` or by
    the workflow's successful end). A stream that was still open when its workflow
    was cancelled or failed is interrupted, not closed: after its last value this
    raises ``WorkflowCancelled`` or ``WorkflowFailed``, whose ``key`` and ``length``
    say where it stopped (read on from ``offset=length`` once the workflow is
    resumed). ``timeout`` bounds the wait for each next value.
    """
    cursor = _StreamCursor(workflow_id, key, offset, timeout)
    return _read(cursor)


def _read(cursor: _StreamCursor) -> Iterator[Any]:
    # The wait for the first value starts now, not when read_stream() was called.
    cursor.restart_clock()
    with subscribe(cursor.topics) as waiter:
        interval = poll_interval(cursor.using)
        while True:
            waiter.clear()
            values, ended, retry = cursor.try_fetch()
            if values:
                yield from values
                cursor.restart_clock()
                if ended:
                    cursor.ended()
                    return
                continue
            if ended:
                cursor.ended()
                return
            waiter.wait(cursor.wait_time(interval if retry is None else retry))


async def aread_stream(
    workflow_id: str, key: str, *, offset: int = 0, timeout: float | None = None
) -> AsyncIterator[Any]:
    """``read_stream()`` as an async iterator."""
    cursor = _StreamCursor(workflow_id, key, offset, timeout)
    # The failed read's thread drops its connection; the wait happens here, not there.
    fetch = sync_to_async(cursor.try_fetch)
    with subscribe(cursor.topics, loop=asyncio.get_running_loop()) as waiter:
        interval = await sync_to_async(poll_interval)(cursor.using)
        while True:
            waiter.clear()
            values, ended, retry = await fetch()
            if values:
                for value in values:
                    yield value
                cursor.restart_clock()
                if ended:
                    cursor.ended()
                    return
                continue
            if ended:
                cursor.ended()
                return
            await waiter.async_wait(cursor.wait_time(interval if retry is None else retry))


# Messages and events


def send(
    workflow_id: str,
    message: Any,
    topic: str | None = None,
    *,
    idempotency_key: str | None = None,
) -> None:
    """Send ``message`` (JSON) to the workflow ``workflow_id``; its ``recv(topic)`` takes it.

    From anywhere. From a workflow body the send is exactly-once: a replay does not
    send again. With ``idempotency_key``, a repeated send with the same key to the
    same workflow is stored once. ``WorkflowNotFound`` if there is no such workflow.
    """
    check_workflow_id(workflow_id)
    using = alias()
    with runtime.on_behalf_of_body(f"sending a message to workflow {workflow_id!r}"):
        waiting.send(using, workflow_id, message, topic, idempotency_key)


async def asend(
    workflow_id: str,
    message: Any,
    topic: str | None = None,
    *,
    idempotency_key: str | None = None,
) -> None:
    """``send()`` for async code."""
    await sync_to_async(send)(workflow_id, message, topic, idempotency_key=idempotency_key)


def _event_arguments(workflow_id: str, key: str, timeout: float | None) -> tuple[str, float | None]:
    check_workflow_id(workflow_id)
    key_text = waiting.check_name("key", key, optional=False)
    assert key_text is not None
    return key_text, waiting.check_timeout(timeout)


def _event_wait(
    interval: float, deadline: float | None, workflow_id: str, key: str, seconds: float | None
) -> float:
    """How long to wait for the event before reading again; ``EventTimeout`` once it is late."""
    if deadline is None:
        return interval
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise EventTimeout(workflow_id, key, seconds or 0.0)
    return min(interval, remaining)


def get_event(workflow_id: str, key: str, *, timeout: float | None = None) -> Any:
    """The latest value that workflow ``workflow_id`` set under ``key``, waiting until it is set.

    ``EventTimeout`` when it is not set within ``timeout`` seconds (None: no limit);
    ``WorkflowNotFound`` if there is no such workflow.
    """
    key, seconds = _event_arguments(workflow_id, key, timeout)
    using = alias()
    deadline = None if seconds is None else time.monotonic() + seconds
    with subscribe([event_topic(workflow_id)]) as waiter:
        interval = poll_interval(using)
        while True:
            waiter.clear()
            with runtime.on_behalf_of_body(f"reading event {key!r} of {workflow_id!r}"):
                found = waiting.read_event(using, workflow_id, key)
            if found is not None:
                return found[0]
            waiter.wait(_event_wait(interval, deadline, workflow_id, key, seconds))


async def aget_event(workflow_id: str, key: str, *, timeout: float | None = None) -> Any:
    """``get_event()`` for async code."""
    key, seconds = _event_arguments(workflow_id, key, timeout)
    using = alias()
    deadline = None if seconds is None else time.monotonic() + seconds
    read = sync_to_async(waiting.read_event)
    with subscribe([event_topic(workflow_id)], loop=asyncio.get_running_loop()) as waiter:
        interval = await sync_to_async(poll_interval)(using)
        while True:
            waiter.clear()
            found = await read(using, workflow_id, key)
            if found is not None:
                return found[0]
            await waiter.async_wait(_event_wait(interval, deadline, workflow_id, key, seconds))
