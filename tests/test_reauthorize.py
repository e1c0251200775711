"""A reader's access is checked again while it reads (``REAUTHORIZE_SECONDS``)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.contrib.sessions.models import Session

from durable_streams import start_workflow
from durable_streams.auth import ReaderAccess, default_authorize_reader, session_user
from durable_streams.models import Workflow
from tests import workflows
from tests.sockets import (
    READER_FIXTURES,
    grant,
    make_user,
    open_gate,
    open_socket,
    path,
    read_until_closed,
    session_cookie,
)
from tests.stored import stream_length
from tests.test_sse import get, url
from tests.waiting import wait_until_async
from tests.workflows_readers import gated

pytestmark = [pytest.mark.django_db(transaction=True), READER_FIXTURES]

REVOKED = "You may no longer read this stream."
ORIGIN_HEADER = (b"origin", b"http://testserver")


@pytest.fixture
def recheck_often(settings: Any) -> float:
    seconds = 0.05
    settings.DURABLE_STREAMS = {**settings.DURABLE_STREAMS, "REAUTHORIZE_SECONDS": seconds}
    return seconds


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The result of every check of a reader's access, as it happens."""
    results: list[bool] = []
    original = ReaderAccess.still_allowed

    def counted(self: ReaderAccess) -> bool:
        allowed = original(self)
        results.append(allowed)
        return allowed

    monkeypatch.setattr(ReaderAccess, "still_allowed", counted)
    return results


def key_of(cookie: tuple[bytes, bytes]) -> str:
    return cookie[1].decode().partition("=")[2]


async def idle_run(owner: Any = None) -> str:
    """A workflow that no worker runs: its stream stays open, and idle."""
    public = owner is None
    handle = await sync_to_async(start_workflow)(workflows.echo, owner=owner, public=public)
    return handle.workflow_id


async def no_frame_for(communicator: WebsocketCommunicator, checks: list[bool], n: int) -> None:
    """The socket stays open, silent, through ``n`` more checks that let it read on."""
    start = len(checks)
    await wait_until_async(lambda: len(checks) >= start + n)
    assert all(checks[start:])
    assert await communicator.receive_nothing(timeout=0.05)


def delete_session(key: str) -> None:
    Session.objects.filter(session_key=key).delete()


# Each way a signed-in reader's access can end while it reads.


async def session_deleted(user: Any, key: str, workflow_id: str) -> None:
    await sync_to_async(delete_session)(key)


async def password_changed(user: Any, key: str, workflow_id: str) -> None:
    def change() -> None:
        user.set_password("another password")
        user.save()

    await sync_to_async(change)()


async def user_deactivated(user: Any, key: str, workflow_id: str) -> None:
    await sync_to_async(get_user_model().objects.filter(pk=user.pk).update)(is_active=False)


async def run_given_to_another(user: Any, key: str, workflow_id: str) -> None:
    other = await make_user("another-owner")
    await sync_to_async(Workflow.objects.filter(pk=workflow_id).update)(owner=other)


async def session_of_another_user(user: Any, key: str, workflow_id: str) -> None:
    # The same session key now signs someone else in: that is not the reader.
    other = await make_user("someone-else")

    def switch() -> None:
        session = Session.objects.get(session_key=key)
        data = session.get_decoded()
        data["_auth_user_id"] = str(other.pk)
        data["_auth_user_hash"] = other.get_session_auth_hash()
        Session.objects.save(key, data, session.expire_date)

    await sync_to_async(switch)()


WITHDRAWALS = [
    session_deleted,
    password_changed,
    user_deactivated,
    run_given_to_another,
    session_of_another_user,
]


@pytest.mark.parametrize("withdraw", WITHDRAWALS, ids=lambda f: f.__name__)
async def test_a_socket_whose_access_is_withdrawn_is_closed_with_4403(
    recheck_often: float,
    checks: list[bool],
    withdraw: Callable[[Any, str, str], Awaitable[None]],
) -> None:
    owner = await make_user("owner")
    cookie = await session_cookie(owner)
    workflow_id = await idle_run(owner)
    communicator = await open_socket(path(workflow_id, "out"), headers=[ORIGIN_HEADER, cookie])
    await no_frame_for(communicator, checks, 2)
    await withdraw(owner, key_of(cookie), workflow_id)
    frames, code = await read_until_closed(communicator, timeout=10)
    assert (frames, code) == ([], 4403)
    assert checks[-1] is False
    # Connecting again gets the answer for a missing workflow.
    again = await open_socket(path(workflow_id, "out"), headers=[ORIGIN_HEADER, cookie])
    assert (await again.receive_output(timeout=10))["code"] == 4404


async def test_a_socket_still_allowed_reads_on_and_receives_its_values(
    recheck_often: float, checks: list[bool], live_worker: Any
) -> None:
    owner = await make_user("steady-owner")
    handle = await sync_to_async(gated.using(owner=owner).start)("out", ["a"], ["b"], "gate-steady")
    communicator = await open_socket(path(handle.workflow_id, "out"), user=owner)
    assert (await communicator.receive_json_from(timeout=10))["value"] == "a"
    await no_frame_for(communicator, checks, 5)
    await open_gate("gate-steady")
    frames, code = await read_until_closed(communicator)
    assert [f.get("value") for f in frames] == ["b", None] and code == 1000


