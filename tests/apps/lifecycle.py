"""Lifecycle hooks that note each call, for tests/process/test_hooks.py.

Every hook appends a line "HOOK PID UID DETAIL" to the file named by the app's
HOOK_LOG variable, so a test sees from outside which ran, in which process, as whom,
in what order. The app itself is tests.apps.lifecycle_app (imported after post_fork).
`/pre-fails` makes pre_request raise; HOOK_FAIL=NAME makes the init hook NAME raise.
"""
import os
import sys

APP_MODULE = "tests.apps.lifecycle_app"


def _note(hook, detail=""):
    with open(os.environ["HOOK_LOG"], "a") as out:
        out.write(f"{hook} {os.getpid()} {os.getuid()} {detail}\n")


def _maybe_fail(hook):
    if os.environ.get("HOOK_FAIL") == hook:
        raise RuntimeError(f"{hook} fails on purpose")


def post_fork(worker):
    _maybe_fail("post_fork")
    _note("post_fork", f"{worker.app}#{worker.index} app-imported={APP_MODULE in sys.modules}")


def post_worker_init(worker):
    _maybe_fail("post_worker_init")
    _note("post_worker_init", f"{worker.app}#{worker.index} app-imported={APP_MODULE in sys.modules}")


def worker_exit(worker):
    _note("worker_exit", f"{worker.app}#{worker.index} pid={worker.pid}")


def pre_request(environ):
    if environ["PATH_INFO"] == "/pre-fails":
        raise RuntimeError("pre_request fails on purpose")
    _note("pre_request", environ["PATH_INFO"])


def post_request(environ, status, duration_s):
    _note("post_request", f"{environ['PATH_INFO']} {status} {duration_s >= 0}")
