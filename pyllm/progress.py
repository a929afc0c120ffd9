"""Progress bars of long commands (convert, train, perplexity, the default model's download), on stderr.

On a terminal a tqdm bar redraws its line in place. Anywhere else (`2> log.txt`, a pipe, a CI log) a
bar's redraws were carriage returns into the file: one line of every state joined by CRs. There the
same bar writes plain lines instead: its first state, one at most every PLAIN_INTERVAL seconds, and its
last.
"""

from __future__ import annotations

import os
import sys

PLAIN_INTERVAL = 30.0  # seconds between two lines of a bar written to a file or pipe


def has_fileno(stream) -> bool:
    try:
        stream.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False


def is_terminal(stream) -> bool:
    """Whether stream is a terminal (a file object with a descriptor that isatty)."""
    return has_fileno(stream) and os.isatty(stream.fileno())


class _Lines:
    """A file for tqdm away from a terminal: each state it draws ("\\r" + state + padding) is written as
    one line; the "\\r" and "\\n" it writes alone (to clear or end its line) are dropped."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> None:
        line = s.strip("\r\n").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int | None, desc: str, unit: str, enabled: bool = True, log=None, **options):
    """A tqdm bar of `total` steps of `unit` on log (default: sys.stderr), redrawn in place on a
    terminal, else written as plain lines (the module's docstring); disabled (no output) unless enabled.
    options go to tqdm (initial, ...). Callers that set a postfix at every step pass refresh=False to
    set_postfix: update() then draws it at the bar's own pace (a refresh is a line away from a terminal)."""
    from tqdm import tqdm

    log = sys.stderr if log is None else log
    if not enabled or log is None:  # (sys.stderr is None when Python started with it closed)
        return tqdm(total=total, disable=True)
    if is_terminal(log):
        return tqdm(total=total, desc=desc, unit=unit, file=log, **options)
    # (maxinterval too: tqdm's monitor thread otherwise forces a redraw of a fast loop every 10 s)
    return tqdm(total=total, desc=desc, unit=unit, file=_Lines(log), mininterval=PLAIN_INTERVAL,
                maxinterval=PLAIN_INTERVAL, ascii=True, **options)
