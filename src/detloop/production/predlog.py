"""The prediction log: one row per image the server answered, and one per request it refused.

``detloop serve`` writes it, ``detloop monitor`` and ``detloop abset build`` read it. It is a SQL
table behind SQLAlchemy: SQLite by default (``<paths.build>/serve/predlog.db``), any SQLAlchemy URI
(e.g. ``postgresql://...``) through ``serve.predlog`` or ``DETLOOP_PREDLOG_URI``.

Columns of ``predictions``:

=============== ==================================================================================
ts              UTC time the request arrived, seconds since the epoch (float, indexed)
request_id      one id per HTTP request (a request with several images writes several rows)
endpoint        ``invocations`` (scoring) or ``report`` (a user's failure report)
status          HTTP status of the answer (200, or the 4xx/5xx of a refused request)
error           why a request was refused (null on success)
model_version   the registered model version that answered (the one holding the alias then)
latency_ms      serving time per image: the request's time divided by its number of images
request_ms      serving time of the whole request (decode, validate, predict, store)
batch_size      images in the request
image_sha256    sha256 of the image bytes (of the whole body for a refused request)
image_path      where the served image was kept (``serve.images``), null when not kept
width, height   image size in pixels
n_detections    detections returned for the image
confidence_sum  sum of their confidences (average confidence = sum / n over any set of rows)
classes         detected class names as ``|title|date|`` (each once; portable ``LIKE '%|title|%'``)
detections      JSON list of ``[class_id, confidence, xc, yc, w, h]`` (normalized box), as answered
=============== ==================================================================================

Every request is written in one transaction before its answer is sent, so an answered request is
never missing from the log. SQLite runs in WAL mode (readers such as the monitor never block the
server) with a busy timeout.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from omegaconf import DictConfig, OmegaConf

from detloop.core.config import resolve_path
from detloop.core.errors import BadInput

log = logging.getLogger(__name__)

ENV_URI = "DETLOOP_PREDLOG_URI"
DEFAULT_FILE = Path("serve") / "predlog.db"
SQLITE_BUSY_TIMEOUT_S = 30.0
ROUND = 4  # decimals kept for confidences and normalized boxes in ``detections``

metadata = sa.MetaData()
predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("request_id", sa.String(36), nullable=False),
    sa.Column("endpoint", sa.String(32), nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("model_version", sa.String(32)),
    sa.Column("latency_ms", sa.Float),
    sa.Column("request_ms", sa.Float),
    sa.Column("batch_size", sa.Integer),
    sa.Column("image_sha256", sa.String(64)),
    sa.Column("image_path", sa.Text),
    sa.Column("width", sa.Integer),
    sa.Column("height", sa.Integer),
    sa.Column("n_detections", sa.Integer, nullable=False, default=0),
    sa.Column("confidence_sum", sa.Float, nullable=False, default=0.0),
    sa.Column("classes", sa.Text, nullable=False, default=""),
    sa.Column("detections", sa.Text, nullable=False, default="[]"),
    sa.Index("ix_predictions_ts", "ts"),
    sa.Index("ix_predictions_version_ts", "model_version", "ts"),
)
COLUMNS = [c.name for c in predictions.columns if c.name != "id"]


@dataclass
class Record:
    """One row of the prediction log (see the module docstring for the meaning of each field)."""

    ts: float
    request_id: str
    endpoint: str
    status: int
    model_version: str | None = None
    error: str | None = None
    latency_ms: float | None = None
    request_ms: float | None = None
    batch_size: int | None = None
    image_sha256: str | None = None
    image_path: str | None = None
    width: int | None = None
    height: int | None = None
    n_detections: int = 0
    confidence_sum: float = 0.0
    classes: str = ""
    detections: str = "[]"

    def row(self) -> dict:
        return {name: getattr(self, name) for name in COLUMNS}


def new_request_id() -> str:
    return uuid.uuid4().hex


def detection_fields(rows: Iterable[Mapping]) -> dict:
    """``n_detections``, ``confidence_sum``, ``classes`` and ``detections`` of one image.

    ``rows`` are the pyfunc output rows of that image (``class_id``, ``class_name``, ``confidence``,
    ``xc``, ``yc``, ``w``, ``h``).
    """
    dets, names = [], []
    total = 0.0
    for r in rows:
        conf = float(r["confidence"])
        total += conf
        box = (round(float(r[key]), ROUND) for key in ("xc", "yc", "w", "h"))
        dets.append([int(r["class_id"]), round(conf, ROUND), *box])
        if r["class_name"] not in names:
            names.append(str(r["class_name"]))
    return {
        "n_detections": len(dets),
        "confidence_sum": total,
        "classes": class_field(names),
        "detections": json.dumps(dets, separators=(",", ":")),
    }


def class_field(names: Iterable[str]) -> str:
    """Class names as stored in ``classes``: ``|a|b|`` (empty string for none)."""
    names = [str(n) for n in names]
    bad = [n for n in names if "|" in n]
    if bad:
        raise ValueError(f"class names may not contain '|': {bad}")
    return f"|{'|'.join(names)}|" if names else ""


def detected(name: str) -> sa.ColumnElement[bool]:
    """SQL condition: ``name`` was detected in the row's image (``classes LIKE '%|name|%'``, escaped)."""
    return predictions.c.classes.contains(f"|{name}|", autoescape=True)


