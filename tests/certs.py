"""Throwaway certificates for TLS tests, made with the openssl command line at test time.

Two CAs: the one the server and its clients trust, and a stranger's, to show that a
certificate from anyone else is refused.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Pki:
    """Paths of every PEM file made by `make_pki`."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    wrong_ca: Path
    wrong_client_cert: Path
    wrong_client_key: Path


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)


def _ca(folder: Path, name: str) -> None:
    _openssl(folder, "req", "-x509", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "2", "-subj", f"/CN=salvo-test-{name}")  # fmt: skip


def _leaf(folder: Path, name: str, ca: str, extension: str) -> None:
    _openssl(folder, "req", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}")  # fmt: skip
    (folder / f"{name}.ext").write_text(extension + "\n")
    _openssl(folder, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem",
             "-CAkey", f"{ca}.key", "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
             "-extfile", f"{name}.ext")  # fmt: skip


def make_pki(folder: Path) -> Pki:
    """A CA with a server certificate (localhost, 127.0.0.1) and a client certificate, and
    a second CA with a client certificate of its own."""
    _ca(folder, "ca")
    _ca(folder, "wrong-ca")
    _leaf(folder, "server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1")
    _leaf(folder, "client", "ca", "extendedKeyUsage=clientAuth")
    _leaf(folder, "stranger", "wrong-ca", "extendedKeyUsage=clientAuth")
    return Pki(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
        wrong_ca=folder / "wrong-ca.pem",
        wrong_client_cert=folder / "stranger.pem",
        wrong_client_key=folder / "stranger.key",
    )