async def test_values_stop_once_the_session_is_deleted_and_the_run_given_away(
    recheck_often: float, checks: list[bool], live_worker: Any
) -> None:
    # What used to happen: the old socket kept receiving every value.
    owner = await make_user("first-owner")
    cookie = await session_cookie(owner)
    handle = await sync_to_async(gated.using(owner=owner).start)("out", ["a"], ["b"], "gate-given")
    communicator = await open_socket(
        path(handle.workflow_id, "out"), headers=[ORIGIN_HEADER, cookie]
    )
    assert (await communicator.receive_json_from(timeout=10))["value"] == "a"
    await session_deleted(owner, key_of(cookie), handle.workflow_id)
    await run_given_to_another(owner, key_of(cookie), handle.workflow_id)
    frames, code = await read_until_closed(communicator)
    await open_gate("gate-given")
    assert (frames, code) == ([], 4403)
    await wait_until_async(lambda: stream_length(handle.workflow_id, "out") == 2)


async def test_an_anonymous_socket_ends_when_the_run_is_made_private(
    recheck_often: float, checks: list[bool]
) -> None:
    workflow_id = await idle_run()
    communicator = await open_socket(path(workflow_id, "out"))
    await no_frame_for(communicator, checks, 2)
    await sync_to_async(Workflow.objects.filter(pk=workflow_id).update)(is_public=False)
    assert await read_until_closed(communicator) == ([], 4403)


async def test_a_socket_ends_when_its_view_permission_is_withdrawn(
    recheck_often: float, checks: list[bool]
) -> None:
    owner = await make_user("perm-owner")
    viewer = await grant(await make_user("perm-viewer"), "view_workflow")
    workflow_id = await idle_run(owner)
    communicator = await open_socket(path(workflow_id, "out"), user=viewer)
    await no_frame_for(communicator, checks, 2)

    def withdraw() -> None:
        viewer.user_permissions.clear()

    await sync_to_async(withdraw)()
    assert await read_until_closed(communicator) == ([], 4403)


async def test_a_check_that_fails_ends_the_socket_with_a_server_error(
    recheck_often: float, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: ReaderAccess) -> bool:
        raise RuntimeError("the database is gone")

    monkeypatch.setattr(ReaderAccess, "still_allowed", broken)
    communicator = await open_socket(path(await idle_run(), "out"))
    assert await read_until_closed(communicator) == ([], 1011)
    assert "the database is gone" in caplog.text


# Server-Sent Events


@pytest.mark.parametrize(
    "withdraw", [session_deleted, run_given_to_another], ids=lambda f: f.__name__
)
async def test_an_event_stream_whose_access_is_withdrawn_ends_with_refused(
    recheck_often: float,
    checks: list[bool],
    withdraw: Callable[[Any, str, str], Awaitable[None]],
) -> None:
    owner = await make_user("sse-owner")
    cookie = await session_cookie(owner)
    workflow_id = await idle_run(owner)
    response = await get(url(workflow_id, "out"), [cookie])
    assert response.status == 200
    start = len(checks)
    await wait_until_async(lambda: len(checks) >= start + 2)
    await withdraw(owner, key_of(cookie), workflow_id)
    event = await response.event()
    assert event["event"] == "refused"
    assert json.loads(event["data"]) == {"type": "refused", "key": "out", "reason": REVOKED}
    await response.body()  # the response ends
    assert response.ended and "event: entry" not in response.text
    # EventSource reconnects: it gets the answer for a missing workflow.
    assert (await get(url(workflow_id, "out"), [cookie])).status == 404


async def test_an_event_stream_still_allowed_stays_open(
    recheck_often: float, checks: list[bool]
) -> None:
    owner = await make_user("sse-steady")
    workflow_id = await idle_run(owner)
    response = await get(url(workflow_id, "out"), [await session_cookie(owner)])
    await response._more(10)
    assert response.text == "retry: 1000\n\n"
    await wait_until_async(lambda: len(checks) >= 5)
    assert all(checks)
    assert await response.communicator.receive_nothing(timeout=0.1)
    assert not response.ended
    await response.communicator.send_input({"type": "http.disconnect"})
    await response.communicator.wait(timeout=5)


# The pieces


async def test_session_user_reads_without_changing_the_session() -> None:
    user = await make_user("session-reader")
    key = key_of(await session_cookie(user))
    assert (await sync_to_async(session_user)(key)).pk == user.pk
    assert not (await sync_to_async(session_user)("no-such-session")).is_authenticated

    def tampered() -> Any:
        session = Session.objects.get(session_key=key)
        data = {**session.get_decoded(), "_auth_user_hash": "0" * 64}
        Session.objects.save(key, data, session.expire_date)
        found = session_user(key)
        return found, Session.objects.filter(session_key=key).exists()

    found, kept = await sync_to_async(tampered)()
    # A hash that does not verify: anonymous, and the session is left for its browser.
    assert not found.is_authenticated and kept


async def test_the_default_rule_follows_the_admin_permissions() -> None:
    owner = await make_user("rule-owner")
    staff = await make_user("rule-staff", is_staff=True)
    viewer = await grant(await make_user("rule-viewer"), "view_workflow")
    changer = await grant(await make_user("rule-changer"), "change_workflow")
    other = await grant(await make_user("rule-canceller"), "cancel_workflow")
    root = await sync_to_async(get_user_model().objects.create_superuser)("rule-root", "", "pw")
    workflow = Workflow(id="w", name="n", owner_id=owner.pk, is_public=False)

    def readers() -> list[str]:
        candidates = [None, owner, staff, viewer, changer, other, root]
        return [
            getattr(user, "username", "anonymous")
            for user in candidates
            if default_authorize_reader(user, workflow, "out")
        ]

    assert await sync_to_async(readers)() == [
        "rule-owner",
        "rule-viewer",
        "rule-changer",
        "rule-root",
    ]
    assert await sync_to_async(Permission.objects.filter(codename="view_workflow").exists)()
