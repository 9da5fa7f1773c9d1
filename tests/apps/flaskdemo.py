"""A real Flask app, served by Baton as `baton serve flaskdemo:app` (from tests/apps).

`POST /upload` (multipart, field `file`) answers the upload's sha256 and size as JSON;
`GET /stream` streams `STREAM_CHUNKS` chunks from a generator (chunk i is
`stream_chunk(i)`, so a client can check the body without the app); `GET /file` is
`send_file` of the file named by the `DEMO_FILE` environment variable, Range requests
included (werkzeug's conditional responses); `GET /client` answers what the app was
told about its client (`REMOTE_ADDR`, `wsgi.url_scheme`).
"""
import hashlib
import os

from flask import Flask, Response, jsonify, request, send_file

STREAM_CHUNKS = 1000

app = Flask(__name__)


def stream_chunk(i: int) -> bytes:
    """Chunk i of /stream: 32 to 2048 bytes, so the chunked framing sees many sizes."""
    return hashlib.sha256(i.to_bytes(4, "big")).digest() * (1 + i % 64)


@app.post("/upload")
def upload():
    digest = hashlib.sha256()
    size = 0
    upload = request.files["file"]
    while block := upload.stream.read(65536):
        digest.update(block)
        size += len(block)
    return jsonify(sha256=digest.hexdigest(), size=size, filename=upload.filename)


@app.get("/stream")
def stream():
    def chunks():
        for i in range(STREAM_CHUNKS):
            yield stream_chunk(i)
    return Response(chunks(), mimetype="application/octet-stream")


@app.get("/file")
def file():
    return send_file(os.environ["DEMO_FILE"], mimetype="application/octet-stream", conditional=True)


@app.get("/client")
def client():
    return jsonify(remote_addr=request.environ.get("REMOTE_ADDR"), scheme=request.scheme, pid=os.getpid())
