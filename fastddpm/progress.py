"""Progress bars (tqdm, on stderr) that share their line with nothing else: sampling's, the
Inception features' and the likelihood bound's.

An engine is built, and `--backend auto` picks one, inside the first sampling step, while the bar
is up; so is an error raised there. Without care a log line (`--verbose`, or the int8
calibration's warning) and the one-line error message would start at the end of the bar's line.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

log = logging.getLogger("fastddpm")


def _prints_to_the_console(logger: logging.Logger) -> bool:
    """Whether `logger`'s records reach stdout/stderr through its own handlers, or through none at
    all (then logging's last resort prints its warnings on stderr). Handlers an application set up
    higher up are left alone."""
    if not logger.hasHandlers():
        return True
    return any(isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)
               for h in logger.handlers)


@contextlib.contextmanager
def progress_bar(show: bool, **tqdm_args) -> Iterator[Callable[[int], object]]:
    """`update(n)` of a tqdm bar made with `tqdm_args`, or a no-op where `show` is false. While
    it is up, fastddpm's console log lines print above the bar (tqdm.write); on an error it is
    closed, ending its line, before the error travels on."""
    if not show:
        yield lambda n=1: None
        return
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    redirect = logging_redirect_tqdm([log], tqdm_class=tqdm) if _prints_to_the_console(log) \
        else contextlib.nullcontext()
    with tqdm(**tqdm_args) as bar, redirect:
        yield bar.update
