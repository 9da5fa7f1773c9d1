"""The master's fd limit: the soft RLIMIT_NOFILE raised to the hard one, said once."""
import logging
import resource

from supervisor.system import limits


def test_the_soft_fd_limit_is_raised_to_the_hard_one_once(caplog):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    log = logging.getLogger("tests.limits")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 512), hard))
        caplog.set_level(logging.INFO, "tests.limits")
        target = hard if hard != resource.RLIM_INFINITY else limits._UNLIMITED_FDS
        assert limits.raise_fd_limit(log) == (min(hard, 512), target)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (target, hard)
        assert limits.raise_fd_limit(log) is None   # there already: nothing to say
        assert [r.getMessage() for r in caplog.records] == [f"fd limit raised from {min(hard, 512)} to {target}"]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
