"""MQTT sink: an asyncio publisher over paho-mqtt, and the outbox drain.

paho runs its own network thread (`loop_start`); its callbacks never do work, they only hand results
to the event loop with `call_soon_threadsafe`, where futures keyed by message id are resolved.

Delivery across reconnects: the session is persistent (MQTT 5 clean start off with a Session Expiry
Interval, 3.1.1 clean session off; `mqtt.session_expiry_s: 0` turns it off) and paho keeps every
unacknowledged QoS 1 message across a reconnect and re-sends it under the same message id. So a lost
connection does not fail a publish() that waits for its PUBACK: the PUBACK of the re-sent message
resolves it, and only then does the outbox mark the event. A publish() that times out first is
retried by the outbox while paho may still re-send the first copy: the event can arrive twice, never
zero times (consumers dedupe on event_id). paho's own reconnect delay is replaced after every failure
by `backoff_delay` (capped exponential with jitter; paho's has no jitter).

Topics and payloads are in gateway.sinks.payloads.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.config import MqttConfig
from gateway.errors import ConfigError, PublishError, StoreError
from gateway.outbox import OutboxMessage
from gateway.sinks.payloads import MessageIds, status_payload, status_topic
from gateway.store import Store
from gateway.tasks import backoff_delay, wait_event, wait_for

logger = logging.getLogger(__name__)

# paho's own in-flight window is 20; more concurrent publishes would only queue inside paho.
MAX_INFLIGHT = 20
# Messages paho may hold (in flight or awaiting reconnect); beyond it publish fails (DROP_NEWEST,
# the outbox keeps the alarm and retries).
MAX_QUEUED = 1000
# Outbox publishes awaiting their PUBACK at once: half of MAX_INFLIGHT, leaving room for scores.
OUTBOX_WINDOW = 10


class _DropNoSocketNoise(logging.Filter):
    """paho's thread logs "Client is not connected" at ERROR when it races disconnect(); the
    publisher reports connection state itself, so that line only alarms a reader for nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


_paho_logger = logging.getLogger(f"{__name__}.paho")
_paho_logger.addFilter(_DropNoSocketNoise())


