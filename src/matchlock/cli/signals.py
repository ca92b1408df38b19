"""Ctrl-C as the CLI reports it, shared by the click application and the click-free paths."""


class Interrupted(BaseException):
    """Ctrl-C outside a command's own handling. Not a KeyboardInterrupt, which click turns
    into "Aborted" after printing an empty line: the user gets one line."""


def on_sigint(signo: int, frame: object) -> None:
    raise Interrupted


def install() -> None:
    """Ctrl-C raises Interrupted, unless something already chose what SIGINT does."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, on_sigint)
