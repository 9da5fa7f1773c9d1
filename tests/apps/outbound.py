"""Tries an outbound connection on request, so tests can see whether the worker may open one.

`/connect?port=N` connects to 127.0.0.1:N and answers, as JSON, what happened
("connected", or the error), with the worker's pid and its network namespace (the
inode `/proc/self/ns/net` names).
"""
import json
import os
import socket
from urllib.parse import parse_qs


def app(environ, start_response):
    query = parse_qs(environ["QUERY_STRING"])
    outcome = None
    if "port" in query:
        try:
            with socket.create_connection(("127.0.0.1", int(query["port"][0])), timeout=2):
                outcome = "connected"
        except OSError as exc:
            outcome = f"{type(exc).__name__}: {exc}"
    body = json.dumps({
        "pid": os.getpid(),
        "netns": os.readlink("/proc/self/ns/net"),
        "connect": outcome,
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