def _no_delay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    """Disable Nagle on the broker connection: a burst of small alarms must not wait ~40 ms each."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (e.g. websockets): nothing to tune
        pass


@dataclass(frozen=True)
class IncomingMessage:
    """A message from a subscription; the MQTT 5 response topic and correlation data when sent."""

    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None


@dataclass
class PublisherStats:
    """Counters for the status page; updated on the event loop only."""

    published: int = 0
    failed: int = 0
    connects: int = 0
    # The broker's "session present" flag of the last CONNACK: True when it resumed our session.
    session_present: bool = False
    last_error: str | None = None


class MqttPublisher:
    """Publishes to one broker; `start()` never waits for the broker, `publish()` waits for its PUBACK."""

    def __init__(
        self, cfg: MqttConfig, *, gateway_id: str, version: str, started_at: str, ids: MessageIds | None = None
    ) -> None:
        self.cfg = cfg
        self.stats = PublisherStats()
        self.status_topic = status_topic(cfg, gateway_id)
        self._client_id = cfg.client_id or f"edge-gateway-{gateway_id}"
        self._ids = ids or MessageIds(gateway_id)
        self._gateway_id, self._version, self._started_at = gateway_id, version, started_at
        self._status = self._birth_and_will(None)
        self._where = f"{cfg.host}:{cfg.port}"
        self._client: mqtt.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = False
        self._stopping = False
        # Made here, not in start(): a waiter that comes before start() waits instead of spinning.
        self._connected_evt = asyncio.Event()
        self._inflight: asyncio.Semaphore | None = None
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._v5 = cfg.protocol == "5"
        # Topic filter -> handler, called on the event loop for each message that matches.
        self._subscriptions: dict[str, Callable[[IncomingMessage], None]] = {}
        # paho's thread only: consecutive connection failures, and why the broker refused the last CONNECT.
        self._failures = 0
        self._refused: str | None = None

    def set_inference(self, inference: dict[str, Any]) -> None:
        """Name each model's backend and fallbacks in the birth and the will; call it before start()."""
        if self._client is not None:
            raise RuntimeError("set_inference() after start(): the will is already with the MQTT client")
        self._status = self._birth_and_will(inference)

    def _birth_and_will(self, inference: dict[str, Any] | None) -> dict[str, bytes]:
        # The birth (re-sent on every connect) and the will keep one id each for the whole process.
        return {
            state: status_payload(
                state, message_id=self._ids.named(state), gateway_id=self._gateway_id, version=self._version,
                started_at=self._started_at, inference=inference,
            )  # fmt: skip
            for state in ("online", "offline")
        }

    @property
    def connected(self) -> bool:
        """True while a session with the broker is up (as last reported by paho's thread)."""
        return self._connected

    @property
    def awaiting_ack(self) -> int:
        """How many publish() calls are waiting for their PUBACK."""
        return len(self._acks)

    async def start(self) -> None:
        """Configure the client and start connecting in the background; a down broker is not an error."""
        self._loop = asyncio.get_running_loop()
        self._inflight = asyncio.Semaphore(MAX_INFLIGHT)
        password = self.cfg.password()
        # tls_set reads certificate files: keep that off the loop.
        self._client = await asyncio.to_thread(self._make_client, password)
        expiry = self.cfg.session_expiry_s
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = expiry
            self._client.connect_async(
                self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s, clean_start=expiry == 0,
                properties=props,
            )  # fmt: skip
        else:  # 3.1.1: clean_session was given to the Client
            self._client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        self._client.loop_start()
        logger.info(
            "mqtt: connecting to %s as %s (session expiry %d s)", self._where, self._client_id, expiry
        )

    def _make_client(self, password: str | None) -> mqtt.Client:
        cfg = self.cfg
        if self._v5:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self._client_id, protocol=mqtt.MQTTv5)
        else:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id=self._client_id, protocol=mqtt.MQTTv311,
                clean_session=cfg.session_expiry_s == 0,
            )  # fmt: skip
        client.enable_logger(_paho_logger)
        client.will_set(self.status_topic, self._status["offline"], qos=1, retain=True)
        if cfg.tls is not None:
            try:
                client.tls_set(
                    ca_certs=str(cfg.tls.ca_file) if cfg.tls.ca_file else None,
                    certfile=str(cfg.tls.cert_file) if cfg.tls.cert_file else None,
                    keyfile=str(cfg.tls.key_file) if cfg.tls.key_file else None,
                )
            except (OSError, ValueError) as exc:
                raise ConfigError([f"mqtt.tls: cannot load the certificates: {exc}"]) from exc
            # Only the host name check is skipped; the chain is still verified against ca_file.
            client.tls_insecure_set(cfg.tls.insecure_skip_verify)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, password)
        # The first retry's delay; each failure callback sets the next one (_next_delay).
        delay = backoff_delay(0, cfg.reconnect_min_s, cfg.reconnect_max_s)
        client.reconnect_delay_set(min_delay=delay, max_delay=delay)  # type: ignore[arg-type]
        client.max_queued_messages_set(MAX_QUEUED)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_socket_open = _no_delay
        return client

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a connection; True if connected."""
        await wait_event(self._connected_evt, timeout)
        return self._connected

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, timeout: float | None = None,
        expiry_s: int = 0, correlation_data: bytes | None = None,
    ) -> None:  # fmt: skip
        """Publish and return once acknowledged (QoS >= 1); PublishError if not connected, refused or late.

        `expiry_s` > 0 sets the MQTT 5 Message Expiry Interval (ignored on 3.1.1): for data that is
        stale after a while (scores), never for alarms or the retained status. `correlation_data`
        (MQTT 5 only) answers a request that carried it.
        """
        timeout = self.cfg.publish_timeout_s if timeout is None else timeout
        if self._inflight is None or self._loop is None:
            raise self._failed("publisher not started")
        try:
            await wait_for(self._inflight.acquire(), timeout)
        except asyncio.TimeoutError:
            raise self._failed(f"{MAX_INFLIGHT} publishes still in flight after {timeout} s") from None
        mid: int | None = None
        try:
            if self._client is None or not self._connected:
                # last_error keeps the connection problem itself, which says more than this.
                raise self._failed(f"not connected to {self._where}", record=False)
            props = None
            if self._v5 and (expiry_s > 0 or correlation_data is not None):
                props = Properties(PacketTypes.PUBLISH)
                if expiry_s > 0:
                    props.MessageExpiryInterval = expiry_s
                if correlation_data is not None:
                    props.CorrelationData = correlation_data
            info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
            # NO_CONN at QoS >= 1: the connection dropped before we heard; paho keeps the message and
            # sends it on reconnect, so its PUBACK is awaited like any other.
            if info.rc != mqtt.MQTT_ERR_SUCCESS and not (qos > 0 and info.rc == mqtt.MQTT_ERR_NO_CONN):
                raise self._failed(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
            if qos > 0:
                # Registered in the same loop step as publish(): the ack callback runs on this loop, later.
                mid = info.mid
                fut = self._acks[mid] = self._loop.create_future()
                try:
                    await wait_for(fut, timeout)
                except asyncio.TimeoutError:
                    raise self._failed(f"no acknowledgement for {topic} within {timeout} s") from None
                except PublishError as exc:
                    raise self._failed(str(exc)) from None
        finally:
            if mid is not None:
                self._acks.pop(mid, None)
            self._inflight.release()
        self.stats.published += 1

    def _failed(self, message: str, *, record: bool = True) -> PublishError:
        self.stats.failed += 1
        if record:
            self.stats.last_error = message
        return PublishError(message)

    async def stop(self, timeout: float = 2.0, *, publish_offline: bool = True) -> None:
        """Publish the retained offline status (best effort, unless told not to: a successor takes
        over), disconnect cleanly (so the broker does not send the will) and stop paho's thread, bounded."""
        client = self._client
        if client is None or self._loop is None:
            return
        deadline = self._loop.time() + timeout
        if self._connected and publish_offline:
            try:
                await self.publish(
                    self.status_topic, self._status["offline"], qos=1, retain=True, timeout=timeout / 2
                )
            except PublishError as exc:
                logger.warning("mqtt: could not publish the offline status: %s", exc)
        self._stopping = True
        self._client = None
        self._fail_pending("publisher stopped")
        client.disconnect()
        try:
            await wait_for(
                asyncio.to_thread(client.loop_stop), max(0.1, deadline - self._loop.time())
            )
        except asyncio.TimeoutError:
            logger.warning("mqtt: network thread did not stop within %.1f s", timeout)
        self._set_disconnected("publisher stopped")
        logger.info("mqtt: stopped (%d published, %d failed)", self.stats.published, self.stats.failed)

    # ---- loop side of the callbacks ----------------------------------------------------------

    def _set_connected(self, session_present: bool) -> None:
        if self._stopping:
            return  # a connect that raced stop(): the client is already being torn down
        self._connected = True
        self.stats.connects += 1
        self.stats.session_present = session_present
        self._connected_evt.set()
        logger.info(
            "mqtt: connected to %s (%s)", self._where, "session resumed" if session_present else "new session"
        )

    def _set_disconnected(self, reason: str, delay: float = 0.0) -> None:
        # Publishes awaiting a PUBACK keep waiting (bounded by their timeout): paho re-sends them
        # after the reconnect and their PUBACK resolves them.
        was = self._connected
        self._connected = False
        self._connected_evt.clear()
        if was and not self._stopping:
            self.stats.last_error = reason
            logger.warning("mqtt: %s; reconnecting in %.1f s", reason, delay)

    def _fail_pending(self, reason: str) -> None:
        for fut in self._acks.values():
            if not fut.done():
                fut.set_exception(PublishError(f"{reason} before acknowledgement"))

    def _set_error(self, message: str, delay: float) -> None:
        level = logging.DEBUG if message == self.stats.last_error else logging.WARNING
        logger.log(level, "mqtt: %s; retrying in %.1f s", message, delay)
        self.stats.last_error = message

    def _acked(self, mid: int, failure: str | None) -> None:
        fut = self._acks.get(mid)
        if fut is None or fut.done():
            return  # the publisher already gave up on it
        if failure is None:
            fut.set_result(None)
        else:
            fut.set_exception(PublishError(f"broker refused the publish: {failure}"))

    # ---- paho's thread: never raise, never work, only hand over -------------------------------

    def _to_loop(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed; nobody is left to tell
            pass

    def _next_delay(self, client: mqtt.Client) -> float:
        """Set the wait before paho's next reconnect attempt: paho calls a failure callback (connect
        failed, connection lost) just before each wait, and a delay with min == max is used as is."""
        delay = backoff_delay(self._failures, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)
        self._failures += 1
        client.reconnect_delay_set(min_delay=delay, max_delay=delay)  # type: ignore[arg-type]
        return delay

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        try:
            if reason_code.is_failure:
                # The broker closes the connection next: on_disconnect reports it with the retry delay.
                self._refused = f"broker {self._where} refused the connection: {reason_code}"
                return
            self._refused = None
            self._failures = 0
            client.publish(self.status_topic, self._status["online"], qos=1, retain=True)
            # Again on every connect: a clean session (or an expired one) forgot them.
            for topic in self._subscriptions:
                client.subscribe(topic, qos=1)
            self._to_loop(self._set_connected, bool(flags.session_present))
        except Exception:
            logger.exception("mqtt: on_connect failed")

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        try:
            # paho calls this from inside its `except OSError`, so the reason is the handled exception.
            exc = sys.exc_info()[1]
            delay = self._next_delay(client)
            self._to_loop(
                self._set_error, f"cannot connect to {self._where}: {exc or 'connection failed'}", delay
            )
        except Exception:
            logger.exception("mqtt: on_connect_fail failed")

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        try:
            delay = self._next_delay(client)
            if self._refused is not None:
                self._to_loop(self._set_error, self._refused, delay)
            else:
                self._to_loop(
                    self._set_disconnected, f"connection to {self._where} lost: {reason_code}", delay
                )
        except Exception:
            logger.exception("mqtt: on_disconnect failed")

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any
    ) -> None:
        try:
            # "No matching subscribers" (16) is a success code: is_failure covers it.
            self._to_loop(self._acked, mid, str(reason_code) if reason_code.is_failure else None)
        except Exception:
            logger.exception("mqtt: on_publish failed")

    def subscribe(self, topic_filter: str, handler: Callable[[IncomingMessage], None]) -> None:
        """Call `handler` on the event loop for every message matching `topic_filter` (from the next connect on)."""
        self._subscriptions[topic_filter] = handler
        if self._client is not None and self._connected:
            self._client.subscribe(topic_filter, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            props = getattr(msg, "properties", None)
            incoming = IncomingMessage(
                topic=msg.topic,
                payload=bytes(msg.payload),
                response_topic=getattr(props, "ResponseTopic", None),
                correlation_data=getattr(props, "CorrelationData", None),
            )
            for topic_filter, handler in self._subscriptions.items():
                if mqtt.topic_matches_sub(topic_filter, msg.topic):
                    self._to_loop(handler, incoming)
                    break
        except Exception:
            logger.exception("mqtt: on_message failed")


async def drain_outbox(
    store: Store, publisher: MqttPublisher, wake: asyncio.Event, *, batch: int = 100,
    window: int = OUTBOX_WINDOW, retry_s: float = 1.0, max_backoff_s: float = 30.0,
) -> None:  # fmt: skip
    """Publish the outbox in order (alarm events first), marking each only after its acknowledgement; runs until cancelled.

    Wakes when `wake` is set (by whoever stores an event), when the broker connects, or every `retry_s`.
    A failed publish ends the round; it is retried with capped exponential backoff, never dropped.
    """
    delay = retry_s
    last_problem: str | None = None
    while True:
        wake.clear()
        try:
            await drain_once(store, publisher, batch, window=window)
        except (PublishError, StoreError) as exc:
            if str(exc) != last_problem:
                logger.warning("outbox: %s; will retry", exc)
            last_problem = str(exc)
            wait_s, delay = delay, min(delay * 2, max_backoff_s)
        else:
            if last_problem is not None:
                logger.info("outbox: delivering again")
            last_problem = None
            wait_s = delay = retry_s
        if publisher.connected:
            await wait_event(wake, wait_s)
        else:
            await publisher.wait_connected(wait_s)


async def drain_once(
    store: Store, publisher: MqttPublisher, batch: int = 100, *, window: int = OUTBOX_WINDOW
) -> None:
    """Publish everything pending in the outbox, in order, up to `window` awaiting their PUBACK at once;
    PublishError/StoreError end it early, after marking the acknowledged prefix."""
    while True:
        messages = await store.pending(batch)
        if not messages:
            return
        await _publish_in_order(store, publisher, messages, max(1, window))


async def _publish_in_order(
    store: Store, publisher: MqttPublisher, messages: list[OutboxMessage], window: int
) -> None:
    # publish() hands its message to paho after the same steps for every call (a FIFO semaphore
    # included), so calls started in order reach paho in order, and paho sends QoS 1 in order on its
    # one connection (re-sending unacknowledged ones in order after a reconnect).
    inflight: deque[tuple[str, asyncio.Task[None]]] = deque()
    acked: list[str] = []
    failure: BaseException | None = None
    try:
        for m in messages:
            if len(inflight) == window:
                failure = await _settle_oldest(inflight, acked)
                if failure is not None:
                    break
            task = asyncio.ensure_future(
                publisher.publish(m.topic, m.payload, qos=m.qos, retain=m.retain, expiry_s=_expiry_left(m))
            )
            inflight.append((m.message_id, task))
        while inflight and failure is None:
            failure = await _settle_oldest(inflight, acked)
    finally:
        # Cancelled (at shutdown) while waiting for the oldest: count what was acknowledged meanwhile.
        while failure is None and inflight and _succeeded(inflight[0][1]):
            acked.append(inflight.popleft()[0])
        # After a failure (or when cancelled) the publishes behind it stop waiting: they are not
        # marked, so they go out again next round, after the failed one (at least once).
        for _, task in inflight:
            task.cancel()
        await asyncio.gather(*(task for _, task in inflight), return_exceptions=True)
        # Only the contiguous acknowledged prefix is marked: an event is never marked ahead of an
        # earlier one, and what the broker has acknowledged is not sent a second time at stop.
        if acked:
            await store.mark_published(acked)
    if failure is not None:
        raise failure


def _expiry_left(m: OutboxMessage) -> int:
    """Seconds of its MQTT 5 expiry a stored message has left (0: none), so waiting does not extend it."""
    if not m.expires_at_ns:
        return 0
    # At least 1: a message that expired since it was read goes out with the shortest expiry, not none.
    return max(1, math.ceil((m.expires_at_ns - time.time_ns()) / 1e9))


async def _settle_oldest(
    inflight: deque[tuple[str, asyncio.Task[None]]], acked: list[str]
) -> BaseException | None:
    """Wait for the oldest publish in flight; note its message as acknowledged, or return why it failed."""
    message_id, task = inflight[0]
    await asyncio.wait({task})
    inflight.popleft()
    if task.cancelled():
        return PublishError(f"publish of {message_id} was cancelled")
    exc = task.exception()
    if exc is None:
        acked.append(message_id)
    return exc


def _succeeded(task: asyncio.Task[None]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None
