"""Stream writes from an atomic step commit, or roll back, with the step."""

from __future__ import annotations

from durable_streams import read_stream
from tests import workflows_atomic
from tests.models import Effect


def test_values_of_a_failed_attempt_roll_back_with_it(run_burst):
    handle = workflows_atomic.atomic_stream_writer.start("rolled", True)
    run_burst()
    assert handle.result(timeout=10) == 1
    assert workflows_atomic.attempts("rolled") == 2
    assert Effect.objects.filter(label="rolled").count() == 1
    values = list(read_stream(handle.workflow_id, "atomic", timeout=5))
    assert values == ["before", "rolled-a", "rolled-b", "after"]


def test_values_commit_with_the_step(run_burst):
    handle = workflows_atomic.atomic_stream_writer.start("committed", False)
    run_burst()
    assert handle.result(timeout=10) == 1
    values = list(read_stream(handle.workflow_id, "atomic", timeout=5))
    assert values == ["before", "committed-a", "committed-b", "after"]
