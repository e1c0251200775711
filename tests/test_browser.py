"""The example project in headless Chromium: ``manage.py demo`` runs its worker and its
ASGI server on 127.0.0.1, and Playwright drives the page as a visitor would.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from example_project.demo.generator import compose
from tests.chromium import CHROMIUM, launch_chromium
from tests.processes import ROOT, wait_until

ADMIN_USER, ADMIN_PASSWORD = "admin", "demo-admin-password"
SCREENSHOT = Path("/tmp/durable-streams-demo.png")
HEARTBEAT_SECONDS = 2.0

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None,
        reason="Playwright for Python is not installed (pip install 'durable-streams[browser]')",
    ),
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)"
    ),
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def children_of(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (the demo starts its own in new sessions)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Demo:
    def __init__(
        self, base: str, process: subprocess.Popen[bytes], log: Path, env: dict[str, str]
    ) -> None:
        self.base = base
        self.process = process
        self.log_path = log
        self.env = env

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """``manage.py demo`` on a free port with a fresh SQLite file; stopped with Ctrl-C."""
    workdir = tmp_path_factory.mktemp("demo")
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DJANGO_SETTINGS_MODULE", "DATABASE_URL", "DS_TEST_DB_NAME"}
    }
    env.update(
        DEMO_DATABASE=str(workdir / "demo.sqlite3"),
        DJANGO_SUPERUSER_PASSWORD=ADMIN_PASSWORD,
        # The page takes 3 silent heartbeats (6 s) for a lost connection.
        DEMO_HEARTBEAT_SECONDS=str(HEARTBEAT_SECONDS),
        PYTHONUNBUFFERED="1",
    )
    manage = [sys.executable, str(ROOT / "manage.py")]
    for command in (
        ["migrate", "--noinput"],
        ["createsuperuser", "--noinput", "--username", ADMIN_USER, "--email", "a@example.com"],
    ):
        subprocess.run(
            manage + command, cwd=ROOT, env=env, check=True, timeout=120, capture_output=True
        )
    port = free_port()
    log = workdir / "demo.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*manage, "demo", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Demo(f"http://127.0.0.1:{port}", process, log, env)
    children: list[int] = []
    try:
        wait_until(
            lambda: "The demo runs at" in server.log() or process.poll() is not None,
            timeout=90,
            interval=0.1,
            what="the demo to start",
        )
        assert process.poll() is None, server.log()
        children = children_of(process.pid)
        assert len(children) == 2, f"expected a worker and a web server: {children}"
        yield server
        # Ctrl-C stops the demo, which stops its worker and its web server.
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0, server.log()
        assert "Stopped." in server.log()
        assert not [pid for pid in children if alive(pid)], server.log()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        for pid in children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with launch_chromium() as chromium:
        yield chromium


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield page
    finally:
        context.close()
    assert errors == [], errors


def answer_text(page: Any) -> str:
    return page.eval_on_selector("#answer", "element => element.textContent")


def ask(page: Any, demo: Demo, prompt: str) -> None:
    page.goto(demo.base + "/")
    page.fill("textarea[name=prompt]", prompt)
    page.click("form.ask button[type=submit]")
    page.wait_for_url("**/runs/**")


def wait_for_complete(page: Any, timeout: float = 60.0) -> None:
    page.wait_for_selector("#connection[data-state=closed]", timeout=timeout * 1000)


def test_the_answer_grows_on_screen_while_the_workflow_runs(page: Any, demo: Demo) -> None:
    prompt = "How do I make a long job survive a server restart?"
    expected = "".join(compose(prompt))
    ask(page, demo, prompt)
    lengths = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        lengths.append(len(answer_text(page)))
        if page.get_attribute("#connection", "data-state") == "closed":
            break
        if len(lengths) == 30:
            page.screenshot(path=str(SCREENSHOT))
        time.sleep(0.1)
    wait_for_complete(page)
    assert answer_text(page) == expected
    assert lengths == sorted(lengths), "the text never shrinks"
    partial = sorted({n for n in lengths if 0 < n < len(expected)})
    assert len(partial) >= 10, f"the text should grow in many steps, saw {partial}"
    assert page.inner_text("#stage") == "Done"
    assert page.inner_text(".runs li.current .status") == "Success"


def manage_shell(demo: Demo, script: str) -> str:
    """Run ``script`` in ``manage.py shell`` on the demo's database; its last line of output."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "shell", "-c", script],
        cwd=ROOT,
        env=demo.env,
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    )
    return result.stdout.strip().splitlines()[-1]


