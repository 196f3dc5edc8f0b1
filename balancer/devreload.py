"""--reload for development: watch the app directory and run the rolling reload on each change (watchfiles)."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Callable

from balancer.config import ConfigError

log = logging.getLogger("balancer")

# Changes are grouped until the directory has been quiet this long (an editor's save is several events), and
# for no longer than DEBOUNCE_MS in all.
QUIET_MS = 200
DEBOUNCE_MS = 1600


def require_watchfiles() -> None:
    """ConfigError unless the optional watchfiles package is importable."""
    try:
        import watchfiles  # noqa: F401
    except ImportError:
        raise ConfigError("--reload needs watchfiles: pip install 'balancer[reload]'") from None


def source_filter(root: str):
    """A watchfiles filter for Python sources, like uvicorn's: no __pycache__, no .pyc, nothing hidden."""
    from watchfiles import PythonFilter

    class SourceFilter(PythonFilter):
        def __call__(self, change, path: str) -> bool:
            relative = os.path.relpath(path, root)
            if any(part.startswith(".") for part in relative.split(os.sep) if part not in (".", "..")):
                return False  # hidden files and folders: editors' swap files, .git, .venv
            return super().__call__(change, path)

    return SourceFilter()


class DevReloader:
    """Watches a directory from the master's loop; calls on_change with the changed paths (relative), per batch."""

    def __init__(self, directory: str, on_change: Callable[[list[str]], None]) -> None:
        self.directory = os.path.abspath(directory)
        self.on_change = on_change
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Begin watching; changes from the first loop iteration on are seen."""
        self._task = asyncio.ensure_future(self._watch())
        log.info("watching %s for changes to Python files (--reload)", self.directory)

    async def _watch(self) -> None:
        from watchfiles import awatch

        try:
            async for changes in awatch(self.directory, watch_filter=source_filter(self.directory),
                                        debounce=DEBOUNCE_MS, step=QUIET_MS, stop_event=self._stop):
                try:
                    self.on_change(sorted({os.path.relpath(path, self.directory) for _, path in changes}))
                except Exception:
                    log.exception("--reload: acting on a change failed; still watching")
        except Exception:
            # Watching is a convenience: losing it (say, the directory is removed) must not stop serving.
            log.exception("--reload: watching %s failed; changes are no longer picked up", self.directory)

    async def close(self) -> None:
        """Stop watching (the watcher thread notices within QUIET_MS)."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
