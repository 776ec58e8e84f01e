"""Ctrl-C between a step's compiled call and its book-keeping.

A step's kernel runs without the GIL; a Ctrl-C pressed meanwhile raises
KeyboardInterrupt at the first Python call after the kernel returns, which
is the book-keeping: the update would be applied but not counted (Adam's
bias correction then one step behind, the dropout counter repeating a
mask).  ``with hold:`` around the kernel call and its book-keeping keeps
the interrupt until the block ends, so a step lands whole or not at all.

Only the main thread receives Python's signal handlers.  The handler is
installed once, on first use, in front of the one already there (Python's
``default_int_handler`` unless the program set its own), which it calls for
every interrupt outside a held block; where SIGINT was ignored, left to the
operating system or set outside Python, nothing is installed or held, and
a handler the program sets later replaces the hold.  Holding costs a
thread check and two counter updates: no ``signal.signal`` or
``getsignal`` per step (each costs microseconds).  A Ctrl-C during a step
that compiles its kernels (a cold first step) waits for the compile.
"""
import signal
import threading

_MAIN = threading.main_thread().ident
_ident = threading.get_ident          # (cheaper than current_thread(): called twice a step)


class _Hold:
    """Re-entrant: nested blocks release the interrupt when the outermost
    one ends."""

    def __init__(self):
        self.depth = 0
        self.pending = None
        self.previous = None
        self.installed = None       # None: not tried yet

    def _handler(self, signum, frame):
        if self.depth:
            self.pending = (signum, frame)
        else:
            self.previous(signum, frame)

    def _install(self):
        # once: signal.getsignal and signal.signal cost microseconds each
        current = signal.getsignal(signal.SIGINT)
        self.installed = False
        if callable(current):          # not SIG_IGN, SIG_DFL or set outside Python
            try:
                signal.signal(signal.SIGINT, self._handler)
            except ValueError:         # not the main interpreter
                return False
            self.previous, self.installed = current, True
        return self.installed

    def __enter__(self):
        if _ident() == _MAIN and (self.installed or (self.installed is None
                                                     and self._install())):
            self.depth += 1

    def __exit__(self, *exc):
        if self.depth and _ident() == _MAIN:
            self.depth -= 1
            if not self.depth and self.pending is not None:
                signum, frame = self.pending
                self.pending = None
                self.previous(signum, frame)       # KeyboardInterrupt, now
        return False


_hold = _Hold()

#: Context manager: a Ctrl-C in the block is raised when it ends.  (An
#: object, not a function returning one: a call less a step.)
hold = _hold
