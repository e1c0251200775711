
from durable_streams import read_stream
from tests import workflows


def test_runs_and_streams(run_burst):
    handle = workflows.write_values.start("out", [1, "two", None, {"x": [3]}])
    run_burst()
    assert handle.result(timeout=5) == 4
    assert list(read_stream(handle.workflow_id, "out", timeout=5)) == [1, "two", None, {"x": [3]}]


def test_live(live_worker):
    handle = workflows.steady.start(5, 0.01)
    assert list(read_stream(handle.workflow_id, "out", timeout=10)) == [0, 1, 2, 3, 4]
    assert handle.result(timeout=10) == 5
