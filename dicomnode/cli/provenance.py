"""``dicomnode provenance UID``: the whole chain around an input's or an output's SOP Instance UID.

Who sent what (association, AEs, host, time, checksum) -> which rule made which job -> each output
with its model identity, seed, steps, guidance, sampler, angles and timings -> where each output
went and when the peer acknowledged it (DIMSE status) -> whether a recall withdrew it, and the
rejection note sent in its place. The UID of a rejection note shows that recall.
"""

from __future__ import annotations

import argparse

from dicomnode.cli.common import open_sessions, settings_from, when
from dicomnode.cli.config import add_config_argument
from dicomnode.cli.exitcodes import ExitCode


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("provenance", help="print the provenance chain of an input or output SOP Instance UID")
    add_config_argument(p)
    p.add_argument("uid", help="SOP Instance UID of a received or a derived instance")
    p.set_defaults(func=run)


def format_chain(chain: object) -> list[str]:
    from storage.provenance import ProvenanceChain

    assert isinstance(chain, ProvenanceChain)
    i, a = chain.input, chain.association
    lines = [f"{chain.queried_uid} is {'a received input' if chain.role == 'input' else 'a SYNTHETIC output'}"]
    lines.append(f"input    {i.sop_instance_uid}")
    body_part = i.body_part_examined or "-"
    lines.append(f"         class {i.sop_class_uid}  modality {i.modality or '-'}  body part {body_part}")
    lines.append(f"         study {i.study_instance_uid}")
    lines.append(f"         stored {i.path}  sha256 {i.sha256[:16]}...  {i.size_bytes} bytes  {when(i.received_at)}")
    if a is not None:
        lines.append(
            f"received association {a.id}: {a.calling_ae} -> {a.called_ae} from {a.peer_host}:{a.peer_port} "
            f"at {when(a.started_at)}"
        )
    else:
        lines.append(f"received from {i.calling_ae or '?'} at {i.peer_host or '?'}")
    if not chain.jobs:
        lines.append("jobs     none (no rule matched, or loop prevention skipped it)")
    for j in chain.jobs:
        lines.append(
            f"job {j.id}   rule {j.rule_name!r}  state {j.state}  attempts {j.attempts}/{j.max_attempts}  "
            f"created {when(j.created_at)}  finished {when(j.finished_at)}"
        )
        if j.consistency_score is not None:
            lines.append(f"         consistency {j.consistency_method or '?'} {j.consistency_score:.2f}")
        if j.state == "refused":
            lines.append(f"         REFUSED, nothing written or sent: {(j.last_error or '').splitlines()[0][:200]}")
        elif j.last_error:
            lines.append(f"         last error: {j.last_error.splitlines()[0][:100]}")
        for o in j.outputs:
            mark = "  <-- queried" if o.instance.sop_instance_uid == chain.queried_uid else ""
            if o.instance.sop_class_uid == "1.2.840.10008.5.1.4.1.1.7.3":  # Multi-frame Grayscale Word SC
                mark += "  (rotation sweep: all views as frames; angles below are its first frame's)"
            lines.append(f"  output {o.instance.sop_instance_uid}{mark}")
            lines.append(
                f"         az {o.azimuth:+g} el {o.elevation:+g}  series {o.series_instance_uid}  "
                f"created {when(o.created_at)}"
            )
            lines.append(
                f"         model {o.model_name} (identity {o.model_identity[:16]}...)  seed {o.seed}  steps {o.steps}  "
                f"guidance {o.guidance_scale:g}  {o.sampler or ''}  {o.device or ''} {o.dtype or ''}"
            )
            if o.recall_id is not None:
                lines.append(f"         RECALLED at {when(o.recalled_at)} by recall {o.recall_id}: never sent again")
            if o.synthesis_s is not None:
                lines.append(f"         synthesis {o.synthesis_s:.2f} s/view, job total {o.total_s or 0:.2f} s")
            if not o.deliveries:
                lines.append("         not delivered (rule has no destinations)")
            for d in o.deliveries:
                status = f"0x{d.status_code:04X}" if d.status_code is not None else "-"
                lines.append(
                    f"         -> {d.peer_name} ({d.peer_ae}@{d.peer_host}:{d.peer_port}) {d.state} status {status} "
                    f"at {when(d.sent_at)} after {d.attempts} attempt(s)"
                    + (f"  error: {d.last_error.splitlines()[0][:60]}" if d.last_error and d.state != "sent" else "")
                )
    for r in chain.recalls:
        lines.extend(format_recall(r))
    return lines


def format_recall(recall: object) -> list[str]:
    from storage.provenance import RecallRecord

    assert isinstance(recall, RecallRecord)
    lines = [
        f"recall {recall.id}  reason {recall.reason}  by {recall.requested_by}  at {when(recall.requested_at)}  "
        f"selected by {recall.selector}",
        f"         rejection note {recall.note.sop_instance_uid} (KOS, series {recall.note.series_instance_uid})",
        f"         withdrew {recall.n_outputs} output(s): {', '.join(recall.recalled_uids)}",
    ]
    if not recall.note_deliveries:
        lines.append("         note not sent (no peer had acknowledged these outputs)")
    for d in recall.note_deliveries:
        status = f"0x{d.status_code:04X}" if d.status_code is not None else "-"
        lines.append(f"         note -> {d.peer_name} ({d.peer_ae}) {d.state} status {status} at {when(d.sent_at)}")
    return lines


def run(args: argparse.Namespace) -> int:
    from storage.provenance import provenance_chain, recall_of_note

    sessions = open_sessions(settings_from(args))
    with sessions() as session:
        note = recall_of_note(session, args.uid.strip())
        chain = provenance_chain(session, args.uid.strip()) if note is None else None
    if note is not None:
        print(f"{args.uid.strip()} is a rejection note (IHE IOCM)")
        print("\n".join(format_recall(note)))
        return ExitCode.OK
    if chain is None:
        print(f"no instance with SOP Instance UID {args.uid} is recorded")
        return ExitCode.NOT_FOUND
    print("\n".join(format_chain(chain)))
    return ExitCode.OK
