"""Serve this file's own source through wsgi.file_wrapper (sendfile under Baton)."""

import os


def app(environ, start_response):
    path = os.path.abspath(__file__)
    size = os.path.getsize(path)
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"),
                              ("Content-Length", str(size))])
    f = open(path, "rb")
    wrapper = environ.get("wsgi.file_wrapper")
    if wrapper is None:
        return iter(lambda: f.read(65536), b"")
    return wrapper(f, 65536)
