"""Reads the whole request body in pieces and says what it got, so tests can check
what reached the app (and that the worker holds none of it)."""
import json
import os
import zlib


def app(environ, start_response):
    read = environ["wsgi.input"].read
    size = crc = 0
    while True:
        piece = read(65536)
        if not piece:
            break
        size += len(piece)
        crc = zlib.crc32(piece, crc)
    body = json.dumps({
        "bytes": size,
        "crc": crc,
        "upgrade": environ.get("HTTP_UPGRADE"),
        "remote": environ["REMOTE_ADDR"],
        "pid": os.getpid(),
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
