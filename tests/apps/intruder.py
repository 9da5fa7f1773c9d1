"""An app whose code attacks the balancer from inside its worker, as untrusted app code can.

* `/?forge=APP` makes a connection of its own (a socket pair over TCP: it keeps the
  client end), writes a request for Host `b.test` into it, and hands the server end
  back to the balancer claiming a client address of its choosing (FORGED) and, unless
  APP is "own", naming app APP. It answers with whatever came back on its client end:
  another app's answer, if the balancer believed it.
* `/?exhaust` opens files until its process has no fd left (EMFILE), and keeps them.
* Any other request: `pid=PID remote=REMOTE_ADDR`; and if INTRUDER_SEEN names a file,
  REMOTE_ADDR is appended to it (so a test sees every client address the app saw).
"""
from __future__ import annotations

import array
import gc
import json
import os
import socket
from urllib.parse import parse_qs

FORGED = ("203.0.113.9", 4444)
_held: list[int] = []


def _balancer_channel() -> socket.socket:
    from supervisor.worker.process import WorkerSpec
    spec = next(obj for obj in gc.get_objects() if type(obj) is WorkerSpec)
    return spec.balancers[0]


def _forge(app_name: str) -> bytes:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        client = socket.create_connection(server.getsockname(), timeout=3)
        with client:
            accepted, _ = server.accept()
            with accepted:
                client.sendall(b"GET /?victim HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n")
                fields = {"peer": list(FORGED), "listener": "web", "data": ""}
                if app_name != "own":
                    fields["app"] = app_name
                data = b"\x01handback\x00" + json.dumps(fields).encode()
                channel = _balancer_channel()
                channel.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                          array.array("i", [accepted.fileno()]).tobytes())])
            answer = b""
            try:
                while chunk := client.recv(65536):
                    answer += chunk
            except OSError:   # nobody answered within the timeout
                pass
    return answer or b"nothing came back"


def _exhaust() -> None:
    try:
        while True:
            _held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass


def app(environ, start_response):
    query = parse_qs(environ["QUERY_STRING"], keep_blank_values=True)
    if "forge" in query:
        body = _forge(query["forge"][0])
    else:
        if "exhaust" in query:
            _exhaust()
        remote = environ.get("REMOTE_ADDR", "")
        seen = os.environ.get("INTRUDER_SEEN")
        if seen and "exhaust" not in query:
            with open(seen, "a") as f:
                f.write(remote + "\n")
        body = f"pid={os.getpid()} remote={remote}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
