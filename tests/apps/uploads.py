"""Routes that read their request bodies in the ways apps do (or not at all), for
tests/process/test_request_bodies.py.

/refuse   405 without reading the body
/ignore   200 without reading the body
/all      reads the whole body; says how many bytes and their sha256
/echo     reads ?n= bytes and sends them back at once (a streamed response), then
          reads the rest and ends with how many bytes that was
/digest   reads ?size= bytes by read(n), readline(n) and iteration, sends their
          sha256, then reads what is left (there should be nothing) and ends with its size
"""
import hashlib
from urllib.parse import parse_qs


def _param(environ, name):
    return int(parse_qs(environ["QUERY_STRING"])[name][0])


def app(environ, start_response):
    path = environ["PATH_INFO"]
    body = environ["wsgi.input"]
    if path == "/refuse":
        start_response("405 Method Not Allowed", [("Content-Length", "0"), ("Allow", "GET")])
        return [b""]
    if path == "/ignore":
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]
    if path == "/all":
        data = body.read()
        answer = b"%d %s" % (len(data), hashlib.sha256(data).hexdigest().encode())
        start_response("200 OK", [("Content-Length", str(len(answer)))])
        return [answer]
    if path == "/echo":
        return _echo(body, _param(environ, "n"), start_response)
    if path == "/digest":
        return _digest(body, _param(environ, "size"), start_response)
    start_response("404 Not Found", [("Content-Length", "0")])
    return [b""]


def _echo(body, n, start_response):
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    yield body.read(n)
    rest = 0
    while piece := body.read(65536):
        rest += len(piece)
    yield b"|%d" % rest


def _digest(body, size, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    digest = hashlib.sha256()
    left = size
    turn = 0
    while left > 0:
        if turn == 0:
            piece = body.read(min(left, 1000))
        elif turn == 1:
            piece = body.readline(min(left, 70000))
        else:
            # Iteration yields whole lines: only safe while a newline comes before the
            # body's end, so the last bytes are taken by read(n).
            piece = next(body, b"") if left > 70000 else body.read(left)
        if not piece:
            break
        digest.update(piece)
        left -= len(piece)
        turn = (turn + 1) % 3
    yield digest.hexdigest().encode() + b"\n"
    yield b"end %d" % len(body.read())
