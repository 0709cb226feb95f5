"""Log lines on the attack path, rate-limited."""
import time as _time


class LogLimiter:
    """At most ``burst`` lines per ``window`` seconds at the caller's level; the rest go to
    debug, so a flood of failures never floods the log."""

    def __init__(self, log, burst=5, window=10.0):
        self.log, self.burst, self.window = log, burst, window
        self.start, self.n = -window, 0

    def __call__(self, level, msg, *args):
        now = _time.monotonic()
        if now - self.start >= self.window:
            self.start, self.n = now, 0
        self.n += 1
        if self.n <= self.burst:
            self.log.log(level, msg, *args)
            if self.n == self.burst:
                self.log.log(level, "(more of these in the next %gs are logged at debug "
                                    "level)", self.window)
        else:
            self.log.debug(msg, *args)
