"""The one progress mechanism for every long loop (tokenize, train, eval).

    with progress(total=500, desc="pretrain") as bar:
        for step in range(500):
            ...
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

It is a tqdm bar. On a terminal it is drawn by tqdm's rich front end; when stderr is
not a terminal (CI logs, pipes) it prints one plain line every `interval` seconds
and a last line at the end, with no carriage returns. On ranks other than 0 it is
silent. Everything goes to stderr: stdout stays free for --json.
"""

from __future__ import annotations

import sys
import warnings

from tqdm import TqdmExperimentalWarning
from tqdm import tqdm as std_tqdm

from prefcli.distributed import is_main

PLAIN_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}]{postfix}"
PLAIN_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}]{postfix}"


class PlainLines(std_tqdm):
    """tqdm that writes whole lines, at most one per `mininterval` seconds."""

    def display(self, msg=None, pos=None):
        self.fp.write(self.__str__() + "\n")
        self.fp.flush()
        self._last_line_n = self.n
        return True

    def set_postfix(self, ordered_dict=None, refresh=False, **kwargs):
        # A postfix change must not print a line of its own; the next tick shows it.
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def close(self):
        if self.disable:
            return
        if getattr(self, "_last_line_n", None) != self.n:
            self.display()  # the final count, once
        self.disable = True
        self._decr_instances(self)


def _rich_bar(**kwargs):
    from rich.console import Console
    from rich.progress import BarColumn, ProgressColumn, Text, TimeElapsedColumn, TimeRemainingColumn
    from tqdm.rich import FractionColumn, RateColumn, tqdm_rich

    class PostfixColumn(ProgressColumn):
        def render(self, task):
            return Text(task.fields.get("postfix") or "")

    class RichBar(tqdm_rich):
        def display(self, *_, **__):
            if hasattr(self, "_task_id"):
                self._prog.update(self._task_id, completed=self.n, description=self.desc, postfix=self.postfix or "")

    unit = kwargs["unit"]
    columns = (
        "[progress.description]{task.description}",
        "[progress.percentage]{task.percentage:>4.0f}%",
        BarColumn(bar_width=20),
        FractionColumn(),
        "[",
        TimeElapsedColumn(),
        "<",
        TimeRemainingColumn(),
        ",",
        RateColumn(unit=unit),
        "]",
        PostfixColumn(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TqdmExperimentalWarning)  # "rich is experimental"
        return RichBar(progress=columns, options={"console": Console(stderr=True)}, **kwargs)


def progress(total: int | None, desc: str, unit: str = "step", *, initial: int = 0, interval: float = 10.0):
    """A progress bar to use as a context manager: `.update(n)`, `.set_postfix(**kv)`.

    `interval` is the seconds between plain lines when stderr is not a terminal.
    """
    kwargs = dict(total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr)
    if not is_main():
        return std_tqdm(disable=True, **kwargs)
    if sys.stderr.isatty():
        return _rich_bar(**kwargs)
    fmt = PLAIN_FORMAT if total is not None else PLAIN_FORMAT_NO_TOTAL
    return PlainLines(bar_format=fmt, mininterval=interval, maxinterval=max(interval, 10.0), **kwargs)
