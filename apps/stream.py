"""A generator with no Content-Length: Baton sends it chunked."""


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return (f"line {n}\n".encode() for n in range(1, 11))
