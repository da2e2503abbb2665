"""A real `ray start --head` of a test's own: its own ports and temp folder, so that other Rays on the
machine neither see nor disturb it, stopped by killing the processes of its session (as `ray stop
--force` does, for this head only: `ray stop` would stop every Ray on the machine)."""
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = Path(sys.executable).parent / "ray"


def session_pids(session: int) -> list[int]:
    """The live processes of a session: those of the `ray start` that led it keep it."""
    pids = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):
            if entry.name.isdigit() and os.getsid(int(entry.name)) == session:
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":  # not a zombie
                    pids.append(int(entry.name))
    return pids


def kill_session(session: int) -> None:
    """SIGKILL every process of the session; fail if any is left after 30 s."""
    deadline = time.monotonic() + 30
    while (pids := session_pids(session)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    assert not session_pids(session), f"processes of session {session} are left"


@contextlib.contextmanager
def two_cpu_head(prefix: str, port: int, dashboard_port: int):
    """A head of 2 CPUs on 127.0.0.1 with the dashboard on and token authentication off (a test's):
    yields the environment its clients run in and its temp folder, removed once the head is gone."""
    work = Path(tempfile.mkdtemp(prefix=prefix))           # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    try:
        with ray_head(work, env, port, dashboard_port, "--num-cpus=2", "--node-ip-address=127.0.0.1"):
            yield env, work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def ray_head(work: Path, env: dict[str, str], port: int, dashboard_port: int, *options: str):
    """Start a head with `options` (its resources, autoscaling config); yield; kill its session."""
    head = subprocess.Popen(
        [RAY, "start", "--head", f"--port={port}", f"--ray-client-server-port={port + 1}",
         f"--dashboard-port={dashboard_port}", "--dashboard-agent-listen-port=0", f"--temp-dir={work / 'ray'}",
         "--disable-usage-stats", *options],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = head.communicate(timeout=120)          # a minute and more when the machine is busy
        assert head.returncode == 0, out
        yield
    finally:
        kill_session(head.pid)
