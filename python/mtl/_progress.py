"""Progress of a running call, shown in a terminal or a notebook: tqdm's bars where tqdm is installed (its
notebook widgets under Jupyter), a plain line every few seconds otherwise. Evaluation lines (a run's dev scores)
are printed above the bar."""

from __future__ import annotations

import sys
import time
from typing import Any, Optional, Tuple

try:  # pragma: no cover - depends on the environment
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # pragma: no cover
    _tqdm = None


class Display:
    """Receives the native module's progress events (`("start", what, total, unit)`,
    `("position", position, message)`, `("line", text)`, `("finish",)`) and shows them."""

    def __init__(self, every_seconds: float = 5.0) -> None:
        self._bar: Any = None
        self._plain: Optional[Tuple[str, int, str]] = None
        self._last = 0.0
        self._every = every_seconds

    def __call__(self, event: tuple) -> None:
        kind = event[0]
        if kind == "start":
            _, what, total, unit = event
            self._close()
            if _tqdm is not None:
                self._bar = _tqdm(total=total, desc=what, unit=unit.rstrip("s") or unit, dynamic_ncols=True)
            else:
                self._plain = (what, total, unit)
                self._last = time.monotonic()
        elif kind == "position":
            _, position, message = event
            if self._bar is not None:
                self._bar.update(position - self._bar.n)
                if message:
                    self._bar.set_postfix_str(message, refresh=False)
            elif self._plain is not None and time.monotonic() - self._last >= self._every:
                what, total, unit = self._plain
                print(f"{what}: {position}/{total} {unit}" + (f" ({message})" if message else ""), file=sys.stderr)
                self._last = time.monotonic()
        elif kind == "line":
            if self._bar is not None:
                self._bar.write(event[1], file=sys.stderr)
            else:
                print(event[1], file=sys.stderr)
        elif kind == "finish":
            self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._plain = None
