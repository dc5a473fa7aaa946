"""Fail a test that blocks instead of hanging the test run."""
import contextlib
import signal


@contextlib.contextmanager
def hang_guard(seconds: int = 60):
    """Raise ``TimeoutError`` in the block after ``seconds``.

    SIGALRM aborts even a blocking system call such as ``open`` of a named
    pipe (PEP 475: an exception raised by the handler ends the call).
    Main thread only.
    """
    def stop(signum, frame):
        raise TimeoutError(f'still blocked after {seconds} s')

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
