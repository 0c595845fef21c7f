"""LISTEN/NOTIFY: delivery, closing, and nothing missed silently (reconnection and overflow mark a Gap)."""

from __future__ import annotations

import gc
import threading
from typing import Any

import pytest

from loopbridge import (
    Bridge,
    BridgeClosedError,
    ConfigurationError,
    ConnectError,
    Database,
    DatabaseClosedError,
    Gap,
    Notification,
    Subscription,
    SubscriptionClosedError,
)
from tests.boundary import Driver, settled, terminate, wait_until
from tests.pgcluster import PrivateCluster
from tests.support import WAIT, independent, run_loop


def subscribe(driver: Driver, db: Database, *channels: str, **options: Any) -> Subscription:
    """``db.listen(...)``, LISTENing on return: ``open()`` for the blocking kinds, ``aopen()`` on a loop."""

    async def started() -> Subscription:
        return await db.listen(*channels, **options).aopen()

    subscription: Subscription = driver.do(lambda: db.listen(*channels, **options).open(), started)
    return subscription


def notify(dsn: str, channel: str, payload: str) -> None:
    independent(dsn, "SELECT pg_notify($1, $2)", channel, payload)


def get(driver: Driver, subscription: Subscription, timeout: float = WAIT) -> Notification | Gap | None:
    item: Notification | Gap | None = driver.call(subscription, "get", timeout=timeout)
    return item


class TestDelivery:
    def test_notifications_arrive_in_order_with_channel_payload_and_pid(
        self, db: Database, dsn: str, driver: Driver
    ) -> None:
        subscription = subscribe(driver, db, "orders", "alerts")
        assert subscription.listening
        assert subscription.channels == ("orders", "alerts")
        independent(
            dsn, "SELECT pg_notify('orders', 'o1'), pg_notify('alerts', 'a1'), pg_notify('orders', 'o2')"
        )
        notify(dsn, "elsewhere", "not for us")
        items = [get(driver, subscription) for _ in range(3)]
        assert [(n.channel, n.payload) for n in items if isinstance(n, Notification)] == [
            ("orders", "o1"),
            ("alerts", "a1"),
            ("orders", "o2"),
        ]
        assert all(isinstance(n, Notification) and n.pid > 0 for n in items)
        assert get(driver, subscription, timeout=0.2) is None
        driver.call(subscription, "close")

    def test_get_returns_none_when_nothing_came_in_time(self, db: Database, driver: Driver) -> None:
        subscription = subscribe(driver, db, "quiet")
        assert get(driver, subscription, timeout=0.1) is None
        driver.call(subscription, "close")

    def test_iterating_yields_notifications(self, db: Database, dsn: str, driver: Driver) -> None:
        subscription = subscribe(driver, db, "events")
        for i in range(3):
            notify(dsn, "events", str(i))
        assert [driver.next(subscription).payload for _ in range(3)] == ["0", "1", "2"]
        driver.call(subscription, "close")
        with pytest.raises(StopIteration):
            driver.next(subscription)

    def test_channel_names_are_quoted_not_interpolated(self, db: Database, dsn: str, driver: Driver) -> None:
        odd = 'Mixed Case; "quoted" -- channel'
        subscription = subscribe(driver, db, odd)
        notify(dsn, odd, "reached")
        item = get(driver, subscription)
        assert isinstance(item, Notification)
        assert (item.channel, item.payload) == (odd, "reached")
        driver.call(subscription, "close")

    def test_listen_in_async_code_listens_from_the_block_on(self, db: Database, dsn: str) -> None:
        async def main() -> list[str]:
            subscription = db.listen("later")
            assert not subscription.listening
            notify(dsn, "later", "before")  # nobody listens yet: not delivered, as PostgreSQL does
            async with subscription:
                notify(dsn, "later", "after")
                payloads = []
                async for item in subscription:
                    assert isinstance(item, Notification)
                    payloads.append(item.payload)
                    break
            assert not subscription.listening
            return payloads

        assert run_loop(main) == ["after"]

    def test_bad_arguments_are_refused(self, db: Database) -> None:
        with pytest.raises(ConfigurationError, match="at least one channel"):
            db.listen()
        with pytest.raises(ConfigurationError, match="non-empty strings"):
            db.listen("")
        with pytest.raises(ConfigurationError, match="queue_size must be a positive integer"):
            db.listen("x", queue_size=0)


