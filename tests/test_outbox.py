"""The outbox beyond alarm events: low-priority data, its quota, expiry, message ids, and commands' records."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from gateway.config import MqttConfig, load_config
from gateway.demo.broker import MosquittoBroker
from gateway.demo.run import demo_config, write_config
from gateway.demo.simulator import PlcSimulator
from gateway.outbox import MESSAGE_OVERHEAD_BYTES, DataMessage, OutboxMessage
from gateway.sinks.mqtt import drain_once
from gateway.store import NewEvent, Store
from tests.conftest import free_port, wait_for_condition
from tests.fixtures_gateway import running_gateway
from tests.fixtures_mqtt import Subscriber, make_event, store_and_publisher

S = 10**9
TOPIC = "t/score"


def _score(n: int, *, size: int = 100, expires_at_ns: int = 0) -> DataMessage:
    return DataMessage(f"gw01:b00t:{n}", "score", TOPIC, b"s" * size, qos=1, expires_at_ns=expires_at_ns)


def _event(n: int, *, size: int = 100) -> NewEvent:
    return NewEvent(make_event(n), "t/alarm", b"a" * size)


def _cost(topic: str, size: int) -> int:
    return len(topic) + size + MESSAGE_OVERHEAD_BYTES


async def _written(store: Store) -> None:
    """Wait until what was queued is committed: a read is served after the writes queued before it."""
    await store.pending(1)


def test_alarm_events_go_out_before_data_and_acknowledged_data_is_deleted(tmp_path: Path) -> None:
    async def main() -> tuple[list[OutboxMessage], list[OutboxMessage], list[OutboxMessage], int]:
        store = Store(tmp_path / "gw.db")
        await store.start()
        try:
            store.add_messages([_score(1), _score(2)])
            await store.add_alarm_events([_event(1)])
            first = await store.pending()
            await store.mark_published([m.message_id for m in first])
            second = await store.pending()
            await store.mark_published([second[0].message_id])
            third = await store.pending()
            return first, second, third, store.stats.outbox_messages
        finally:
            await store.stop()

    first, second, third, left = asyncio.run(main())
    assert [m.kind for m in first] == ["alarm"]
    assert [(m.kind, m.message_id) for m in second] == [("score", "gw01:b00t:1"), ("score", "gw01:b00t:2")]
    assert [m.message_id for m in third] == ["gw01:b00t:2"] and left == 1
    assert _sql(tmp_path / "gw.db", "SELECT count(*) FROM outbox") == [(1,)]  # acknowledged data is not kept


def test_quota_drops_the_oldest_data_first_and_alarm_events_only_last(tmp_path: Path) -> None:
    score_cost, event_cost = _cost(TOPIC, 100), _cost("t/alarm", 100)
    quota = 10 * score_cost + 3 * event_cost

    async def main() -> tuple[list[str], dict[str, int], list[str], dict[str, int]]:
        store = Store(tmp_path / "gw.db", outbox_quota_bytes=quota)
        await store.start()
        try:
            await store.add_alarm_events([_event(n) for n in range(3)])
            store.add_messages([_score(n) for n in range(12)])  # 2 over: data goes to 90 %
            await _written(store)
            kept_scores = _data_ids(tmp_path / "gw.db")
            after_data = _outbox_stats(store)
            # Alarm events alone beyond the quota: the oldest alarm events go, just enough to fit.
            await store.add_alarm_events([_event(n) for n in range(3, 20)])
            pending = [m.message_id for m in await store.pending(100)]
            return kept_scores, after_data, pending, _outbox_stats(store)
        finally:
            await store.stop()

    kept_scores, after_data, pending, after_events = asyncio.run(main())
    low_water = int(quota * 0.9)
    # Scores 0..k dropped, the newest kept; every alarm event kept.
    assert after_data["alarm_events"] == 3 and after_data["dropped_alarm_events"] == 0
    dropped = after_data["dropped_scores"]
    assert dropped >= 2 and kept_scores == [f"gw01:b00t:{n}" for n in range(dropped, 12)]
    assert after_data["bytes"] == 3 * event_cost + (12 - dropped) * score_cost <= low_water
    # Then every score went before the first alarm event, and the newest alarm events were kept.
    assert after_events["dropped_scores"] == 12 and after_events["messages"] == 0
    lost = after_events["dropped_alarm_events"]
    assert lost > 0 and after_events["alarm_events"] == 20 - lost
    assert pending == [make_event(n).event_id for n in range(lost, 20)]
    assert after_events["bytes"] == (20 - lost) * event_cost <= quota
    dropped_rows = _sql(
        tmp_path / "gw.db",
        "SELECT event_id, length(payload) FROM alarm_events WHERE dropped_at_ns IS NOT NULL ORDER BY seq",
    )
    assert dropped_rows == [(make_event(n).event_id, 0) for n in range(lost)]  # the record stays, the message went
    assert _sql(tmp_path / "gw.db", "SELECT count(*) FROM alarms") == [(20,)]


def _sql(db: Path, query: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(query).fetchall()


def _data_ids(db: Path) -> list[str]:
    """The low-priority messages in the outbox, oldest first (pending() hands out alarm events first)."""
    return [r[0] for r in _sql(db, "SELECT message_id FROM outbox ORDER BY seq")]


def _outbox_stats(store: Store) -> dict[str, int]:
    st = store.stats
    return {
        "alarm_events": st.outbox_alarm_events, "messages": st.outbox_messages, "bytes": st.outbox_bytes,
        "dropped_scores": st.outbox_dropped_scores, "dropped_alarm_events": st.outbox_dropped_alarm_events,
        "expired": st.outbox_expired,
    }  # fmt: skip


def test_expired_data_is_never_handed_out_and_is_counted_when_swept(tmp_path: Path) -> None:
    now = time.time_ns()

    async def main() -> tuple[list[str], int, int]:
        store = Store(tmp_path / "gw.db", outbox_quota_bytes=3 * _cost(TOPIC, 100))
        await store.start()
        try:
            store.add_messages([_score(1, expires_at_ns=now - S), _score(2, expires_at_ns=now + 3600 * S), _score(3)])
            await _written(store)
            pending = [m.message_id for m in await store.pending()]
            # A fourth message exceeds the quota: the sweep takes the expired one first, no live data goes.
            store.add_messages([_score(4)])
            await _written(store)
            return pending, store.stats.outbox_expired, store.stats.outbox_dropped_scores
        finally:
            await store.stop()

    pending, expired, dropped = asyncio.run(main())
    assert pending == ["gw01:b00t:2", "gw01:b00t:3"]
    assert (expired, dropped) == (1, 0)


def test_a_newer_status_replaces_one_still_waiting(tmp_path: Path) -> None:
    async def main() -> tuple[list[bytes], int, int]:
        store = Store(tmp_path / "gw.db")
        await store.start()
        try:
            for n in range(3):
                store.add_messages([DataMessage(f"gw01:b00t:{n}", "status", "t/status", b"%d" % n, retain=True)])
                await _written(store)
            pending = await store.pending()
            return [m.payload for m in pending if m.retain], store.stats.outbox_superseded, store.stats.outbox_messages
        finally:
            await store.stop()

    assert asyncio.run(main()) == ([b"2"], 2, 1)


def test_outbox_counts_and_command_records_survive_a_restart(tmp_path: Path) -> None:
    raised = make_event(1)
    acked = replace(
        raised, event="acknowledged", seq=2, event_id=f"{raised.alarm_id}:2", state="acked",
        cause="operator:alice", command_id="c-1", decided_at_ns=raised.decided_at_ns + S,
    )  # fmt: skip

    async def run(first: bool) -> tuple[dict[str, int], object, object, object]:
        store = Store(tmp_path / "gw.db")
        await store.start()
        try:
            if first:
                await store.add_alarm_events([_event(1), NewEvent(acked, "t/alarm", b"ack")])
                store.add_messages([_score(1), _score(2, size=50)])
                await _written(store)
            return (
                _outbox_stats(store),
                await store.command_record("alice", "c-1"),
                await store.command_record("mallory", "c-1"),
                await store.command_record("alice", "c-2"),
            )
        finally:
            await store.stop()

    before = asyncio.run(run(True))
    after = asyncio.run(run(False))
    assert before == after
    stats, record, other_user, other_id = after
    assert (stats["alarm_events"], stats["messages"]) == (2, 2)
    assert stats["bytes"] == _cost("t/alarm", 100) + _cost("t/alarm", 3) + _cost(TOPIC, 100) + _cost(TOPIC, 50)
    assert record == (acked.alarm_id, acked.event_id, "acked", acked.decided_at_ns)
    assert other_user is None and other_id is None


def test_data_is_drained_after_alarm_events_retained_and_with_the_expiry_it_has_left(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    cfg = MqttConfig(port=mosquitto.port)
    expires = time.time_ns() + 30 * S

    async def main(sub: Subscriber) -> int:
        async with store_and_publisher(tmp_path / "gw.db", cfg) as (store, pub):
            store.add_messages(
                [
                    _score(1, expires_at_ns=expires),
                    DataMessage("gw01:b00t:2", "status", "t/status", b"{}", retain=True),
                ]
            )
            await store.add_alarm_events([_event(1)])
            await drain_once(store, pub)
            await sub.await_for(3)
            return store.stats.outbox_messages + store.stats.outbox_alarm_events

    with Subscriber(mosquitto.port, "t/#") as sub:
        left = asyncio.run(main(sub))
        messages = sub.messages
    assert left == 0
    assert [m.topic for m in messages] == ["t/alarm", TOPIC, "t/status"]
    score, status = messages[1], messages[2]
    assert score.message_expiry_s is not None and 1 <= score.message_expiry_s <= 30
    assert status.message_expiry_s is None
    # A retained message reaches a live subscriber with retain off; a late one gets it retained.
    with Subscriber(mosquitto.port, "t/status") as late:
        (got,) = late.wait_for(1)
    assert got.retain and json.loads(got.payload) == {}


def test_broker_down_long_enough_to_fill_the_quota_keeps_every_alarm_event_and_counts_the_drops(
    tmp_path: Path,
) -> None:
    """The issue's quota test, on a whole gateway: simulated PLC, a pump fault, scores on, no broker."""
    opc_port, mqtt_port = free_port(), free_port()
    cfg_dict = demo_config(opc_port=opc_port, mqtt_port=mqtt_port, db_path=tmp_path / "gw.db")
    # ~10 KiB: some 18 scores (8 a second) or 12 alarm events.
    cfg_dict["storage"]["outbox_quota_mb"] = 0.01
    cfg_dict["mqtt"].update(status_interval_s=0.5, reconnect_min_s=0.2, reconnect_max_s=0.5)
    cfg = load_config(write_config(cfg_dict, tmp_path / "gateway.yaml"))

    def periodic_status(messages: list[Any]) -> list[dict[str, Any]]:
        found = [json.loads(m.payload) for m in messages if m.topic.endswith("/status")]
        return [s for s in found if s["stats"] is not None]

    async def scenario() -> tuple[list[Any], dict[str, Any]]:
        sim = PlcSimulator(port=opc_port, fault_pump=2, fault_at_s=2.0, fault_ramp_s=2.0, bad_tag=None, nan_tag=None)
        async with sim, running_gateway(cfg) as run:
            store = run.gateway.store
            await wait_for_condition(
                lambda: (store.stats.outbox_alarm_events >= 1 and store.stats.outbox_dropped_scores > 0)
                or run.stopped(),
                90,
                "an alarm event waiting and scores dropped for the quota",
            )
            assert not run.stopped()
            with MosquittoBroker(mqtt_port, workdir=tmp_path / "mosquitto") as broker:
                with Subscriber(broker.port, "edge/demo/#") as sub:
                    await sub.await_for(
                        lambda msgs: any(s["stats"]["outbox"]["alarm_events"] == 0 for s in periodic_status(msgs)),
                        60,
                    )
                    await run.gateway.publisher.stop()  # no more messages while the test reads them
                    messages = sub.messages
            stats = dict(vars(store.stats))
        assert run.code == 0
        return messages, stats

    messages, stats = asyncio.run(scenario())
    received = [json.loads(m.payload) for m in messages if m.topic.endswith("/alarm")]
    acked = [
        r[0]
        for r in _sql(tmp_path / "gw.db", "SELECT event_id FROM alarm_events WHERE published_at_ns IS NOT NULL ORDER BY seq")
    ]
    assert any(a["event"] == "raised" and a["asset"] == "pump02" for a in received)
    # Every alarm event the broker acknowledged arrived, in the order decided; none was dropped for the quota.
    assert list(dict.fromkeys(a["event_id"] for a in received)) == acked
    assert stats["outbox_dropped_alarm_events"] == 0
    # The drops were counted and published: the status says how many scores never went out.
    last = periodic_status(messages)[-1]["stats"]["outbox"]
    assert 0 < last["dropped_scores"] <= stats["outbox_dropped_scores"]
    assert last["quota_bytes"] == int(0.01 * 2**20) and last["dropped_alarm_events"] == 0
    # The scores that waited went out, each with its own id.
    scores = [json.loads(m.payload) for m in messages if m.topic.endswith("/score")]
    ids = [s["message_id"] for s in scores]
    assert scores and len(set(ids)) == len(ids)
