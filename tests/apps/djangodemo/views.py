"""What the demo project answers, the same as tests/apps/flaskdemo.py:

`POST /upload` (multipart, field `file`): the upload's sha256 and size as JSON.
`GET /stream`: a `StreamingHttpResponse` of `STREAM_CHUNKS` chunks from a generator
(chunk i is `stream_chunk(i)`). `GET /file`: a `FileResponse` of the file named by the
`DEMO_FILE` environment variable; a single `Range: bytes=START-END` is answered 206
with that slice (Django's FileResponse does not do ranges itself). `GET /client`:
what Django was told about its client.
"""
import hashlib
import os
import re

from django.http import FileResponse, HttpResponse, JsonResponse, StreamingHttpResponse

STREAM_CHUNKS = 1000
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


def stream_chunk(i: int) -> bytes:
    """Chunk i of /stream: 32 to 2048 bytes, so the chunked framing sees many sizes."""
    return hashlib.sha256(i.to_bytes(4, "big")).digest() * (1 + i % 64)


def upload(request):
    if request.method != "POST":
        return HttpResponse(status=405)
    upload = request.FILES["file"]
    digest = hashlib.sha256()
    for block in upload.chunks():
        digest.update(block)
    return JsonResponse({"sha256": digest.hexdigest(), "size": upload.size, "filename": upload.name})


def stream(request):
    def chunks():
        for i in range(STREAM_CHUNKS):
            yield stream_chunk(i)
    return StreamingHttpResponse(chunks(), content_type="application/octet-stream")


def file(request):
    path = os.environ["DEMO_FILE"]
    size = os.path.getsize(path)
    match = _RANGE.fullmatch(request.headers.get("Range", ""))
    if match is None:
        return FileResponse(open(path, "rb"), content_type="application/octet-stream")
    start = int(match[1])
    end = min(int(match[2]) if match[2] else size - 1, size - 1)
    if start > end:
        response = HttpResponse(status=416)
        response["Content-Range"] = f"bytes */{size}"
        return response
    f = open(path, "rb")
    f.seek(start)
    # FileResponse sends from the file's position; Content-Length stops it at `end`.
    response = FileResponse(f, status=206, content_type="application/octet-stream")
    response["Content-Length"] = str(end - start + 1)
    response["Content-Range"] = f"bytes {start}-{end}/{size}"
    return response


def client(request):
    return JsonResponse({"remote_addr": request.META.get("REMOTE_ADDR"), "scheme": request.scheme,
                         "pid": os.getpid()})
