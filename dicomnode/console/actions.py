"""The console's state-changing actions, shared by the pages and the API; each is audited."""

from __future__ import annotations

import time
from typing import Any

from dicomnode.console import audit
from dicomnode.console.state import ConsoleContext
from dicomnode.errors import DeliveryError, StorageError
from storage.deliveries import resend, resend_failed
from storage.jobs import retry_job


class ActionError(Exception):
    """An action that cannot be done (unknown id, wrong state); ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


def _audit(
    ctx: ConsoleContext, who: tuple[str, str | None], action: str, target: str, outcome: str, **detail: Any
) -> None:
    audit.record(
        ctx.sessions,
        actor=who[0],
        remote_addr=who[1],
        action=action,
        target=target,
        outcome=outcome,
        detail=detail or None,
    )


def resend_delivery(ctx: ConsoleContext, who: tuple[str, str | None], delivery_id: int) -> dict[str, Any]:
    """Queue one failed or sent delivery again."""
    try:
        with ctx.sessions.begin() as session:
            delivery = resend(session, delivery_id)
            result = {"id": delivery.id, "state": delivery.state, "peer": delivery.peer_name}
    except StorageError as e:
        _audit(ctx, who, "delivery.resend", f"delivery {delivery_id}", "refused", error=str(e))
        raise ActionError(str(e), 404 if "does not exist" in str(e) else 409) from e
    _audit(ctx, who, "delivery.resend", f"delivery {delivery_id}", "ok", peer=result["peer"])
    return result


def resend_all_failed(ctx: ConsoleContext, who: tuple[str, str | None]) -> dict[str, Any]:
    """Queue every failed delivery again."""
    with ctx.sessions.begin() as session:
        ids = resend_failed(session)  # recalled instances are left alone
    _audit(ctx, who, "delivery.resend_failed", "all failed deliveries", "ok", ids=ids)
    return {"resent": ids}


def retry(ctx: ConsoleContext, who: tuple[str, str | None], job_id: int) -> dict[str, Any]:
    """Queue a failed job again."""
    try:
        with ctx.sessions.begin() as session:
            job = retry_job(session, job_id)
            result = {"id": job.id, "state": job.state}
    except StorageError as e:
        _audit(ctx, who, "job.retry", f"job {job_id}", "refused", error=str(e))
        raise ActionError(str(e), 404 if "does not exist" in str(e) else 409) from e
    _audit(ctx, who, "job.retry", f"job {job_id}", "ok")
    return result


def echo_peer(ctx: ConsoleContext, who: tuple[str, str | None], name: str) -> dict[str, Any]:
    """C-ECHO a configured peer (PS3.7 9.1.5); the result and the round-trip time in ms."""
    from dicomnode.scu import echo

    try:
        peer = ctx.settings.peer(name)
    except KeyError as e:
        raise ActionError(str(e), 404) from e
    t0 = time.perf_counter()
    try:
        status = echo(peer, ctx.settings.node.ae_title, timeout_s=10, security=ctx.settings.security)
        result = {"peer": name, "ok": status == 0, "status": f"0x{status:04X}", "error": None}
    except DeliveryError as e:
        result = {"peer": name, "ok": False, "status": None, "error": str(e)}
    result["rtt_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    _audit(ctx, who, "peer.echo", f"peer {name}", "ok" if result["ok"] else "failed", rtt_ms=result["rtt_ms"])
    return result
