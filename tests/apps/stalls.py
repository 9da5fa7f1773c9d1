"""Requests that hang, for the hung-request timeout: `/?sleep=S` sleeps before its
response head, `/stream?sleep=S` sends its head and a first chunk, then sleeps; anything
else answers at once. Every answer names the worker's pid."""
import os
import time
from urllib.parse import parse_qs


def app(environ, start_response):
    query = parse_qs(environ["QUERY_STRING"])
    sleep_s = float(query.get("sleep", ["0"])[0])
    pid = str(os.getpid()).encode()
    if environ["PATH_INFO"] == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _stream(pid, sleep_s)
    time.sleep(sleep_s)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(pid)))])
    return [pid]


def _stream(pid, sleep_s):
    yield pid + b"\n"
    time.sleep(sleep_s)
    yield b"late\n"
