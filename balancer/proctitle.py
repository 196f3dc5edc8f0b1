"""Process titles in ps and top: `balancer: master [name]`, `balancer: worker 0 [name]` (setproctitle extra)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("balancer")

# The master names the instance once its sockets are bound; the workers it starts afterwards inherit the name
# through the environment, so a replacement started by a reload carries the same title.
NAME_ENV = "BALANCER_PROC_NAME"


def instance_name(name: str, labels: list[str]) -> str:
    """--name, or else the first bound address (gunicorn's proc_name defaults to the app the same way)."""
    return name or (labels[0] if labels else "")


def set_title(role: str, name: str, say: bool = True) -> bool:
    """Show `balancer: ROLE [name]` in ps/top; False without setproctitle (said at debug level when say)."""
    try:
        from setproctitle import setproctitle
    except ImportError:
        if say:
            log.debug("process titles unchanged: setproctitle is not installed (pip install 'balancer[proctitle]')")
        return False
    setproctitle(f"balancer: {role} [{name}]" if name else f"balancer: {role}")
    return True


def title_master(name: str, labels: list[str]) -> None:
    """Title the master and leave the instance name for the workers it starts from now on."""
    name = instance_name(name, labels)
    os.environ[NAME_ENV] = name
    set_title("master", name)


def title_worker(slot: int) -> None:
    """Title a worker with its slot and the name its master chose."""
    set_title(f"worker {slot}", os.environ.get(NAME_ENV, ""), say=False)  # the master said it once already
