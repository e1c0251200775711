"""The README's setup, followed as written in a new project.

A project is made with ``django-admin startproject`` in a temporary folder; its settings, URLs,
``asgi.py``, app and page are the code blocks of README.md marked
``<!-- readme-project: PATH -->`` (``(append)`` adds a block to what ``startproject`` wrote), and
the shell blocks marked ``<!-- readme-project: shell -->`` are run in order: the migrations, then
the workers and the ASGI server as real processes on a free loopback port. Headless Chromium then
asks a question on the page and reads the answer's stream with the JavaScript client.
"""

from __future__ import annotations

import configparser
import importlib.util
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.chromium import CHROMIUM, launch_chromium
from tests.processes import ROOT
from tests.waiting import wait_until

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent
README = ROOT / "README.md"
PROMPT = "durable streams survive restarts"  # the value the README's page fills in
ADMIN_USER, ADMIN_PASSWORD = "admin", "readme-admin-password"

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

_BLOCK = re.compile(
    r"^<!-- readme-project: (?P<target>\S+)(?P<append> \(append\))? -->\n"
    r"```[a-z]*\n(?P<body>.*?)^```$",
    re.MULTILINE | re.DOTALL,
)


@dataclass
class Block:
    target: str
    append: bool
    body: str


def readme_blocks() -> list[Block]:
    text = README.read_text()
    blocks = [Block(m["target"], bool(m["append"]), m["body"]) for m in _BLOCK.finditer(text)]
    # A marker that no fenced block follows would silently drop part of the setup.
    markers = re.findall(r"^<!-- readme-project: ", text, re.MULTILINE)
    assert len(blocks) == len(markers), "a marker without its block"
    return blocks