def sidebar_status(page: Any) -> str:
    return page.inner_text(".runs li.current .status")


def test_the_labels_follow_the_run_through_writing_and_a_cancel(page: Any, demo: Demo) -> None:
    prompt = "Label each stage of this run truthfully, please."
    expected = "".join(compose(prompt))
    ask(page, demo, prompt)
    # While the answer is being written: running, live (the page may have been
    # rendered while the run was still enqueued).
    wait_until(lambda: 0 < len(answer_text(page)) < len(expected) // 2, timeout=30, what="text")
    page.wait_for_function(
        "() => document.querySelector('.runs li.current .status').textContent === 'Running'"
    )
    page.wait_for_function("() => document.querySelector('#stage').textContent === 'Writing'")
    assert page.inner_text("#connection") == "live"
    assert len(answer_text(page)) < len(expected), "still being written"
    workflow_id = page.get_attribute("[data-workflow]", "data-workflow")
    assert manage_shell(
        demo,
        f"from durable_streams import cancel_workflow; print(cancel_workflow({workflow_id!r}))",
    ).endswith("True")
    page.wait_for_selector("#connection[data-state=interrupted]")
    page.wait_for_function(
        "() => document.querySelector('#connection').textContent === 'cancelled'"
    )
    assert page.inner_text("#stage") == "Stopped before the end"
    assert sidebar_status(page) == "Cancelled"
    shown = answer_text(page)
    assert 0 < len(shown) < len(expected) and expected.startswith(shown)
    # Coming back to the cancelled run: the page shows what was written, and says so.
    response = page.reload()
    assert response is not None and response.status == 200
    assert answer_text(page) == shown
    page.wait_for_function(
        "() => document.querySelector('#connection').textContent === 'cancelled'"
    )
    assert page.inner_text("#stage") == "Stopped before the end"
    assert sidebar_status(page) == "Cancelled"


def web_server_of(demo: Demo) -> int:
    for pid in children_of(demo.process.pid):
        if b"daphne" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise AssertionError("the demo runs no daphne")


def test_a_silent_server_shows_as_lost_then_the_answer_reads_on(page: Any, demo: Demo) -> None:
    prompt = "What if the network goes quiet mid-answer?"
    expected = "".join(compose(prompt))
    sockets: list[str] = []
    page.on("websocket", lambda socket: sockets.append(socket.url))
    ask(page, demo, prompt)
    page.wait_for_selector("#connection[data-state=open]")
    page.evaluate(
        """() => {
          window.seenStates = [];
          window.lostAt = null;
          const sub = window.durableDemo.answer;
          const show = sub.options.onStatus;
          sub.options.onStatus = (state) => {
            window.seenStates.push(state);
            if (state === "lost" && window.lostAt === null) window.lostAt = sub.offset;
            show(state);
          };
        }"""
    )
    wait_until(lambda: len(answer_text(page)) > 0, timeout=30, what="the first text")
    server = web_server_of(demo)
    # The server stops answering without closing anything: a network outage, as the
    # browser sees it. Its sockets stay open, silent.
    os.kill(server, signal.SIGSTOP)
    try:
        page.wait_for_selector("#connection[data-state=lost]", timeout=HEARTBEAT_SECONDS * 10_000)
        assert page.inner_text("#connection") == "connection lost"
        lost_at = page.evaluate("window.lostAt")
        assert 0 < lost_at < len(compose(prompt))
        shown = answer_text(page)
        before = len(sockets)
    finally:
        os.kill(server, signal.SIGCONT)
    wait_for_complete(page)
    # Every token once: it read on from the offset it had, on a new socket.
    assert answer_text(page) == expected
    assert expected.startswith(shown)
    answer_sockets = [url for url in sockets[before:] if "/answer/" in url]
    assert answer_sockets and all(url.endswith(f"?offset={lost_at}") for url in answer_sockets)
    states = page.evaluate("window.seenStates")
    assert states[0] == "lost" and states[-2:] == ["open", "closed"], states
    assert page.inner_text("#connection") == "complete"


def test_a_reload_mid_answer_resumes_with_every_token_once(page: Any, demo: Demo) -> None:
    prompt = "Explain exactly-once delivery to a new teammate."
    expected = "".join(compose(prompt))
    ask(page, demo, prompt)
    wait_until(lambda: len(answer_text(page)) > len(expected) // 3, timeout=30, what="a third")
    page.reload()
    shown_after_reload = answer_text(page)
    assert 0 < len(shown_after_reload) < len(expected), "the reload happened mid-answer"
    assert expected.startswith(shown_after_reload)
    wait_for_complete(page)
    assert answer_text(page) == expected


def test_the_client_resumes_after_dropped_connections(page: Any, demo: Demo) -> None:
    prompt = "What should a progress bar really measure?"
    expected = "".join(compose(prompt))
    ask(page, demo, prompt)
    page.wait_for_selector("#connection[data-state=open]")
    page.evaluate(
        """() => {
          window.seenStates = [];
          const options = window.durableDemo.answer.options;
          const show = options.onStatus;
          options.onStatus = (state) => { window.seenStates.push(state); show(state); };
        }"""
    )
    for drop in (1, 2):
        wait_until(
            lambda d=drop: len(answer_text(page)) > len(expected) * d // 4,
            timeout=30,
            what="more text",
        )
        # Drop the live socket as a flaky network would; the client must come back.
        page.evaluate("window.durableDemo.answer._socket.close()")
        page.wait_for_function(
            "n => window.seenStates.filter(s => s === 'open').length >= n", arg=drop
        )
    wait_for_complete(page)
    assert answer_text(page) == expected
    states = page.evaluate("window.seenStates")
    assert states[:6] == ["waiting", "connecting", "open"] * 2, states


def test_the_admin_pages_render(page: Any, demo: Demo) -> None:
    page.goto(demo.base + "/admin/")
    page.fill("input[name=username]", ADMIN_USER)
    page.fill("input[name=password]", ADMIN_PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_selector("#site-name")
    assert "Site administration" in page.title()
    changelists = page.eval_on_selector_all(
        "#content-main a", "links => [...new Set(links.map(a => a.href))]"
    )
    changelists = [href for href in changelists if href.startswith(demo.base + "/admin/")]
    assert any("/admin/durable_streams/workflow/" in href for href in changelists), changelists
    for href in changelists:
        response = page.goto(href)
        assert response is not None and response.ok, (href, response and response.status)
        assert page.locator("#content").count() == 1, href
    # A run's own page.
    page.goto(demo.base + "/admin/durable_streams/workflow/")
    first = page.locator("#result_list tbody tr a").first
    first.click()
    page.wait_for_load_state()
    assert page.locator("#content").count() == 1


def test_a_signed_in_visitor_owns_a_private_answer(browser: Any, page: Any, demo: Demo) -> None:
    page.goto(demo.base + "/accounts/login/")
    page.fill("input[name=username]", ADMIN_USER)
    page.fill("input[name=password]", ADMIN_PASSWORD)
    page.click("form.login button[type=submit]")
    page.wait_for_selector(".account .who")
    prompt = "Who may read this answer?"
    ask(page, demo, prompt)  # "Only me" is ticked by default
    wait_for_complete(page)
    assert answer_text(page) == "".join(compose(prompt))
    assert page.locator(".runs li.current .private").count() == 1
    # Someone else, not signed in: the page refuses, and so does the stream's socket.
    stranger = browser.new_context()
    try:
        other = stranger.new_page()
        response = other.goto(page.url)
        assert response is not None and response.status == 404
        workflow_id = page.get_attribute("[data-workflow]", "data-workflow")
        code = other.evaluate(
            """(id) => new Promise((resolve) => {
                 const socket = new WebSocket(
                   `ws://${location.host}/ws/durable-streams/${id}/answer/`);
                 socket.onclose = (event) => resolve(event.code);
               })""",
            workflow_id,
        )
        assert code == 4404  # answered like a missing workflow
    finally:
        stranger.close()


CLIENT_SCRIPT = """
async ([moduleUrl, scenario]) => {
  const { subscribe } = await import(moduleUrl);
  const sockets = [];
  class FakeSocket {
    constructor(url) {
      this.url = url; this.sent = []; sockets.push(this); setTimeout(() => this.onopen?.(), 0);
    }
    send(text) { this.sent.push(JSON.parse(text)); }
    close(code = 1005) {
      if (this.closed) return;
      this.closed = true;
      setTimeout(() => this.onclose?.({ code, reason: "" }), 0);
    }
    frame(message) { this.onmessage?.({ data: JSON.stringify(message) }); }
  }
  const seen = [];
  const states = [];
  let closedWith = null;
  let error = null;
  const interruptions = [];
  let settled = false;
  let interruptedState = null;
  const sub = subscribe("wf/1", "answer key", {
    offset: 2, WebSocket: FakeSocket, minDelay: 5, maxDelay: 20,
    heartbeat: scenario === "silent" ? 40 : undefined,
    origin: "https://example.com/page",
    onEntry: (value, offset) => seen.push([offset, value]),
    onClose: (length) => { closedWith = length; },
    onInterrupted: (info) => interruptions.push(info),
    onError: (e) => { error = { code: e.code, name: e.name }; },
    onStatus: (state) => states.push(state),
  });
  const tick = (ms = 40) => new Promise((r) => setTimeout(r, ms));
  await tick();
  const entry = (offset, value) => ({ type: "entry", key: "answer key", offset, value });
  if (scenario === "resume") {
    sockets[0].frame(entry(2, "c"));
    sockets[0].frame(entry(2, "c"));          // a duplicate: ignored
    sockets[0].frame(entry(3, { d: [4] }));
    sockets[0].close(1006);                   // dropped
    await tick();
    sockets[1].frame(entry(3, { d: [4] }));   // sent again after the resume: ignored
    sockets[1].frame(entry(5, "f"));          // a gap: reconnect from 4
    await tick();
    sockets[2].frame(entry(4, "e"));
    sockets[2].frame(entry(5, "f"));
    sockets[2].frame({ type: "closed", key: "answer key", length: 6 });
    await tick();
  } else if (scenario === "acks") {
    for (let offset = 2; offset < 302; offset++) sockets[0].frame(entry(offset, offset));
    const early = sockets[0].sent.slice();    // 256 entries: acknowledged at once
    await tick(150);                          // the other 44: acknowledged after a short delay
    sockets[0].close(4408);                   // too slow: reconnect from the offset, at once
    await tick(15);
    return { urls: sockets.map((s) => s.url), early, sent: sockets[0].sent, states };
  } else if (scenario === "interrupted") {
    sub.done.then(() => { settled = true; });
    const cut = { type: "interrupted", key: "answer key", length: 3, status: "CANCELLED" };
    sockets[0].frame(entry(2, "c"));
    sockets[0].frame(cut);
    await tick(150);                          // not an end: the ack still goes out
    interruptedState = [sub.state, settled, sockets[0].closed === true];
    sockets[0].close(1006);                   // dropped while interrupted: reconnect from 3
    await tick();
    sockets[1].frame(cut);                    // told again on the new socket: reported once
    sockets[1].frame(entry(3, "d"));          // the workflow was resumed
    sockets[1].frame({ type: "closed", key: "answer key", length: 4 });
    await tick();
    return { urls: sockets.map((s) => s.url), seen, states, closedWith, interruptions,
             interruptedState, acks: sockets[0].sent, state: sub.state };
  } else if (scenario === "silent") {
    sockets[0].frame(entry(2, "c"));
    sockets[0].frame({ type: "heartbeat", interval: 0.1 }); // the server's: 300 ms of silence
    await tick(200);                          // past 3 x 40 ms, not past 3 x 100 ms
    const early = [sub.state, sockets.length];
    await tick(250);                          // silent for 3 heartbeats: lost, reconnected
    return { urls: sockets.map((s) => s.url), seen, states, early, closed: sockets[0].closed,
             acks: sockets[0].sent };
  } else if (scenario === "refused") {
    sockets[0].close(4403);
    await tick(100);
  }
  return { urls: sockets.map((s) => s.url), seen, states, closedWith, error,
           offset: sub.offset, state: sub.state };
}
"""


def run_client(page: Any, demo: Demo, scenario: str) -> dict[str, Any]:
    page.goto(demo.base + "/accounts/login/")
    module = demo.base + "/static/durable_streams/durable-streams.js"
    return page.evaluate(CLIENT_SCRIPT, [module, scenario])


def test_client_reports_each_value_once_across_drops_and_gaps(page: Any, demo: Demo) -> None:
    result = run_client(page, demo, "resume")
    assert result["seen"] == [[2, "c"], [3, {"d": [4]}], [4, "e"], [5, "f"]]
    assert result["closedWith"] == 6 and result["state"] == "closed" and result["offset"] == 6
    assert result["urls"] == [
        "wss://example.com/ws/durable-streams/wf%2F1/answer%20key/?offset=2",
        "wss://example.com/ws/durable-streams/wf%2F1/answer%20key/?offset=4",
        # After the gap it asks again for the offset it still needs.
        "wss://example.com/ws/durable-streams/wf%2F1/answer%20key/?offset=4",
    ]
    assert result["states"][:3] == ["open", "waiting", "connecting"]


def test_client_acknowledges_and_reconnects_after_4408(page: Any, demo: Demo) -> None:
    result = run_client(page, demo, "acks")
    assert result["early"] == [{"type": "ack", "offset": 2 + 256}]
    assert result["sent"] == [{"type": "ack", "offset": 258}, {"type": "ack", "offset": 302}]
    # Reconnected without backoff (minDelay is 5 ms here), from the next offset it needs.
    assert result["urls"][1:] == [
        "wss://example.com/ws/durable-streams/wf%2F1/answer%20key/?offset=302"
    ]
    assert result["states"][-3:] == ["waiting", "connecting", "open"]


def stored_stream(demo: Demo, count: int, chars: int) -> str:
    """A finished public workflow in the demo's database with one closed stream, "big"."""
    script = f"""
from django.utils import timezone
from durable_streams import encoding
from durable_streams.models import Status, Stream, StreamEntry, Workflow
now = timezone.now()
run = Workflow.objects.create(
    name="tests.big", status=Status.SUCCESS, inputs="{{}}", max_attempts=1, is_public=True,
    finished_at=now)
stream = Stream.objects.create(workflow=run, key="big", length={count}, closed_at=now)
StreamEntry.objects.bulk_create(
    [StreamEntry(stream=stream, offset=i, value=encoding.dumps(f"{{i:06d}}" + "x" * {chars - 6}))
     for i in range({count})], batch_size=500)
print(run.pk)
"""
    result = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "shell", "-c", script],
        cwd=ROOT,
        env=demo.env,
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    )
    return result.stdout.strip().splitlines()[-1]


def test_a_stream_larger_than_the_window_arrives_whole(page: Any, demo: Demo) -> None:
    count, chars = 3000, 1000  # 3 MB: three times the server's 1 MiB window
    workflow_id = stored_stream(demo, count, chars)
    page.goto(demo.base + "/accounts/login/")
    result = page.evaluate(
        """async ([moduleUrl, workflowId]) => {
          const { subscribe } = await import(moduleUrl);
          const offsets = [];
          const states = [];
          let wrong = 0;
          const sub = subscribe(workflowId, "big", {
            onEntry: (value, offset) => {
              offsets.push(offset);
              if (!value.startsWith(String(offset).padStart(6, "0"))) wrong += 1;
            },
            onStatus: (state) => states.push(state),
          });
          const length = await sub.done;
          return { length, count: offsets.length, inOrder: offsets.every((o, i) => o === i),
                   wrong, states };
        }""",
        [demo.base + "/static/durable_streams/durable-streams.js", workflow_id],
    )
    assert result["length"] == count and result["count"] == count, result
    assert result["inOrder"] and result["wrong"] == 0
    # The acks kept the window open: one connection carried it all, no 4408 reconnection.
    assert result["states"] == ["open", "closed"], result["states"]


def test_client_reports_an_interruption_and_follows_the_resume(page: Any, demo: Demo) -> None:
    result = run_client(page, demo, "interrupted")
    assert result["interruptions"] == [{"key": "answer key", "length": 3, "status": "CANCELLED"}]
    # Interrupted is no end: still subscribed, `done` unsettled, the socket left open.
    assert result["interruptedState"] == ["interrupted", False, False]
    assert result["acks"] == [{"type": "ack", "offset": 3}]
    assert result["seen"] == [[2, "c"], [3, "d"]]
    assert result["closedWith"] == 4 and result["state"] == "closed"
    assert result["urls"][1].endswith("?offset=3")
    assert result["states"] == [
        "open",
        "interrupted",
        "waiting",
        "connecting",
        "open",
        "interrupted",
        "open",
        "closed",
    ]


def test_client_takes_a_silent_socket_for_lost_and_reconnects(page: Any, demo: Demo) -> None:
    result = run_client(page, demo, "silent")
    # The heartbeat frame set the interval: still open after 3 x the option's 40 ms.
    assert result["early"] == ["open", 1]
    assert result["seen"] == [[2, "c"]], "a heartbeat is no value"
    assert result["acks"] == [{"type": "ack", "offset": 3}], "and needs no ack"
    assert result["closed"] is True
    assert result["states"][:4] == ["open", "lost", "waiting", "connecting"], result["states"]
    assert result["urls"][1].endswith("?offset=3")


def test_client_gives_up_on_a_refusal(page: Any, demo: Demo) -> None:
    result = run_client(page, demo, "refused")
    assert result["error"] == {"code": 4403, "name": "StreamRefused"}
    assert result["state"] == "failed"
    assert len(result["urls"]) == 1, "a refusal is final: no reconnection"
    assert json.dumps(result["seen"]) == "[]"
