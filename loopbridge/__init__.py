"""loopbridge: one daemon thread owns a private event loop and every PostgreSQL pool.

Sync callers block on the result, async callers on any other loop await it; pools never cross loops.
One :class:`Database` serves sync views, async handlers, CLIs, tests and notebooks at once.
"""

from ._stream import RowStream
from .bridge import Bridge, default_bridge
from .database import Database
from .errors import (
    BridgeClosedError,
    CallTimeoutError,
    ConfigurationError,
    ConnectError,
    ConnectionLostError,
    DatabaseClosedError,
    DeadlockError,
    LoopBridgeError,
    PoolTimeoutError,
    SubscriptionClosedError,
    TransactionClosedError,
    TransactionTimeoutError,
)
from .listen import Gap, Notification, Subscription
from .read import Reader
from .stats import BridgeStats, DatabaseStats, ReplicaStats
from .transaction import Transaction

__version__ = "0.1.0.dev0"

__all__ = [
    "Bridge",
    "BridgeClosedError",
    "BridgeStats",
    "CallTimeoutError",
    "ConfigurationError",
    "ConnectError",
    "ConnectionLostError",
    "Database",
    "DatabaseClosedError",
    "DatabaseStats",
    "DeadlockError",
    "Gap",
    "LoopBridgeError",
    "Notification",
    "PoolTimeoutError",
    "Reader",
    "ReplicaStats",
    "RowStream",
    "Subscription",
    "SubscriptionClosedError",
    "Transaction",
    "TransactionClosedError",
    "TransactionTimeoutError",
    "__version__",
    "default_bridge",
]
