"""Large responses, for tests of clients that read slowly or not at all.

`/big?mb=N`: N MiB from a generator, 64 KiB a chunk; `/whole?mb=N`: N MiB as a list
of one bytes object (the single-chunk path); `/file?mb=N`: N MiB through
`wsgi.file_wrapper`. `/big` and `/file` write a line to the file named by `closed=PATH`
when their response is closed (PEP 3333 `close()`), so a test sees from outside that
a response was abandoned. Anything else
answers a short JSON body with the worker's pid."""
import json
import os
import tempfile
from urllib.parse import parse_qs

CHUNK = 64 * 1024


class _Body:
    """An iterable that notes its close()."""

    def __init__(self, chunks, closed_path):
        self._chunks = chunks
        self._closed_path = closed_path

    def __iter__(self):
        return iter(self._chunks)

    def close(self):
        if self._closed_path:
            with open(self._closed_path, "a") as f:
                f.write("closed\n")


def _chunks(size):
    block = b"x" * CHUNK
    for _ in range(size // CHUNK):
        yield block


def _file(size):
    f = tempfile.TemporaryFile()
    f.truncate(size)
    f.seek(0)
    return f


def app(environ, start_response):
    query = parse_qs(environ["QUERY_STRING"])
    size = int(query.get("mb", ["64"])[0]) << 20
    closed = query.get("closed", [""])[0]
    path = environ["PATH_INFO"]
    if path in ("/big", "/whole", "/file"):
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(size))])
        if path == "/big":
            return _Body(_chunks(size), closed)
        if path == "/whole":
            return [b"x" * size]   # a plain list of one: the server's one-send path
        wrapper = environ["wsgi.file_wrapper"](_file(size))
        inner_close = wrapper.close

        def close():
            inner_close()
            _Body((), closed).close()
        wrapper.close = close
        return wrapper
    body = json.dumps({"pid": os.getpid(), "path": path}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
