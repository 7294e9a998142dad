"""One exception tree for the whole product.

Every error a user can see has a stable ``name`` (e.g. ``STORE_NOT_OPEN``)
and a stable numeric ``code``. The API maps them to JSON-RPC errors with
``data.name``; the CLI prints ``name: message`` and exits 1. Codes never
change once released; docs/api.md lists them all (a test checks that).

JSON-RPC reserves -32768..-32000; our codes live in -31999..-31000 grouped by
layer so a number alone tells where it came from.
"""

from __future__ import annotations

from typing import Any


class P2PStoreError(Exception):
    """Base of every p2pstore error. ``data`` carries machine-readable detail."""

    name = "INTERNAL_ERROR"
    code = -32603

    def __init__(self, message: str, *, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = dict(data or {})

    def to_dict(self) -> dict[str, Any]:
        # ``name`` last: a detail called "name" (a device's, a table's) must not mask the error's name.
        return {"code": self.code, "message": self.message, "data": {**self.data, "name": self.name}}


# JSON-RPC protocol level (standard codes).
class ParseError(P2PStoreError):
    name, code = "PARSE_ERROR", -32700


class InvalidRequest(P2PStoreError):
    name, code = "INVALID_REQUEST", -32600


class MethodNotFound(P2PStoreError):
    name, code = "METHOD_NOT_FOUND", -32601


class InvalidParams(P2PStoreError):
    name, code = "INVALID_PARAMS", -32602


class InternalError(P2PStoreError):
    name, code = "INTERNAL_ERROR", -32603


class RequestTooLarge(P2PStoreError):
    name, code = "REQUEST_TOO_LARGE", -31001


class PermissionDenied(P2PStoreError):
    name, code = "PERMISSION_DENIED", -31002


# Configuration and lifecycle.
class ConfigError(P2PStoreError):
    name, code = "CONFIG_INVALID", -31010


class DaemonAlreadyRunning(P2PStoreError):
    name, code = "DAEMON_ALREADY_RUNNING", -31011


class DaemonNotRunning(P2PStoreError):
    name, code = "DAEMON_NOT_RUNNING", -31012


# Stores and tables.
class StoreNotOpen(P2PStoreError):
    name, code = "STORE_NOT_OPEN", -31100


class StoreInvalid(P2PStoreError):
    name, code = "STORE_INVALID", -31101


class TooManyStores(P2PStoreError):
    name, code = "TOO_MANY_STORES", -31102


class SecurityLabelMismatch(P2PStoreError):
    name, code = "SECURITY_LABEL_MISMATCH", -31103


class BackupFailed(P2PStoreError):
    """store.backup could not make its copy (file exists, no such directory, no permission, disk full)."""

    name, code = "BACKUP_FAILED", -31104


class SqlError(P2PStoreError):
    name, code = "SQL_ERROR", -31110


class ConstraintViolation(P2PStoreError):
    name, code = "CONSTRAINT_VIOLATION", -31111


class TableNotFound(P2PStoreError):
    name, code = "TABLE_NOT_FOUND", -31120


class ColumnNotFound(P2PStoreError):
    name, code = "COLUMN_NOT_FOUND", -31121


class TableNotDistributed(P2PStoreError):
    name, code = "TABLE_NOT_DISTRIBUTED", -31122


class TableTypeLocked(P2PStoreError):
    name, code = "TABLE_TYPE_LOCKED", -31123


class CompositeKeyNotSupported(P2PStoreError):
    name, code = "COMPOSITE_KEY_NOT_SUPPORTED", -31124


class ReadOnlyTable(P2PStoreError):
    name, code = "READ_ONLY_TABLE", -31125


class InvalidPredicate(P2PStoreError):
    name, code = "INVALID_PREDICATE", -31130


# The clock.
class ClockOverflow(P2PStoreError):
    """The local clock reached the end of its range (see clock.py): nothing can be stamped."""

    name, code = "CLOCK_OVERFLOW", -31150
# The storage under a store: the disk, the file system, the file itself.
class DiskFull(P2PStoreError):
    """SQLite answered SQLITE_FULL: the transaction was rolled back, nothing written."""

    name, code = "DISK_FULL", -31140


class StoreReadOnly(P2PStoreError):
    """A store's file or directory can't be written (read-only mount, immutable file, permissions)."""

    name, code = "STORE_READ_ONLY", -31141


class StoreFileChanged(P2PStoreError):
    """The file at a store's path is no longer the one the daemon opened
    (deleted, replaced, overwritten): the store serves nothing until reopened."""

    name, code = "STORE_FILE_CHANGED", -31142


# Notifications.
class TooManySubscriptions(P2PStoreError):
    name, code = "TOO_MANY_SUBSCRIPTIONS", -31200


class SubscriptionNotFound(P2PStoreError):
    name, code = "SUBSCRIPTION_NOT_FOUND", -31201


# sync_schema.json.
class SchemaInvalid(P2PStoreError):
    name, code = "SCHEMA_INVALID", -31300


class SchemaNotFound(P2PStoreError):
    name, code = "SCHEMA_NOT_FOUND", -31301


# Evolutions (numbered schema scripts, store/evolutions.py).
class EvolutionDestructive(P2PStoreError):
    name, code = "EVOLUTION_DESTRUCTIVE", -31302


class EvolutionInconsistent(P2PStoreError):
    name, code = "EVOLUTION_INCONSISTENT", -31303


class EvolutionInvalid(P2PStoreError):
    name, code = "EVOLUTION_INVALID", -31304


class EvolutionFailed(P2PStoreError):
    name, code = "EVOLUTION_FAILED", -31305


# Devices, trust, channels.
class DeviceUnknown(P2PStoreError):
    name, code = "DEVICE_UNKNOWN", -31400


class DeviceOffline(P2PStoreError):
    name, code = "DEVICE_OFFLINE", -31401


class DeviceUntrusted(P2PStoreError):
    name, code = "DEVICE_UNTRUSTED", -31402


class InvalidDeviceId(P2PStoreError):
    name, code = "INVALID_DEVICE_ID", -31403


class IdentityError(P2PStoreError):
    name, code = "IDENTITY_INVALID", -31404


class SecurityLevelDenied(P2PStoreError):
    name, code = "SECURITY_LEVEL", -31405


class ProtocolError(P2PStoreError):
    """A peer sent bytes or messages that break the wire protocol."""

    name, code = "PROTOCOL_ERROR", -31410


class ChannelError(P2PStoreError):
    name, code = "CHANNEL_ERROR", -31411


# Sync.
class SyncInProgress(P2PStoreError):
    name, code = "SYNC_IN_PROGRESS", -31500


class SyncTimeout(P2PStoreError):
    name, code = "TIMEOUT", -31501


class FailureNotFound(P2PStoreError):
    name, code = "FAILURE_NOT_FOUND", -31502


class ResultTooLarge(P2PStoreError):
    """A query result over its row or byte cap (protocol/results.py), or a remote row bigger than a message."""

    name, code = "RESULT_TOO_LARGE", -31503


class RebuildRefused(P2PStoreError):
    """A rebuild would drop local changes no peer has acknowledged (store/rebuild.py)."""

    name, code = "REBUILD_REFUSED", -31504


class ReplicaMismatch(P2PStoreError):
    """The replica kinds of a link's two ends forbid the sync (protocol/replica_kind.py)."""

    name, code = "REPLICA_MISMATCH", -31505


class InConflict(P2PStoreError):
    """The store's manual-reconciliation queue is not empty: it sends nothing until it is (store/policies.py)."""

    name, code = "IN_CONFLICT", -31506


class ConflictNotFound(P2PStoreError):
    name, code = "CONFLICT_NOT_FOUND", -31507


def all_error_classes() -> list[type[P2PStoreError]]:
    """Every concrete error class, for the docs check and the API table."""
    seen: list[type[P2PStoreError]] = []
    stack: list[type[P2PStoreError]] = [P2PStoreError]
    while stack:
        cls = stack.pop()
        if cls not in seen:
            seen.append(cls)
            stack.extend(cls.__subclasses__())
    return seen


def by_name(name: str) -> type[P2PStoreError]:
    """The class for a stable error name (the client rebuilds errors with it)."""
    for cls in all_error_classes():
        # The base class shares INTERNAL_ERROR with InternalError; the concrete class wins.
        if cls.name == name and cls is not P2PStoreError:
            return cls
    return P2PStoreError
