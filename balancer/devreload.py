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
# How often watchfiles hands over what it saw. Its own grouping ends a batch when the batch stops growing, and
# writes to a path already in it do not grow it: a file written every 100 ms made a batch every 200 ms. So
# batches are taken often and grouped here, by time.
STEP_MS = 50


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
        batches: asyncio.Queue = asyncio.Queue()  # sets of changed paths; None once watching ends
        reader = asyncio.ensure_future(self._read(batches))
        try:
            while (paths := await batches.get()) is not None:
                paths = await self._group(batches, paths)
                try:
                    self.on_change(sorted({os.path.relpath(path, self.directory) for path in paths}))
                except Exception:
                    log.exception("--reload: acting on a change failed; still watching")
        finally:
            await reader

    async def _read(self, batches: asyncio.Queue) -> None:
        """Put each batch watchfiles reports on the queue, then None."""
        from watchfiles import awatch

        try:
            async for changes in awatch(self.directory, watch_filter=source_filter(self.directory),
                                        debounce=DEBOUNCE_MS, step=STEP_MS, stop_event=self._stop):
                batches.put_nowait({path for _, path in changes})
        except Exception:
            # Watching is a convenience: losing it (say, the directory is removed) must not stop serving.
            log.exception("--reload: watching %s failed; changes are no longer picked up", self.directory)
        finally:
            batches.put_nowait(None)

    async def _group(self, batches: asyncio.Queue, paths: set) -> set:
        """Add the batches that follow within QUIET_MS of each other, for DEBOUNCE_MS at most."""
        loop = asyncio.get_running_loop()
        until = loop.time() + DEBOUNCE_MS / 1000
        while (wait := min(QUIET_MS / 1000, until - loop.time())) > 0:
            try:
                more = await asyncio.wait_for(batches.get(), wait)
            except asyncio.TimeoutError:
                break
            if more is None:  # watching ended: hand over what came, then stop
                batches.put_nowait(None)
                break
            paths |= more
        return paths

    async def close(self) -> None:
        """Stop watching (the watcher thread notices within QUIET_MS)."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
