"""Logging setup shared by the master and (through inherited fds) its workers.

Workers keep the master's log file descriptors across the privilege drop, so an app
running as `nobody` still writes to a log only root may open.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

ERROR_LOGGER = "baton.error"
ACCESS_LOGGER = "baton.access"


class _Formatter(logging.Formatter):
    converter = time.gmtime

    def __init__(self):
        super().__init__("[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S +0000")


@dataclass
class Logs:
    error: logging.Logger
    access: logging.Logger | None
    fds: tuple[int, ...]


def setup(level: str = "info", error_log: str | None = None, access_log: str | None = None) -> Logs:
    error = logging.getLogger(ERROR_LOGGER)
    error.handlers.clear()
    error.propagate = False
    error.setLevel(level.upper())
    error_handler = _stream_handler(error_log, sys.stderr)
    error_handler.setFormatter(_Formatter())
    error.addHandler(error_handler)
    fds = [error_handler.stream.fileno()]

    access = None
    if access_log:
        access = logging.getLogger(ACCESS_LOGGER)
        access.handlers.clear()
        access.propagate = False
        access.setLevel(logging.INFO)
        access_handler = _stream_handler(access_log, sys.stdout)
        access_handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(access_handler)
        fds.append(access_handler.stream.fileno())
    return Logs(error, access, tuple(fds))


def _stream_handler(target: str | None, default_stream) -> logging.StreamHandler:
    if target in (None, "-"):
        return logging.StreamHandler(default_stream)
    return logging.FileHandler(target, encoding="utf-8")
