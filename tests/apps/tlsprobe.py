"""Says what the worker knows of its TLS connection, and what it can reach of a key.

`/` answers JSON with the app's name (APP_NAME in its env), its pid and the TLS
variables of its environ. `/reach?path=P&rmarker=M` also says whether the worker can
open P (another app's key file), whether any str or bytes in its memory holds M reversed
(a line of that key's base64), and where its fds point."""
import gc
import json
import os
from urllib.parse import parse_qs

TLS_KEYS = ("HTTPS", "wsgi.url_scheme", "SSL_PROTOCOL", "SSL_CIPHER", "SSL_TLS_SNI", "SSL_CLIENT_VERIFY",
            "SSL_CLIENT_S_DN", "SSL_CLIENT_I_DN", "SSL_CLIENT_SERIAL", "SSL_CLIENT_CERT")


def _holds(reversed_marker: str) -> bool:
    """Is the marker in any str or bytes of this process? It came reversed (so the
    request itself does not hold it); the two copies made here are not counted."""
    wanted = reversed_marker[::-1]
    wanted_b = wanted.encode()

    def has(item) -> bool:
        kind = type(item)
        if item is wanted or item is wanted_b:
            return False
        return (kind is str and wanted in item) or (kind in (bytes, bytearray) and wanted_b in item)
    for obj in gc.get_objects():
        if has(obj):
            return True
        for ref in gc.get_referents(obj):
            if has(ref):
                return True
    return False


def _reach(query) -> dict:
    path, marker = query["path"][0], query["rmarker"][0]
    try:
        with open(path, "rb"):
            opened = True
    except OSError as exc:
        opened = exc.strerror
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return {"opened": opened, "holds": _holds(marker), "fds": fds}


def app(environ, start_response):
    query = parse_qs(environ["QUERY_STRING"])
    body = {"app": os.environ.get("APP_NAME"), "pid": os.getpid(), "remote": environ.get("REMOTE_ADDR"),
            "tls": {key: environ[key] for key in TLS_KEYS if key in environ}}
    if environ["PATH_INFO"] == "/reach":
        body.update(_reach(query))
    if environ["PATH_INFO"] == "/big":
        size = int(query["size"][0])
        data = b"x" * size
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(size))])
        return [data]
    data = json.dumps(body).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]
