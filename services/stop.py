"""Stopping on Ctrl-C / SIGTERM: both raise :class:`Interrupted` (a ``KeyboardInterrupt``) in the main thread,
so ``finally`` blocks run (actors killed, MLflow run ended, ``ray.shutdown()``) and the process exits
``128 + signal``.

``ray.init`` installs its own SIGTERM handler (``sys.exit``, which skips ``except KeyboardInterrupt``), so
:func:`install` is called again once Ray is up. :class:`StepGuard` lets the training loop finish the step in
flight (at most ``grace_s``) so that a checkpoint written on the way out holds only state that was trained.
"""

from __future__ import annotations

import _thread
import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STEP_GRACE_S = 10.0


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived; ``exit_code`` is ``128 + signum``, ``str()`` the line to show."""

    def __init__(self, signum: int = signal.SIGINT, message: str = "") -> None:
        self.signum = int(signum)
        super().__init__(message or f"interrupted ({signal.Signals(self.signum).name})")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signum_of(exc: BaseException) -> int:
    return int(getattr(exc, "signum", signal.SIGINT))


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def install() -> None:
    """SIGINT and SIGTERM raise :class:`Interrupted` (main thread only; elsewhere a no-op)."""
    if _main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, _raise)


class StepGuard:
    """``with guard.step(): ...``: a stop signal inside the block is held until the block ends (then
    :meth:`check` raises at the step boundary), unless the block runs ``grace_s`` past the signal or a second
    signal comes: then it raises inside the block and ``mid_step`` is true (the step's state is unknown)."""

    def __init__(self, grace_s: float = STEP_GRACE_S) -> None:
        self.grace_s = grace_s
        self.signum: int | None = None
        self.mid_step = False
        self._inside = False
        self._timer: threading.Timer | None = None

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            self._timer = threading.Timer(self.grace_s, _thread.interrupt_main, args=(signum,))
            self._timer.daemon = True
            self._timer.start()
            return
        self.mid_step = self._inside
        raise Interrupted(signum)

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        if not _main_thread():
            yield
            return
        self._inside = True
        for s in STOP_SIGNALS:
            signal.signal(s, self._hold)
        try:
            yield
        except KeyboardInterrupt:
            self.mid_step = True
            raise
        finally:
            self._inside = False
            if self._timer is not None:
                self._timer.cancel()
            install()

    def check(self) -> None:
        """Raise :class:`Interrupted` when a signal was held during the last step."""
        if self.signum is not None:
            raise Interrupted(self.signum)


@contextlib.contextmanager
def ignored() -> Iterator[None]:
    """Stop signals are ignored inside (clean-up that a second Ctrl-C must not cut short), then raise again."""
    if not _main_thread():
        yield
        return
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    try:
        yield
    finally:
        install()
