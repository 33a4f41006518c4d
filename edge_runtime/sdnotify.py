"""systemd's notify protocol (sd_notify(3)) in the standard library: readiness, watchdog pings, status text.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket) and,
with ``WatchdogSec=``, ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``). Each message is one datagram of
``KEY=value`` lines. Without ``$NOTIFY_SOCKET`` (a shell, a test, a container) every call is a no-op.

A failing notify socket must never take the agent down: send errors are logged once and reported as a
False return, never raised. Time is a parameter of :meth:`Notifier.tick`, so pacing is testable.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

__all__ = ["Notifier", "watchdog_interval_s"]

log = logging.getLogger(__name__)


def watchdog_interval_s(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """systemd's watchdog timeout (``WatchdogSec=``) in seconds, or None when no watchdog applies to us.

    None when ``$WATCHDOG_USEC`` is unset, not a positive integer, or when ``$WATCHDOG_PID`` is set and
    names another process (the variables were inherited from a parent that systemd watches).
    """
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "").strip()
    if not usec:
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    if value <= 0:
        return None
    wpid = env.get("WATCHDOG_PID", "").strip()
    if wpid:
        try:
            if int(wpid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            log.warning("ignoring the watchdog: WATCHDOG_PID=%r is not a pid", wpid)
            return None
    return value / 1_000_000


def _address(spec: str) -> str | None:
    """The AF_UNIX address for a ``$NOTIFY_SOCKET`` value; None for kinds we do not speak (vsock:...)."""
    if spec.startswith("@"):
        return "\0" + spec[1:]  # Linux abstract namespace
    if spec.startswith("/"):
        return spec
    return None


class Notifier:
    """Sends sd_notify messages to systemd; a no-op when ``$NOTIFY_SOCKET`` is unset.

    ``ping_interval_s`` is half the watchdog timeout (None without a watchdog): :meth:`tick`, called from a
    loop that wakes more often than that, sends ``WATCHDOG=1`` at that pace.
    """

    def __init__(self, env: Mapping[str, str] | None = None, *, pid: int | None = None) -> None:
        env = os.environ if env is None else env
        spec = env.get("NOTIFY_SOCKET", "")
        self._address = _address(spec) if spec else None
        if spec and self._address is None:
            log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract @socket: not notifying systemd", spec)
        timeout = watchdog_interval_s(env, pid) if self._address is not None else None
        self.ping_interval_s: float | None = timeout / 2 if timeout is not None else None
        self._next_ping: float | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False
        self.sent = 0
        self.failed = 0

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def ready(self, status: str | None = None) -> bool:
        """Start-up is complete: systemd marks the unit active (and starts the watchdog clock)."""
        lines = ["READY=1"]
        if status is not None:
            lines.append(_status_line(status))
        return self.send(*lines)

    def status(self, text: str) -> bool:
        """Free-form one-line status shown by ``systemctl status``."""
        return self.send(_status_line(text))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        """Shutdown has begun (systemd shows "deactivating" instead of suspecting a crash)."""
        return self.send("STOPPING=1")

    def extend_timeout(self, us: int) -> bool:
        """Ask for ``us`` more microseconds for the current start-up or shutdown step (a slow model load)."""
        if isinstance(us, bool) or not isinstance(us, int) or us <= 0:
            raise ValueError(f"extend_timeout expects a positive number of microseconds, got {us!r} "
                             f"({type(us).__name__})")
        return self.send(f"EXTEND_TIMEOUT_USEC={us}")

    def tick(self, now: float) -> bool:
        """Send ``WATCHDOG=1`` when a ping is due at monotonic time ``now``; True when one was sent."""
        if self.ping_interval_s is None:
            return False
        if self._next_ping is not None and now < self._next_ping:
            return False
        self._next_ping = now + self.ping_interval_s
        return self.watchdog()

    def send(self, *lines: str) -> bool:
        """One datagram of ``KEY=value`` lines. True when sent; False when disabled or the send failed."""
        if self._address is None or not lines:
            return False
        data = "\n".join(lines).encode("utf-8")
        try:
            with self._lock:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(data, self._address)
        except OSError as e:
            self.failed += 1
            if not self._warned:
                self._warned = True
                shown = "@" + self._address[1:] if self._address.startswith("\0") else self._address
                log.warning("cannot notify systemd at %s: %s (further failures are not logged)", shown, e)
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _status_line(text: str) -> str:
    # One message line per field: a newline inside the text would start a bogus field.
    return "STATUS=" + " ".join(str(text).splitlines()).strip()
