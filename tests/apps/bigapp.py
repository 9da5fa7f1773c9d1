"""A synthetic big app: about BIGAPP_MB megabytes (default 200) of Python objects built
at import, as a large framework's import holds them (many small, distinct objects).

`make_app(version)` answers every request with JSON: the serving process's pid and
uid, the id() of the big module-level list (equal in every worker that shares one
import), and `version` (after a pause of MS milliseconds for `?sleep=MS`). With BIGAPP_IMPORTS set, each import appends its pid to that
file, so a test can count the imports and see who made them.
"""
from __future__ import annotations

import json
import os
import time

IMPORT_MB = int(os.environ.get("BIGAPP_MB", "200"))
_ENTRY_BYTES = 152   # a 96-character str (49 bytes of header) plus its slot in the list
DATA = [f"{i:096d}" for i in range(IMPORT_MB * 1024 * 1024 // _ENTRY_BYTES)]

if os.environ.get("BIGAPP_IMPORTS"):
    with open(os.environ["BIGAPP_IMPORTS"], "a") as f:
        f.write(f"{os.getpid()}\n")


def on_preload(worker) -> None:
    """A `preload_hook`: notes where it ran (BIGAPP_IMPORTS gets "hook PID INDEX")."""
    with open(os.environ["BIGAPP_IMPORTS"], "a") as f:
        f.write(f"hook {worker.pid} {worker.index}\n")


def make_app(version: str):
    def app(environ, start_response):
        query = environ.get("QUERY_STRING", "")
        if query.startswith("sleep="):   # ?sleep=MS: hold the worker a while (the memory bench's load)
            time.sleep(int(query[len("sleep="):]) / 1000)
        body = json.dumps({"pid": os.getpid(), "uid": os.getuid(), "id": id(DATA), "version": version,
                           "entries": len(DATA)}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    return app


app = make_app("1")
