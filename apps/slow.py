"""Sleep for ?seconds=N (default 1, at most 60) before answering: shows graceful stops."""

import time
from urllib.parse import parse_qs


def app(environ, start_response):
    query = parse_qs(environ["QUERY_STRING"])
    try:
        seconds = min(60.0, max(0.0, float(query.get("seconds", ["1"])[0])))
    except ValueError:
        start_response("400 Bad Request", [("Content-Type", "text/plain")])
        return [b"seconds must be a number\n"]
    time.sleep(seconds)
    body = f"slept {seconds:g}s\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
