"""Real certificates for the TLS tests, made with the `openssl` command (EC P-256: fast).

`Authority(dir, name)` is a CA; `authority.issue(name, hosts)` a certificate it signed,
as (certificate path, key path), the key mode 0600 and owned by root when we are root.
"""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from pathlib import Path

import pytest

_serials = itertools.count(0x1000)


def need_openssl() -> str:
    path = shutil.which("openssl")
    if path is None:
        pytest.skip("the openssl command is not installed")
    return path


def _run(*args: str) -> None:
    subprocess.run([need_openssl(), *args], check=True, capture_output=True)


def new_key(path: Path) -> Path:
    _run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
    path.chmod(0o600)
    return path


class Authority:
    def __init__(self, directory: Path, name: str = "Baton Test CA"):
        self.dir = directory
        self.name = name
        slug = name.replace(" ", "-").lower()
        self.key = new_key(directory / f"{slug}.key")
        self.cert = directory / f"{slug}.crt"
        _run("req", "-x509", "-new", "-key", str(self.key), "-out", str(self.cert), "-days", "2",
             "-subj", f"/O=Baton Tests/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")

    def issue(self, name: str, hosts=(), client: bool = False, stem: str | None = None,
              serial: int | None = None) -> tuple[Path, Path]:
        """A leaf certificate for CN=`name` (SANs: `hosts`), and its key."""
        stem = stem or name
        key = new_key(self.dir / f"{stem}.key")
        csr = self.dir / f"{stem}.csr"
        cert = self.dir / f"{stem}.crt"
        _run("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/O=Baton Tests/CN={name}")
        ext = self.dir / f"{stem}.ext"
        lines = ["basicConstraints=CA:FALSE",
                 f"extendedKeyUsage={'clientAuth' if client else 'serverAuth'}"]
        if hosts:
            lines.append("subjectAltName=" + ",".join(f"DNS:{host}" for host in hosts))
        ext.write_text("\n".join(lines) + "\n")
        _run("x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key), "-out", str(cert),
             "-days", "2", "-set_serial", str(serial if serial is not None else next(_serials)),
             "-extfile", str(ext))
        csr.unlink()
        ext.unlink()
        if os.geteuid() == 0:
            os.chown(key, 0, 0)
        return cert, key


def key_marker(key: Path) -> str:
    """A line of the key's base64: what would be in memory if its PEM text were."""
    lines = [line for line in key.read_text().splitlines() if line and not line.startswith("-----")]
    return max(lines, key=len)
