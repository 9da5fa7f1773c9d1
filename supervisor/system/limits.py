"""Process limits the master sets for itself and every child it forks.

Every connection the balancer holds (peeking, queued, or sent and not yet
acknowledged) and every one a worker serves is an fd; the usual soft RLIMIT_NOFILE of
1024 is a few hundred slow clients. The hard limit is what the administrator allows,
so the master raises the soft limit to it once at start, and its children inherit it.
"""
from __future__ import annotations

import resource

# With no hard limit the kernel still caps fds at fs.nr_open; ask for this many then.
_UNLIMITED_FDS = 1 << 20


def raise_fd_limit(log) -> tuple[int, int] | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit, logging "fd limit raised from X
    to Y" once; (X, Y) if it was raised, None if it already was there or could not be
    raised (which is logged as a warning: the master still runs)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _UNLIMITED_FDS if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft >= target:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the fd limit from %d to %d: %s", soft, target, exc)
        return None
    log.info("fd limit raised from %d to %d", soft, target)
    return soft, target
