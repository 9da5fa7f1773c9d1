"""The app of tests.apps.lifecycle's hooks: notes its calls in the same file, answers
its pid; `/stream` answers from a generator (post_request waits for its close)."""
import os

from tests.apps.lifecycle import _note


def app(environ, start_response):
    _note("app", environ["PATH_INFO"])
    body = str(os.getpid()).encode()
    if environ["PATH_INFO"] == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (chunk for chunk in (body[:1], body[1:]))
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
