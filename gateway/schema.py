"""The SQLite schema of the gateway's file, and the migration of files older gateways wrote."""

from __future__ import annotations

from sqlite_utils import Database

SCHEMA_VERSION = 4


def create_schema(db: Database) -> None:
    """Create every table and index this gateway uses (idempotent), migrating an older file first."""
    with db.atomic():
        db.table("scores").create(
            {"ts_ns": int, "asset": str, "model": str, "model_version": str, "output": str, "value": float},
            if_not_exists=True,
        )
        db.table("scores").create_index(["asset", "ts_ns"], if_not_exists=True)
        # Tag history: per asset, a JSON object {channel: engineering value or null when Bad/NaN}.
        db.table("samples").create(
            {"ts_ns": int, "asset": str, "values_json": str},
            not_null={"ts_ns", "asset", "values_json"},
            if_not_exists=True,
        )
        db.table("samples").create_index(["asset", "ts_ns"], if_not_exists=True)
        db.table("alarm_events").create(
            {
                "seq": int, "event_id": str, "alarm_id": str, "event": str, "gateway_id": str, "asset": str,
                "rule": str, "kind": str, "output": str, "severity": str, "value": float, "threshold": float,
                "model": str, "model_version": str, "first_abnormal_source_ts_ns": int, "decided_at_ns": int,
                "state": str, "event_seq": int, "cause": str, "command_id": str,
                "topic": str, "payload": bytes, "qos": int, "stored_at_ns": int, "published_at_ns": int,
                "dropped_at_ns": int,
            },
            # An explicit INTEGER PRIMARY KEY keeps insertion order stable across VACUUM.
            pk="seq",
            not_null={"event_id", "alarm_id", "event", "topic", "payload", "qos"},
            if_not_exists=True,
        )  # fmt: skip
        db.table("alarm_events").create_index(["event_id"], unique=True, if_not_exists=True)
        db.execute(
            "CREATE INDEX IF NOT EXISTS idx_alarm_events_unpublished ON alarm_events(seq) "
            "WHERE published_at_ns IS NULL"
        )
        db.table("outbox").create(
            {
                "seq": int, "message_id": str, "kind": str, "topic": str, "payload": bytes, "qos": int,
                "retain": int, "expires_at_ns": int, "stored_at_ns": int,
            },
            pk="seq",
            not_null={"message_id", "kind", "topic", "payload", "qos", "retain", "expires_at_ns"},
            if_not_exists=True,
        )  # fmt: skip
        db.table("outbox").create_index(["message_id"], unique=True, if_not_exists=True)
        db.table("outbox").create_index(["expires_at_ns"], if_not_exists=True)
        db.table("alarms").create(
            {
                "alarm_id": str, "asset": str, "rule": str, "kind": str, "output": str, "severity": str,
                "model": str, "model_version": str, "state": str, "seq": int, "raised_value": float,
                "raised_threshold": float, "first_abnormal_source_ts_ns": int, "raised_at_ns": int,
                "cleared_at_ns": int, "cleared_value": float, "acked_at_ns": int, "acked_by": str,
                "shelved_until_ns": int, "updated_at_ns": int,
            },
            pk="alarm_id",
            not_null={"state"},
            if_not_exists=True,
        )  # fmt: skip
        _migrate(db)
        db.execute(
            "CREATE INDEX IF NOT EXISTS idx_alarm_events_command ON alarm_events(command_id) "
            "WHERE command_id IS NOT NULL"
        )
        # For retention: an occurrence's events, and the occurrences closed longest ago.
        db.execute("CREATE INDEX IF NOT EXISTS idx_alarm_events_alarm ON alarm_events(alarm_id)")
        db.execute(
            "CREATE INDEX IF NOT EXISTS idx_alarms_closed ON alarms(updated_at_ns) WHERE state = 'normal'"
        )
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


# Columns each schema version added to existing tables: schema 2 the alarm lifecycle, schema 3 the
# command that caused an event and alarm events dropped by the outbox quota. (New tables, such as
# schema 4's tag history `samples`, and new indexes are created.)
_ADDED = {
    2: {
        "alarm_events": {"state": str, "event_seq": int, "cause": str},
        "alarms": {
            "seq": int,
            "acked_at_ns": int,
            "acked_by": str,
            "shelved_until_ns": int,
            "updated_at_ns": int,
        },
    },
    3: {"alarm_events": {"command_id": str, "dropped_at_ns": int}},
}


def _migrate(db: Database) -> None:
    """Bring a file written by an older gateway up to this schema, keeping every row."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version >= SCHEMA_VERSION:
        return
    for added_in, tables in _ADDED.items():
        if version >= added_in:
            continue
        for table, columns in tables.items():
            have = set(db[table].columns_dict)
            for name, kind in columns.items():
                if name not in have:
                    db[table].add_column(name, kind)
    if version >= 2:
        return
    # Schema 1 knew active and cleared; nobody could acknowledge, so an active alarm is unacknowledged.
    db.execute(
        "UPDATE alarms SET state = CASE state WHEN 'active' THEN 'unack' ELSE 'normal' END, "
        "seq = CASE state WHEN 'active' THEN 1 ELSE 2 END, updated_at_ns = coalesce(cleared_at_ns, raised_at_ns) "
        "WHERE state IN ('active', 'cleared')"
    )
