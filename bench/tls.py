"""The certificate the https systems share: self-signed, made with the openssl command at the start of a run."""

from __future__ import annotations

import subprocess
from pathlib import Path


def self_signed(workdir: Path) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1: ECDSA P-256, as a CA would issue today; the same for every system."""
    cert, key = workdir / "bench-cert.pem", workdir / "bench-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=30)
    return cert, key
