"""`flashlm chat` on a pseudo-terminal, driven as a user at a terminal would (no pexpect: the standard pty module),
so the line editor, Ctrl-C and Ctrl-D are the real ones: the child's controlling terminal is the pty, and \\x03
there sends SIGINT to it as a keyboard would."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import sys
import termios
import time

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")
UP, CTRL_C, CTRL_D = b"\x1b[A", b"\x03", b"\x04"


class PtyChat:
    def __init__(self, *args: str, home: str, timeout: float = 120):
        env = {k: v for k, v in os.environ.items() if k != "XDG_STATE_HOME"}
        env.update(HOME=home, TERM="xterm", COLUMNS="120", LINES="40")
        self.timeout = timeout
        pid, fd = pty.fork()
        if pid == 0:  # the child: its stdin/stdout/stderr and controlling terminal are the pty
            os.execvpe(sys.executable, [sys.executable, "-m", "flashlm.cli", "chat", *args], env)
        self.pid, self.fd = pid, fd
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.raw = b""  # everything the terminal showed
        self.seen = 0  # how much of it expect() has consumed
        self.status: int | None = None

    @property
    def text(self) -> str:
        return ANSI.sub(b"", self.raw).decode("utf-8", "replace").replace("\r", "")

    def _read(self, wait: float) -> bool | None:
        """True: read something; None: nothing within `wait` seconds; False: the terminal closed."""
        ready, _, _ = select.select([self.fd], [], [], wait)
        if not ready:
            return None
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.raw += data
        return bool(data)

    def expect(self, needle: str, timeout: float | None = None) -> str:
        """Wait until `needle` shows after what earlier expects consumed; returns the text up to its end."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            text = self.text
            at = text.find(needle, self.seen)
            if at >= 0:
                before, self.seen = text[self.seen:at + len(needle)], at + len(needle)
                return before
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} never showed; the screen so far:\n{text}")
            if self._read(0.2) is False and self.wait(5) is not None and needle not in self.text[self.seen:]:
                raise AssertionError(f"the chat ended before {needle!r}:\n{self.text}")

    def send(self, data: bytes | str) -> None:
        os.write(self.fd, data.encode() if isinstance(data, str) else data)

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.status is None and time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                break
            self._read(0.1)
        while self._read(0.05) is True and len(self.raw) < 1 << 22:  # drain what is left on the terminal
            pass
        return self.status

    def close(self) -> None:
        if self.status is None:
            os.kill(self.pid, 9)
            self.wait(10)
        os.close(self.fd)
