"""Recording and finding stored instances, and the primitive of the duplicate policy.

Functions here take the caller's ``Session`` and flush, but never commit: the caller decides the
unit of work (for a C-STORE: file written, row recorded, commit, then the success status).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from pydicom.dataset import Dataset
from sqlalchemy import String, insert, select, update
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler

from dicomnode.errors import DicomInputError, StorageError
from storage.models import Instance

logger = logging.getLogger(__name__)

Resend = Literal["identical", "conflict"]


# DICOM keyword -> Instance column, for the values copied as they are.
_COPIED: dict[str, str] = {
    "SOPInstanceUID": "sop_instance_uid",
    "SOPClassUID": "sop_class_uid",
    "StudyInstanceUID": "study_instance_uid",
    "SeriesInstanceUID": "series_instance_uid",
    "Modality": "modality",
    "BodyPartExamined": "body_part_examined",
    "ViewPosition": "view_position",
}
_REQUIRED = ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID")
_LENGTHS: dict[str, int | None] = {
    column.name: column.type.length if isinstance(column.type, String) else None for column in Instance.__table__.c
}


def fields_from_dataset(ds: Dataset) -> dict[str, Any]:
    """The ``Instance`` columns a dataset decides, read from its DICOM attributes.

    Synthetic Data (0008,001C) YES marks the instance synthetic; the caller sets ``synthetic``
    for instances it derived itself. Transfer Syntax UID comes from the File Meta Information.
    A value longer than its VR allows (PS3.5 6.2), which the column could not hold on every
    backend, is a ``DicomInputError`` here rather than a database error later.
    """
    file_meta = getattr(ds, "file_meta", None)
    transfer_syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    return fields_from_values(ds, transfer_syntax)


def fields_from_values(values: Dataset | Mapping[str, Any], transfer_syntax: str | None) -> dict[str, Any]:
    """:func:`fields_from_dataset` from the attribute values by keyword and the transfer syntax."""
    uid = values.get("SOPInstanceUID") or "?"
    missing = [kw for kw in _REQUIRED if not values.get(kw)]
    if missing:
        raise DicomInputError(f"dataset {uid} lacks {', '.join(missing)}")
    if not transfer_syntax:
        raise DicomInputError(f"dataset {uid} has no Transfer Syntax UID in its file meta")
    fields: dict[str, Any] = {column: str(values.get(kw) or "") or None for kw, column in _COPIED.items()}
    fields["transfer_syntax_uid"] = str(transfer_syntax)
    for keyword, column in (*_COPIED.items(), ("TransferSyntaxUID", "transfer_syntax_uid")):
        length = _LENGTHS[column]
        if fields[column] is not None and length is not None and len(fields[column]) > length:
            raise DicomInputError(
                f"dataset {uid}: {keyword} {fields[column]!r} is longer than {length} characters"
            )
    image_type = values.get("ImageType")
    if image_type is not None and not isinstance(image_type, str):
        image_type = "\\".join(str(v) for v in image_type)
    fields["image_type"] = image_type or None
    fields["synthetic"] = str(values.get("SyntheticData", "")).upper() == "YES"
    return fields


def record_instance(session: Session, **fields: Any) -> Instance:
    """Add an ``Instance`` row built from ``fields`` (column names) and flush it.

    Raises ``StorageError`` when the row breaks a constraint (a SOP Instance UID or path already
    recorded, a missing required column) or the database fails; the session must then be rolled
    back.
    """
    instance = Instance(**fields)
    session.add(instance)
    try:
        session.flush()
    except SQLAlchemyError as e:
        uid = fields.get("sop_instance_uid")
        raise StorageError(f"cannot record instance {uid!r}: {getattr(e, 'orig', e)}") from e
    logger.debug("recorded instance %d (%s) at %s", instance.id, instance.origin, instance.path)
    return instance


@dataclass(frozen=True)
class ReceivedRow:
    """The row :func:`insert_received` wrote: its id and the values intake and its callers read."""

    id: int
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str


class _DriverInsert:
    """``INSERT INTO instances ... RETURNING id``, compiled once per dialect, run on the session's DBAPI
    cursor with SQLAlchemy's own bind processors and column defaults: the SCP's hot path, ~0.1 ms of
    CPU less per instance than a Core ``execute`` and an ORM object (issue #10)."""

    def __init__(self, dialect: Dialect) -> None:
        self.columns = [c for c in Instance.__table__.c if c.key != "id"]
        keys = [c.key for c in self.columns]
        compiled = cast(SQLCompiler, insert(Instance).returning(Instance.id).compile(dialect=dialect, column_keys=keys))
        self.sql = str(compiled)
        self.order = list(compiled.positiontup or []) if dialect.positional else None
        self.processors = {c.key: c.type.bind_processor(dialect) for c in self.columns}
        self.defaults = {c.key: c.default for c in self.columns if c.default is not None}

    def parameters(self, fields: dict[str, Any]) -> dict[str, Any] | tuple[Any, ...]:
        values = dict(fields)
        for key, default in self.defaults.items():
            if key not in values:
                values[key] = default.arg(None) if default.is_callable else default.arg  # type: ignore[attr-defined]
        for key, process in self.processors.items():
            value = values.get(key)
            values[key] = process(value) if process is not None and value is not None else value
        return tuple(values[key] for key in self.order) if self.order is not None else values


_driver_inserts: dict[str, _DriverInsert] = {}
_COLUMN_KEYS = frozenset(Instance.__table__.c.keys())


def insert_received(session: Session, **fields: Any) -> ReceivedRow:
    """Insert an ``Instance`` row built from ``fields`` with one driver statement; the SCP's hot path.

    The same row as :func:`record_instance` (column defaults included) without the ORM's unit of
    work or a Core statement's execution context. Raises ``StorageError`` as :func:`record_instance`.
    """
    unknown = fields.keys() - _COLUMN_KEYS
    if unknown:
        raise TypeError(f"not columns of instances: {', '.join(sorted(unknown))}")
    connection = session.connection()
    dialect = connection.dialect
    statement = _driver_inserts.get(dialect.name)
    if statement is None:
        statement = _driver_inserts[dialect.name] = _DriverInsert(dialect)
    try:
        row_id = connection.exec_driver_sql(statement.sql, statement.parameters(fields)).scalar_one()  # type: ignore[arg-type]
    except SQLAlchemyError as e:
        uid = fields.get("sop_instance_uid")
        raise StorageError(f"cannot record instance {uid!r}: {getattr(e, 'orig', e)}") from e
    return ReceivedRow(
        row_id, fields["sop_instance_uid"], fields["sop_class_uid"], fields["study_instance_uid"],
        fields["series_instance_uid"],
    )


def replace_file(session: Session, instance_id: int, path: str, sha256: str, size_bytes: int) -> None:
    """Point the row ``instance_id`` at another stored file holding its bytes (a re-sent copy)."""
    try:
        session.execute(
            update(Instance).where(Instance.id == instance_id).values(path=path, sha256=sha256, size_bytes=size_bytes)
        )
    except SQLAlchemyError as e:
        raise StorageError(f"cannot point instance {instance_id} at {path!r}: {getattr(e, 'orig', e)}") from e


def find_instance(session: Session, sop_instance_uid: str) -> Instance | None:
    """The recorded instance with this SOP Instance UID, if any."""
    return session.scalars(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)).first()


def list_instances(
    session: Session,
    *,
    study_instance_uid: str | None = None,
    origin: str | None = None,
    limit: int = 100,
) -> list[Instance]:
    """Recorded instances, newest first, optionally of one study or one origin."""
    query = select(Instance).order_by(Instance.received_at.desc(), Instance.id.desc()).limit(limit)
    if study_instance_uid is not None:
        query = query.where(Instance.study_instance_uid == study_instance_uid)
    if origin is not None:
        query = query.where(Instance.origin == origin)
    return list(session.scalars(query))


def classify_resend(existing: Instance, sha256: str) -> Resend:
    """Whether a re-sent SOP Instance UID carries the same bytes as the one we hold.

    A UID names one object (PS3.3 C.12.1.1.1); the same UID with other bytes is a conflict the
    caller's duplicate policy must decide on, never a silent overwrite.
    """
    return "identical" if existing.sha256 == sha256.lower() else "conflict"
