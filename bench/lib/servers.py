"""A server under test as a subprocess: started on a free loopback port, timed until ready,
stopped, and checked to leave no process behind.

Contract: standard library plus httpx. A `Server` runs its command in its own process group with
its output in a temporary log file; `start` returns the start-up seconds (launch to the first 200
on the ready path); `stop` sends SIGINT, waits, then SIGKILLs the group, and kills and lists any
process of the group or below it still alive ("orphans"). Every process it signals is one it
started or a descendant of it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, slots=True)
class ServerSpec:
    label: str  # "infinillm x2", "vllm"
    kind: str  # "infinillm" or "vllm": which metrics and ready path
    cmd: list[str]  # without --port
    env: dict[str, str]  # added to this process's environment
    ready_path: str


class Server:
    def __init__(self, spec: ServerSpec, port: int):
        self.spec, self.port, self.base_url = spec, port, f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="serving-", suffix=".log")
        self.proc: subprocess.Popen | None = None
        self.seen_pids: set[int] = set()

    @property
    def command(self) -> list[str]:
        return [*self.spec.cmd, "--port", str(self.port)]

    def start(self, timeout: float) -> float:
        """Launch and wait until the ready path answers 200; returns the start-up seconds."""
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env={**os.environ, **self.spec.env},
                                     cwd=ROOT, start_new_session=True)
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.label} exited with {self.proc.returncode} while "
                                   f"starting:\n{self.log_tail()}")
            try:
                if httpx.get(self.base_url + self.spec.ready_path, timeout=2).status_code == 200:
                    self.note_pids()
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.spec.label} not ready after {timeout} s:\n{self.log_tail()}")

    def note_pids(self) -> None:
        """Remember the server's processes (its group and descendants) to check them at stop."""
        if self.proc is not None:
            self.seen_pids |= _group_and_descendants(self.proc.pid)

    def stop(self, timeout: float) -> dict:
        """SIGINT, wait, then SIGKILL the group; returns how it ended and any processes left."""
        assert self.proc is not None
        self.note_pids()
        t0 = time.perf_counter()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
            how = "sigint"
        except subprocess.TimeoutExpired:
            _kill_group(self.proc.pid)
            self.proc.wait()
            how = "sigkill"
        time.sleep(1.0)  # let children notice their parent went
        left = sorted(p for p in self.seen_pids | _group_and_descendants(self.proc.pid)
                      if _alive(p))
        for pid in left:  # ours by construction: members of the group we started, or below it
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
        return {"stopped_by": how, "stop_s": time.perf_counter() - t0,
                "exit_code": self.proc.returncode, "num_processes_seen": len(self.seen_pids),
                "orphans": left}

    def log_tail(self, n: int = 3000) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-n:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, process group) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[2])


def _group_and_descendants(root: int) -> set[int]:
    stats = {int(p): s for p in os.listdir("/proc") if p.isdigit()
             if (s := _proc_stat(int(p))) is not None}
    found = {pid for pid, (_, _, pgid) in stats.items() if pgid == root}
    found.add(root)
    grew = True
    while grew:
        new = {pid for pid, (_, ppid, _) in stats.items() if ppid in found} - found
        found |= new
        grew = bool(new)
    return found


def _alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
