"""The TLS server context from --certfile, --keyfile, --ca-certs, --cert-reqs and --ciphers.

The master builds one at start-up only to refuse bad files with one line (exit 2); each worker builds its own
when it boots, so a rolling reload (SIGHUP) serves certificates rotated on disk since the last one. Shared by
both, so it imports nothing of either's world.
"""

from __future__ import annotations

import re
import ssl

# --cert-reqs, numbered as in gunicorn (and as ssl.CERT_NONE/OPTIONAL/REQUIRED).
CERT_REQS = {0: ssl.CERT_NONE, 1: ssl.CERT_OPTIONAL, 2: ssl.CERT_REQUIRED}
ALPN = ["http/1.1"]  # no HTTP/2: a client offering h2 and http/1.1 is told http/1.1


class TLSError(ValueError):
    """Certificate, key or CA files that cannot make a TLS context; the text names the option and file."""


class _Encrypted(Exception):
    """The private key asks for a passphrase, which a server started unattended cannot type."""


def _ask_passphrase():
    raise _Encrypted  # without a callback OpenSSL would prompt on the terminal and hang start-up


def _readable(option: str, path: str) -> None:
    """Raise TLSError naming option if path cannot be opened for reading."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise TLSError(f"cannot read {option} {path}: {exc.strerror or exc}") from None


def _reason(exc: ssl.SSLError) -> str:
    """The OpenSSL reason in one short phrase ("key values mismatch", "PEM lib")."""
    if exc.reason:
        return exc.reason.replace("_", " ").lower()
    text = str(exc.args[1] if len(exc.args) > 1 else exc)
    return re.sub(r"^\[\w+\]\s*|\s*\(_ssl\.c:\d+\)$", "", text)


def server_context(certfile: str, keyfile: str = "", ca_certs: str = "", cert_reqs: int = 0,
                   ciphers: str = "") -> ssl.SSLContext:
    """A server-side context: TLS 1.2 and up, ALPN http/1.1; TLSError says which option is wrong."""
    if cert_reqs not in CERT_REQS:
        raise TLSError(f"--cert-reqs must be 0 (none), 1 (optional) or 2 (required), got {cert_reqs}")
    _readable("--certfile", certfile)
    if keyfile:
        _readable("--keyfile", keyfile)
    if ca_certs:
        _readable("--ca-certs", ca_certs)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile, keyfile or None, password=_ask_passphrase)
    except _Encrypted:
        raise TLSError(f"the private key in {keyfile or certfile} is encrypted: give an unencrypted key") from None
    except ssl.SSLError as exc:
        files = f"--certfile {certfile}" + (f" with --keyfile {keyfile}" if keyfile else "")
        raise TLSError(f"cannot load {files}: not a PEM certificate and its private key ({_reason(exc)})") from None
    if ca_certs:
        try:
            ctx.load_verify_locations(cafile=ca_certs)
        except ssl.SSLError as exc:
            raise TLSError(f"cannot load --ca-certs {ca_certs}: {_reason(exc)}") from None
    ctx.verify_mode = CERT_REQS[cert_reqs]
    if ciphers:
        try:
            ctx.set_ciphers(ciphers)
        except ssl.SSLError:
            raise TLSError(f"--ciphers {ciphers!r} selects no cipher OpenSSL knows") from None
    ctx.set_alpn_protocols(ALPN)
    return ctx


def context_from_settings(settings: dict) -> ssl.SSLContext | None:
    """The worker's context, or None when --certfile is not set (plain HTTP)."""
    if not settings.get("certfile"):
        return None
    return server_context(settings["certfile"], settings.get("keyfile", ""), settings.get("ca_certs", ""),
                          settings.get("cert_reqs", 0), settings.get("ciphers", ""))
