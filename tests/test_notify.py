"""publish_changes(): what a queryset changed reaches the waiters after commit, not before."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import DEFAULT_DB_ALIAS, transaction

from durable_streams import bus
from durable_streams.bus import layer as ds_layer
from durable_streams.models import NO_CHANGES, Changes

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """The channel-layer messages that publish_changes() would send, in order."""
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(
        ds_layer, "workflow_ended", lambda wid, status: calls.append(("ended", (wid, status)))
    )
    monkeypatch.setattr(ds_layer, "workflows_resumed", lambda ids: calls.append(("resumed", ids)))
    return calls


def test_changes_are_published_once_the_transaction_commits(sent: list[tuple[str, Any]]) -> None:
    changes = Changes(queues=("q1",), ended=(("wf-1", "SUCCESS"),), resumed=("wf-2", "wf-3"))
    topics = [bus.queue_topic("q1"), bus.workflow_topic("wf-1")]
    with bus.subscribe(topics[:1]) as queue_waiter, bus.subscribe(topics[1:]) as ended:
        with transaction.atomic():
            bus.publish_changes(changes, DEFAULT_DB_ALIAS)
            # Nothing is told before the commit: a waiter would read the old rows.
            assert not queue_waiter.wait(0) and not ended.wait(0)
            assert sent == []
        assert queue_waiter.wait(0) and ended.wait(0)
    assert sent == [("ended", ("wf-1", "SUCCESS")), ("resumed", ["wf-2", "wf-3"])]


def test_nothing_is_published_for_a_rolled_back_change(sent: list[tuple[str, Any]]) -> None:
    with bus.subscribe([bus.queue_topic("q2")]) as waiter:
        with pytest.raises(RuntimeError), transaction.atomic():
            bus.publish_changes(Changes(queues=("q2",)), DEFAULT_DB_ALIAS)
            raise RuntimeError("rolled back")
        assert not waiter.wait(0)
    assert sent == []


def test_outside_a_transaction_changes_are_published_at_once(sent: list[tuple[str, Any]]) -> None:
    with bus.subscribe([bus.workflow_topic("wf-4")]) as waiter:
        bus.publish_changes(Changes(ended=(("wf-4", "CANCELLED"),)), DEFAULT_DB_ALIAS)
        assert waiter.wait(0)
    assert sent == [("ended", ("wf-4", "CANCELLED"))]
    bus.publish_changes(NO_CHANGES, DEFAULT_DB_ALIAS)
    assert sent == [("ended", ("wf-4", "CANCELLED"))]