def shell_commands(blocks: list[Block]) -> list[str]:
    """Every command of the shell blocks, in order (``a && b`` is two)."""
    commands = []
    for block in blocks:
        if block.target == "shell":
            for line in block.body.splitlines():
                line = line.split("#", 1)[0].strip()
                commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def clean_env() -> dict[str, str]:
    """The environment of a user's shell: nothing of the test suite's own project."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DJANGO_SETTINGS_MODULE", "DATABASE_URL", "REDIS_URL", "PYTHONPATH"}
        and not key.startswith("DS_")
    }
    env.update(PYTHONUNBUFFERED="1", PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]))
    return env


@dataclass
class Process:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        found = wait_until(
            lambda: self.process.poll() is not None or re.search(pattern, self.log()),
            timeout=timeout,
            interval=0.05,
            what=f"{self.name} to log {pattern!r}",
        )
        assert self.process.poll() is None, f"{self.name} exited:\n{self.log()}"
        assert isinstance(found, re.Match)
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@dataclass
class Project:
    root: Path
    env: dict[str, str]
    base: str = ""
    processes: list[Process] = field(default_factory=list)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log()}" for p in self.processes)


def executable(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} is not installed next to {sys.executable}"
    return str(path)


def run_command(command: str, project: Project, cwd: Path, server: str) -> Path:
    """Run one README command the way a user would; return the folder to go on in."""
    argv = shlex.split(command)
    if argv[0] == "pip":
        # The test run has the package installed already; the extra must bring the server.
        assert argv[:2] == ["pip", "install"], command
        extra = re.fullmatch(r"durable-streams\[(\w+)\]", argv[2])
        assert extra, command
        extras = configparser.ConfigParser()
        extras.read(ROOT / "setup.cfg")
        needs = extras["options.extras_require"][extra[1]].split()
        assert {"channels>=4.1", "daphne>=4.1"} <= set(needs), needs
        return cwd
    if argv[0] == "cd":
        return cwd / argv[1]
    if argv[:3] == ["python", "manage.py", "runworkers"]:
        # Someone to sign in to the admin with (not a README step: the test's own).
        createsuperuser = ["createsuperuser", "--noinput", "--username", ADMIN_USER]
        done = subprocess.run(
            [sys.executable, "manage.py", *createsuperuser, "--email", "admin@example.com"],
            cwd=cwd,
            env={**project.env, "DJANGO_SUPERUSER_PASSWORD": ADMIN_PASSWORD},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        worker = background("runworkers", [sys.executable, *argv[1:]], project, cwd)
        worker.wait_for(r"Worker \S+ started")
        return cwd
    if argv[0] == "daphne":
        # The README's alternatives are named beside this line.
        alternative = {"uvicorn": f"uvicorn {argv[-1]}", "runserver": "python manage.py runserver"}
        if server in alternative:
            assert f"`{alternative[server]}`" in README.read_text()
            argv = shlex.split(alternative[server])
        project.base = start_server(argv, project, cwd)
        return cwd
    argv[0] = sys.executable if argv[0] == "python" else executable(argv[0])
    done = subprocess.run(
        argv, cwd=cwd, env=project.env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return cwd


def background(name: str, argv: list[str], project: Project, cwd: Path, **popen: Any) -> Process:
    log = project.root / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            env=project.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            **popen,
        )
    started = Process(name, process, log)
    project.processes.append(started)
    return started


def start_server(argv: list[str], project: Project, cwd: Path) -> str:
    """The README's server command, on a port of the OS's choosing on the loopback."""
    app = argv[-1]
    if argv[0] == "python":  # runserver: daphne's, with "daphne" in INSTALLED_APPS
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            port = probe.getsockname()[1]
        command = [sys.executable, *argv[1:], f"{HOST}:{port}", "--noreload"]
        server = background("runserver", command, project, cwd)
        server.wait_for("Starting ASGI/Daphne")
        base = f"http://{HOST}:{port}"
        wait_until(lambda: status_of(base + "/") == 200, timeout=30, what="runserver to answer")
        return base
    if argv[0] == "daphne":
        server = background(
            "daphne", [executable("daphne"), "-b", HOST, "-p", "0", app], project, cwd
        )
        found = server.wait_for(rf"Listening on TCP address {re.escape(HOST)}:(\d+)")
        return f"http://{HOST}:{found.group(1)}"
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    fd = listener.fileno()
    try:
        server = background(
            "uvicorn",
            [executable("uvicorn"), "--fd", str(fd), "--lifespan", "off", app],
            project,
            cwd,
            pass_fds=(fd,),
        )
    finally:
        listener.close()
    server.wait_for("Uvicorn running")
    return f"http://{HOST}:{port}"


@pytest.fixture(params=["daphne", "uvicorn", "runserver"])
def project(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Project]:
    server = request.param
    blocks = readme_blocks()
    project = Project(tmp_path, clean_env())
    commands = shell_commands(blocks)
    # The commands that make the project come before the files are written into it.
    split = commands.index("python manage.py migrate")
    cwd = tmp_path
    try:
        for command in commands[:split]:
            cwd = run_command(command, project, cwd, server)
        files = [block for block in blocks if block.target != "shell"]
        assert {block.target for block in files} >= {
            "myproject/settings.py",
            "myproject/asgi.py",
            "myproject/urls.py",
            "myapp/workflows.py",
            "myapp/views.py",
            "myapp/templates/myapp/page.html",
        }
        for block in files:
            path = cwd / block.target
            path.parent.mkdir(parents=True, exist_ok=True)
            if block.append:
                assert path.exists(), f"{block.target} should exist before it is added to"
                path.write_text(path.read_text() + "\n\n" + block.body)
            else:
                path.write_text(block.body)
        for command in commands[split:]:
            cwd = run_command(command, project, cwd, server)
        assert project.base, "the README starts no server"
        yield project
    finally:
        for process in reversed(project.processes):
            process.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with launch_chromium() as chromium:
        yield chromium


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:  # not listening yet
        return 0


def test_the_readme_project_streams_to_the_browser(browser: Any, project: Project) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    responses: dict[str, int] = {}
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("response", lambda r: responses.__setitem__(r.url, r.status))
    try:
        page.goto(project.base + "/")
        page.click("button")
        page.wait_for_url("**/runs/**")
        try:
            page.wait_for_function(
                "() => document.getElementById('state').textContent !== 'connecting'"
            )
        except PlaywrightTimeout:
            raise AssertionError(
                f"the stream never ended; responses {responses}\n{project.logs()}"
            ) from None
        words = PROMPT.split()
        assert page.inner_text("#state") == f"done: {len(words)} values", project.logs()
        assert page.inner_text("#output").split() == [w.upper() for w in words]
        script = project.base + "/static/durable_streams/durable-streams.js"
        assert responses.get(script) == 200, responses

        workflow_id = page.url.rstrip("/").rsplit("/", 1)[1]

        # The admin is styled and shows the run's stream: its static files are served too.
        page.goto(f"{project.base}/admin/durable_streams/workflow/{workflow_id}/change/")
        page.fill("input[name=username]", ADMIN_USER)
        page.fill("input[name=password]", ADMIN_PASSWORD)
        page.click("input[type=submit]")
        page.wait_for_selector("#ds-streams [data-ds-length]")
        assert page.inner_text("#ds-streams [data-ds-length]") == str(len(words))
        assert words[0].upper() in page.inner_text("#ds-streams")
        static = project.base + "/static/"
        for path in ("admin/css/base.css", "durable_streams/admin.css", "durable_streams/admin.js"):
            assert responses.get(static + path) == 200, (path, responses)
        assert errors == [], errors
        # Every request the pages made was answered (the browser's own favicon guess aside).
        failed = {url: code for url, code in responses.items() if code >= 400}
        assert set(failed) <= {project.base + "/favicon.ico"}, failed
    finally:
        context.close()
    for path in ("durable_streams/durable-streams.js", "admin/css/base.css"):
        # Asked directly too, with no browser cache in the way.
        assert status_of(f"{project.base}/static/{path}") == 200, path
