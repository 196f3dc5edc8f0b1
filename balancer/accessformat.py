"""--access-log-format's syntax, gunicorn's %(atom)s: checked by the master at start-up, compiled by each worker."""

from __future__ import annotations

import re
from typing import Iterator

# %(name)s with a gunicorn atom, %({Header}i)s, %({Header}o)s, %({VAR}e)s; %% is a percent sign.
TOKEN = re.compile(r"%\((\{[^}]*\}[ioe]|[A-Za-z]+)\)s|%%|%")


class AccessFormatError(ValueError):
    """An --access-log-format that is not gunicorn's %(atom)s syntax."""


def tokens(fmt: str) -> Iterator[re.Match]:
    """The %-tokens of fmt in order (group 1: the atom, None for %%); AccessFormatError at a lone '%'."""
    for m in TOKEN.finditer(fmt):
        if m.group() == "%":
            raise AccessFormatError(f"bad --access-log-format {fmt!r}: a '%' at {m.start()} starts no %(atom)s; "
                                    "write %% for a percent sign")
        yield m


def check_format(fmt: str) -> None:
    """Raise AccessFormatError if fmt would not compile in a worker."""
    for _ in tokens(fmt):
        pass
