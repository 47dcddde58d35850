"""TLS for the Storage SCP (PS3.15 B.1, TLS Secure Transport Connection Profile)."""

from __future__ import annotations

import ssl
from typing import Any

from dicomnode.config import SecuritySettings
from dicomnode.errors import ConfigError


class _HandshakeInAssociationThread(ssl.SSLContext):
    """Server sockets that do the TLS handshake on their first read, not in ``wrap_socket``.

    pynetdicom wraps each accepted socket in its single accept thread, so with the default eager
    handshake one peer that connects and stays silent would stall every other association.
    """

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:  # type: ignore[override]
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def server_tls_context(security: SecuritySettings) -> ssl.SSLContext | None:
    """The SCP's TLS context (PS3.15 B.1, TLS 1.2 or later), or None when TLS is not configured.

    With ``tls_ca_certificates`` set, calling nodes must present a certificate signed by that CA.
    """
    if security.tls_certificate is None or security.tls_private_key is None:
        return None
    context = _HandshakeInAssociationThread(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(security.tls_certificate, security.tls_private_key)
        if security.tls_ca_certificates is not None:
            context.load_verify_locations(cafile=security.tls_ca_certificates)
            context.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(
            f"security.tls_certificate: cannot load {security.tls_certificate} / "
            f"{security.tls_private_key} / {security.tls_ca_certificates}: {e}"
        ) from e
    return context
