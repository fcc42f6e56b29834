"""The supervisor that keeps the stack's processes running, as compose's
`restart: unless-stopped` does, and its restart policy: a process that exits is started again
after a delay that doubles while it keeps exiting soon after its start."""

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from ops.console import ROOT, say

STOP_TIMEOUT_S = 15.0
# Restarts: the first after RESTART_DELAY_S; each further exit within STABLE_AFTER_S of its start
# doubles the wait, up to RESTART_MAX_DELAY_S, so a child that cannot start does not spin.
RESTART_DELAY_S = 1.0
RESTART_MAX_DELAY_S = 30.0
STABLE_AFTER_S = 30.0


def signal_group(child: subprocess.Popen[bytes], signum: int) -> None:
    try:
        os.killpg(child.pid, signum)
    except ProcessLookupError:
        pass  # the whole group is gone already


def exit_reason(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


@dataclass
class Child:
    """One process of the stack and where it stands in its restarts."""

    name: str
    command: list[str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    quick_exits: int = 0  # in a row, each within STABLE_AFTER_S of its start
    restart_at: float | None = None


class Supervisor:
    """Keeps the stack's processes running as compose's `restart: unless-stopped` does.

    Each child leads its own process group, so Ctrl-C reaches devstack alone, which stops them
    in turn. `clock` is what the restart delays are measured with."""

    def __init__(
        self,
        commands: dict[str, list[str]],
        env: dict[str, str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.children = {name: Child(name, command) for name, command in commands.items()}
        self.env = env
        self.clock = clock

    def start(self) -> None:
        for child in self.children.values():
            self._spawn(child)

    def check(self) -> set[str]:
        """Schedule the restart of children that exited, start those whose wait is over, and
        return the names of those started."""
        started = set()
        for child in self.children.values():
            if child.process is not None and child.process.poll() is not None:
                self._schedule_restart(child)
            if child.restart_at is not None and self.clock() >= child.restart_at:
                self._spawn(child)
                started.add(child.name)
        return started

    def _spawn(self, child: Child) -> None:
        say(f"starting {child.name}: {' '.join(child.command)}")
        child.process = subprocess.Popen(child.command, env=self.env, cwd=ROOT, process_group=0)
        child.started_at = self.clock()
        child.restart_at = None

    def _schedule_restart(self, child: Child) -> None:
        assert child.process is not None
        returncode = child.process.returncode
        signal_group(child.process, signal.SIGKILL)  # what the leader left in its group
        ran_s = self.clock() - child.started_at
        child.quick_exits = child.quick_exits + 1 if ran_s < STABLE_AFTER_S else 1
        delay = min(RESTART_DELAY_S * 2 ** (child.quick_exits - 1), RESTART_MAX_DELAY_S)
        child.process = None
        child.restart_at = self.clock() + delay
        message = f"{child.name} {exit_reason(returncode)} after {ran_s:.1f} s"
        if child.quick_exits > 1:
            message += (
                f": {child.quick_exits} exits in a row, each within {STABLE_AFTER_S:.0f} s of "
                f"its start (its own output above says why). Restarting it in {delay:.0f} s; "
                f"the wait doubles at each such exit, up to {RESTART_MAX_DELAY_S:.0f} s"
            )
        else:
            message += f"; restarting it in {delay:.0f} s"
        say(message)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM every group (a worker's pool processes too), then SIGKILL what outlives the
        wait. Children waiting for a restart stay stopped."""
        running = {}
        for name, child in self.children.items():
            child.restart_at = None
            if child.process is not None:
                running[name] = child.process
        for process in running.values():
            signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for name, process in running.items():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"{name} did not stop in {timeout_s:.0f} s: killing it")
        for process in running.values():
            signal_group(process, signal.SIGKILL)
            process.wait()
