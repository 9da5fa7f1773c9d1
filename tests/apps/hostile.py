"""An app that abuses its worker's channels, as untrusted app code can: on a request it
writes messages of its own on every SOCK_SEQPACKET socket the process holds (the
channel to the master and, in `balance` mode, the one to the balancer).

`/` sends well-framed messages with ill-typed fields; `/?send=fd` sends a well-formed
HANDBACK whose fd is a pipe, not a connection; `/?quiet` sends nothing. The answer is
how many it sent."""
import array
import os
import socket

# Each crashed a receiver that trusted its fields.
CRAFTED = (
    b'\x00heartbeat\x00{"requests":"x"}',                          # the master
    b'\x00report\x00{"busy":"x","acked":[],"closed":[]}',          # the balancer
)
HANDBACK = b'\x01handback\x00{"peer":["192.0.2.1",1],"listener":"web","data":""}'


def _channels() -> list[int]:
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:  # not a socket, or already gone (the listdir fd itself)
            continue
        with sock:
            if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_SEQPACKET:
                fds.append(int(name))
    return fds


def _send_pipe(sock: socket.socket) -> None:
    r, w = os.pipe()
    try:
        sock.sendmsg([HANDBACK], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]).tobytes())])
    finally:
        os.close(r)
        os.close(w)


def app(environ, start_response):
    sent = 0
    for fd in _channels() if environ["QUERY_STRING"] != "quiet" else ():
        with socket.socket(fileno=os.dup(fd)) as sock:
            if environ["QUERY_STRING"] == "send=fd":
                _send_pipe(sock)
                sent += 1
                continue
            for data in CRAFTED:
                sock.send(data)
                sent += 1
    body = f"{sent}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
