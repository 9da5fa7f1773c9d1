# Baton regression: pipelined Content-Length, chunked with trailers, HTTP/1.0 keep-alive.
request = [
    {"method": "POST", "uri": uri("/a"), "version": (1, 1),
     "headers": [("HOST", "h"), ("CONTENT-LENGTH", "3")], "body": b"abc"},
    {"method": "POST", "uri": uri("/b"), "version": (1, 1),
     "headers": [("HOST", "h"), ("TRANSFER-ENCODING", "gzip, chunked")], "body": b"xyz",
     "trailers": [("X-T", "1")]},
    {"method": "GET", "uri": uri("/c"), "version": (1, 0),
     "headers": [("CONNECTION", "keep-alive")], "body": b""},
]
