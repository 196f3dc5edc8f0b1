"""balancer: a master-dispatch load balancer and process supervisor for aiohttp apps."""

import sys

__version__ = "0.1.0"

# One clear error instead of a missing socket.SOCK_SEQPACKET, os.memfd_create or prctl somewhere later: the
# hand-off (SCM_RIGHTS over SOCK_SEQPACKET), the ack boards (memfd) and the worker's parent-death signal are
# Linux's.
if not sys.platform.startswith("linux"):
    raise ImportError(f"balancer runs on Linux only (SCM_RIGHTS over SOCK_SEQPACKET, memfd, prctl); "
                      f"this is {sys.platform}")
