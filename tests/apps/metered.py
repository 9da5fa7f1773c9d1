"""Answers with the status its path asks for, after the sleep its query asks for:
`/status/404`, `/status/200?sleep=0.3&mark=PATH` (PATH is created when the request
runs), so /metrics tests know every response's class and which one was slow."""
import time
from urllib.parse import parse_qs


def app(environ, start_response):
    query = parse_qs(environ["QUERY_STRING"])
    if "mark" in query:
        open(query["mark"][0], "w").close()
    if "sleep" in query:
        time.sleep(float(query["sleep"][0]))
    parts = environ["PATH_INFO"].split("/")
    status = parts[2] if len(parts) > 2 and parts[1] == "status" and parts[2].isdigit() else "200"
    body = f"{status}\n".encode()
    start_response(f"{status} Whatever", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
