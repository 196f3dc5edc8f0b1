"""The errno sets that the master and the workers decide by, each defined once."""

from __future__ import annotations

import errno

# A send on a control channel failed because the other end is closed: the peer is gone (or going), and
# retrying cannot help. Any other error (ENOBUFS, ENOMEM: the kernel is short of memory for a moment) is
# transient, and the sender waits and tries again.
PEER_GONE_ERRNOS = frozenset((errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNREFUSED, errno.EBADF,
                              errno.ENOTSOCK))
# The process or the system is out of fds or memory: back off and keep serving, no traceback per attempt.
RESOURCE_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
