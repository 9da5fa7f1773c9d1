"""Tries to tamper with the logs the way hostile app code can, and says what it managed.

`/attack`: every fd it holds that is a regular file it truncates (`truncated`); every
pipe it writes a forged log line to (`wrote`: a line that claims to be the master's);
every fd of its parent it can open for writing through /proc (`parent`). Anything else
answers a short JSON body with the worker's pid.

(Reconstructed by helper H1 after it overwrote this file by mistake: the original's
author should check it against tests/process/test_isolation.py.)"""
import json
import os
import stat

FORGED = b"2026-01-01 00:00:00 ERROR [master] FORGED: the master says all is well\n"


def _attack() -> dict:
    truncated, wrote, parent = [], [], []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            mode = os.fstat(fd).st_mode
        except OSError:   # the listing's own fd, gone already
            continue
        if stat.S_ISREG(mode):
            try:
                os.ftruncate(fd, 0)
                truncated.append(fd)
            except OSError:
                pass
        elif stat.S_ISFIFO(mode):
            try:
                os.write(fd, FORGED)
                wrote.append(fd)
            except OSError:   # a read end
                pass
    try:
        names = os.listdir(f"/proc/{os.getppid()}/fd")
    except OSError:
        names = []
    for name in names:
        try:
            fd = os.open(f"/proc/{os.getppid()}/fd/{name}", os.O_WRONLY | os.O_APPEND)
        except OSError:
            continue
        os.close(fd)
        parent.append(int(name))
    return {"truncated": truncated, "wrote": wrote, "parent": parent}


def app(environ, start_response):
    result = _attack() if environ["PATH_INFO"] == "/attack" else {"pid": os.getpid()}
    body = json.dumps(result).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