def parse_detections(text: str) -> list[list[float]]:
    """The ``detections`` column back as ``[[class_id, confidence, xc, yc, w, h], ...]``."""
    return json.loads(text or "[]")


# --------------------------------------------------------------------------- the store


def log_uri(cfg: DictConfig) -> str:
    """The configured prediction-log URI: ``serve.predlog``, else SQLite under ``paths.build``."""
    uri = OmegaConf.select(cfg, "serve.predlog")
    if uri:
        return str(uri)
    return f"sqlite:///{resolve_path(cfg, 'build') / DEFAULT_FILE}"


def shown_uri(uri: str) -> str:
    """The URI with any password masked (for logs and /health)."""
    try:
        return sa.engine.make_url(uri).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return uri


class PredictionLog:
    """The ``predictions`` table at ``uri``; created when missing. Safe to share between threads."""

    def __init__(self, uri: str):
        self.uri = uri
        try:
            url = sa.engine.make_url(uri)
        except sa.exc.ArgumentError as err:
            raise BadInput(f"serve.predlog: {uri!r} is not a SQLAlchemy database URI", [str(err)]) from err
        self.is_sqlite = url.get_backend_name() == "sqlite"
        kwargs: dict = {}
        if self.is_sqlite and url.database and url.database != ":memory:":
            Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}
        self.engine = sa.create_engine(url, **kwargs)
        if self.is_sqlite:
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._write_lock = threading.Lock()  # one writer at a time in this process (SQLite has one anyway)
        metadata.create_all(self.engine)

    def write(self, records: Iterable[Record]) -> int:
        """Insert the records in one transaction (durable when this returns); returns how many."""
        rows = [r.row() for r in records]
        if not rows:
            return 0
        with self._write_lock, self.engine.begin() as conn:
            conn.execute(predictions.insert(), rows)
        return len(rows)

    def count(self, **where) -> int:
        """Rows matching ``column=value`` filters (all rows without filters)."""
        query = sa.select(sa.func.count()).select_from(predictions)
        for key, value in where.items():
            query = query.where(predictions.c[key] == value)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def rows(self, since: float | None = None, until: float | None = None, **where) -> list[dict]:
        """Rows (as dicts, oldest first) with ``since <= ts < until`` and ``column=value`` filters."""
        query = sa.select(predictions).order_by(predictions.c.ts, predictions.c.id)
        if since is not None:
            query = query.where(predictions.c.ts >= since)
        if until is not None:
            query = query.where(predictions.c.ts < until)
        for key, value in where.items():
            query = query.where(predictions.c[key] == value)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cursor.execute("PRAGMA synchronous=NORMAL")  # with WAL: a committed row survives a process crash
    cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
    cursor.close()


def open_log(cfg: DictConfig) -> PredictionLog:
    """The prediction log of the configuration (``serve.predlog``)."""
    return PredictionLog(log_uri(cfg))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a SQLite URI (None for other databases or in-memory SQLite)."""
    url = sa.engine.make_url(uri)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(os.path.abspath(Path(url.database).expanduser()))
