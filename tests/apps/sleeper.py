"""Answers with its worker's pid; `/?sleep=S&mark=PATH` first writes that pid to PATH,
so a test knows which worker a slow request holds while it runs."""
import os
import time
from urllib.parse import parse_qs


def app(environ, start_response):
    query = parse_qs(environ["QUERY_STRING"])
    if "mark" in query:
        path = query["mark"][0]
        with open(path + ".tmp", "w") as out:
            out.write(str(os.getpid()))
        os.replace(path + ".tmp", path)   # whole or absent: a test may read it at once
    if "sleep" in query:
        time.sleep(float(query["sleep"][0]))
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