class TestClosing:
    def test_closing_unlistens_and_returns_the_connection(
        self, dsn: str, bridge: Bridge, driver: Driver, schema: str, admin_dsn: str
    ) -> None:
        db = Database(dsn, bridge=bridge, max_size=1)
        subscription = subscribe(driver, db, "a", "b")
        assert db.stats().in_use == 1
        driver.call(subscription, "close")
        assert db.stats().in_use == 0
        assert not subscription.listening
        # The same (only) connection, back from the pool, listens to nothing.
        assert db.fetch("SELECT pg_listening_channels()") == []
        with pytest.raises(SubscriptionClosedError, match=r"is closed: .* db\.listen\(\.\.\.\)"):
            get(driver, subscription)
        driver.call(subscription, "close")  # twice is fine
        db.close()

    def test_a_with_block_closes_it(self, db: Database, driver: Driver) -> None:
        with driver.block(db.listen("a")) as subscription:
            assert subscription.listening
        assert not subscription.listening
        assert db.stats().in_use == 0

    def test_a_dropped_subscription_is_closed(
        self, db: Database, driver: Driver, schema: str, admin_dsn: str
    ) -> None:
        subscription = subscribe(driver, db, "dropped")
        assert db.stats().in_use == 1
        del subscription
        gc.collect()
        settled(db, admin_dsn, schema)

    def test_the_owner_going_away_closes_it(
        self, db: Database, driver: Driver, schema: str, admin_dsn: str
    ) -> None:
        subscription = subscribe(driver, db, "orphan")
        driver.stop()
        settled(db, admin_dsn, schema)
        wait_until(lambda: not subscription.listening)

    def test_closing_the_database_ends_it_after_what_was_received(
        self, dsn: str, bridge: Bridge, driver: Driver
    ) -> None:
        db = Database(dsn, bridge=bridge)
        subscription = subscribe(driver, db, "last")
        notify(dsn, "last", "received before")
        wait_until(lambda: subscription._core.pipe.qsize() == 1, what="the notification queued")
        db.close(timeout=5)  # promptly: a subscription never ends on its own
        item = get(driver, subscription)
        assert isinstance(item, Notification)
        assert item.payload == "received before"
        with pytest.raises(DatabaseClosedError, match="its Database was closed"):
            get(driver, subscription)

    def test_closing_the_bridge_ends_it(self, dsn: str, driver: Driver) -> None:
        bridge = Bridge("listen-close")
        db = Database(dsn, bridge=bridge)
        subscription = subscribe(driver, db, "gone")
        bridge.close(timeout=5)
        with pytest.raises(BridgeClosedError):
            get(driver, subscription)

    def test_close_from_another_thread_wakes_a_blocked_get(self, db: Database) -> None:
        subscription = db.listen("wake").open()
        results: list[Any] = []

        def consume() -> None:
            results.extend(subscription)  # ends when closed

        consumer = threading.Thread(target=consume)
        consumer.start()
        wait_until(lambda: consumer.is_alive())
        subscription.close()
        consumer.join(WAIT)
        assert not consumer.is_alive()
        assert results == []


class TestNothingMissedSilently:
    def test_a_terminated_backend_is_replaced_and_a_gap_marks_the_loss(
        self, db: Database, dsn: str, schema: str, admin_dsn: str, driver: Driver
    ) -> None:
        subscription = subscribe(driver, db, "jobs")
        notify(dsn, "jobs", "before")
        assert getattr(get(driver, subscription), "payload", None) == "before"
        terminate(admin_dsn, schema, query="LISTEN%")
        gap = get(driver, subscription)
        assert isinstance(gap, Gap)
        assert gap.reason == "reconnected"
        assert "were not received" in gap.detail
        assert subscription.listening  # the Gap comes once LISTEN is in effect again
        notify(dsn, "jobs", "after")
        assert getattr(get(driver, subscription), "payload", None) == "after"
        driver.call(subscription, "close")
        settled(db, admin_dsn, schema)

    def test_a_server_restart_is_survived_and_a_gap_marks_it(
        self, cluster: PrivateCluster, bridge: Bridge, driver: Driver
    ) -> None:
        db = Database(cluster.dsn(), bridge=bridge)
        subscription = subscribe(driver, db, "jobs")
        cluster.restart()
        gap = get(driver, subscription)
        assert isinstance(gap, Gap)
        assert gap.reason == "reconnected"
        notify(cluster.dsn(), "jobs", "after restart")
        assert getattr(get(driver, subscription), "payload", None) == "after restart"
        driver.call(subscription, "close")
        db.close()

    def test_a_consumer_that_falls_behind_is_told_where_it_lost_notifications(
        self, db: Database, dsn: str, driver: Driver
    ) -> None:
        subscription = subscribe(driver, db, "burst", queue_size=5)
        independent(dsn, "SELECT pg_notify('burst', g::text) FROM generate_series(1, 20) AS g")
        wait_until(lambda: subscription._core.pipe.qsize() == 6, what="five notifications and a Gap queued")
        items = [get(driver, subscription) for _ in range(6)]
        assert [getattr(n, "payload", None) for n in items[:5]] == ["1", "2", "3", "4", "5"]
        assert isinstance(items[5], Gap)
        assert items[5].reason == "overflow"
        assert get(driver, subscription, timeout=0.2) is None
        notify(dsn, "burst", "caught up")
        assert getattr(get(driver, subscription), "payload", None) == "caught up"
        driver.call(subscription, "close")

    def test_listening_while_the_server_is_down_fails_promptly(
        self, cluster: PrivateCluster, bridge: Bridge, driver: Driver
    ) -> None:
        db = Database(cluster.dsn(), bridge=bridge)
        cluster.stop()
        try:
            with pytest.raises(ConnectError, match="is PostgreSQL running there"):
                subscribe(driver, db, "down")
        finally:
            cluster.start()
        assert db.stats().in_use == 0
        db.close()
