"""The app's lifecycle hooks, called in its worker as its user (the master imports none).

Each is a `module:function` of the app's config (`config.modulespec.parse_hook`),
imported by `Hooks.load` when the worker boots, before anything else of the app's:

    post_fork(worker)              booted this far: the app's user, directory and
                                   paths are set; the app is not imported yet
    post_worker_init(worker)       the app is imported; the worker is not READY yet
    worker_exit(worker)            the worker stopped serving (a graceful or quick
                                   stop), its last response sent; not after an abort
    pre_request(environ)           before the app's call, on the thread that makes it
    post_request(environ, status, duration_s)
                                   the app's response is complete (right after its
                                   call for a list, when the server closes its iterable
                                   otherwise); `status` is the status line the app gave
                                   ("200 OK"), None if it gave none (it raised first);
                                   `duration_s` counts from the app's call

`worker` is a `WorkerInfo`. A hook that cannot be imported, or post_fork or
post_worker_init raising, fails the boot (the caller reports the traceback, as for an
import error). pre_request raising costs its request a 500 (the app is not called);
post_request or worker_exit raising costs nothing; both are logged with the traceback.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from supervisor.config.modulespec import HOOKS as NAMES
from supervisor.http.wsgi import FileWrapper
from supervisor.worker import appload

_ERROR_BODY = b"Internal Server Error\n"


@dataclass(frozen=True)
class WorkerInfo:
    """Who the hook runs in: the app's name, the worker's index and generation (as
    `baton ctl status` shows them), its pid and the user it runs as."""
    app: str
    index: int
    generation: int
    pid: int
    user: str


class Hooks:
    """The hooks an app names, imported; an unnamed one is None."""

    def __init__(self, found: dict[str, Callable]) -> None:
        self.post_fork = found.get("post_fork")
        self.post_worker_init = found.get("post_worker_init")
        self.worker_exit = found.get("worker_exit")
        self.pre_request = found.get("pre_request")
        self.post_request = found.get("post_request")

    @classmethod
    def load(cls, app) -> Hooks:
        """Import every hook `app` (its AppConfig, as the worker has it) names. Raises
        what the import raises, or appload.AppLoadError naming the key."""
        found = {}
        for name in NAMES:
            spec = getattr(app, name, None)
            if spec:
                try:
                    found[name] = appload.load_hook(spec)
                except appload.AppLoadError as exc:
                    raise appload.AppLoadError(f"{name}: {exc}") from None
        return cls(found)

    def wrap(self, app, log: logging.Logger, clock: Callable[[], float] = time.monotonic):
        """`app`, with pre_request and post_request around each call (`app` itself when
        neither is named)."""
        pre, post = self.pre_request, self.post_request
        if pre is None and post is None:
            return app

        def hooked(environ, start_response):
            if pre is not None:
                try:
                    pre(environ)
                except Exception:
                    log.exception("pre_request hook failed for %s %s; answering 500",
                                  environ.get("REQUEST_METHOD"), environ.get("RAW_URI"))
                    start_response("500 Internal Server Error",
                                   [("Content-Type", "text/plain"), ("Content-Length", str(len(_ERROR_BODY)))])
                    return [_ERROR_BODY]
            if post is None:
                return app(environ, start_response)
            status = []

            def noting_start_response(line, headers, exc_info=None):
                status[:] = [line]
                return start_response(line, headers, exc_info)

            began = clock()

            def done() -> None:
                try:
                    post(environ, status[0] if status else None, clock() - began)
                except Exception:
                    log.exception("post_request hook failed for %s %s",
                                  environ.get("REQUEST_METHOD"), environ.get("RAW_URI"))
            try:
                result = app(environ, noting_start_response)
            except BaseException:
                done()
                raise
            return _when_closed(result, done)
        return hooked


def _when_closed(result, done: Callable[[], None]):
    """`result`, arranged so that `done()` runs once it is over: now for a list or a
    tuple (nothing more runs of it); else when the server closes it (PEP 3333), a
    `wsgi.file_wrapper` staying one, so it still goes out with sendfile."""
    if type(result) in (list, tuple):
        done()
        return result
    if isinstance(result, FileWrapper):
        close = getattr(result, "close", None)

        def closing() -> None:
            try:
                if close is not None:
                    close()
            finally:
                done()
        result.close = closing
        return result
    return _Closing(result, done)


class _Closing:
    """An app's iterable whose close() also calls `done` (once)."""

    __slots__ = ("result", "done")

    def __init__(self, result, done: Callable[[], None]) -> None:
        self.result = result
        self.done = done

    def __iter__(self):
        return iter(self.result)

    def close(self) -> None:
        done, self.done = self.done, None
        try:
            close = getattr(self.result, "close", None)
            if close is not None:
                close()
        finally:
            if done is not None:
                done()
