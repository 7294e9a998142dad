"""The local API's methods: a thin adapter from JSON-RPC params to the core.

Each handler is registered once in ``METHODS`` under its JSON-RPC name. Params
are checked against ``p2pstore/schemas/api.schema.json`` before a handler runs, so a
handler sees well-typed values; deeper checks (columns, predicates, names)
happen in the core and raise P2PStoreError subclasses, which the server turns
into JSON-RPC errors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import jsonschema

from p2pstore import __version__
from p2pstore.api.jsonrpc import Request, from_wire
from p2pstore.api.server import ClientConnection
from p2pstore.api.subscriptions import ChangeFeed, Subscriptions
from p2pstore.schemas import load_json_schema
from p2pstore.api.memory import TRIM_AFTER_BYTES, give_back_memory
from p2pstore.errors import DeviceOffline, InvalidParams, MethodNotFound, RebuildRefused, ReplicaMismatch, ResultTooLarge, SyncInProgress
from p2pstore.schema.sync_schema import validate_document
from p2pstore.store import accepted_schema, evolutions, policies, replicas, versions
from p2pstore.net.devices import DeviceDirectory
from p2pstore.net.identity import normalize_device_id
from p2pstore.sync.engine import Stats, SyncEngine, compile_where, policy_mismatches, revision_states, schema_mismatches
from p2pstore.sync.lag import store_lags
from p2pstore.sync.remote_query import RemoteQueries
from p2pstore.store.database import Store
from p2pstore.protocol.results import MAX_RESULT_BYTES
from p2pstore.store.registry import StoreRegistry
from p2pstore.store.tables import device_table_name
from p2pstore.protocol.replica_kind import ReplicaKind
from p2pstore.protocol.table_type import TableType

log = logging.getLogger(__name__)

Handler = Callable[["Api", ClientConnection, dict[str, Any]], Awaitable[Any]]
METHODS: dict[str, Handler] = {}


def method(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        METHODS[name] = fn
        return fn

    return register


@cache
def _validators() -> dict[str, jsonschema.Draft202012Validator]:
    doc = load_json_schema("api.schema.json")
    defs = doc["$defs"]
    return {
        name: jsonschema.Draft202012Validator({**schema, "$defs": defs})
        for name, schema in doc["methods"].items()
    }


def check_params(method_name: str, params: dict[str, Any]) -> None:
    validator = _validators().get(method_name)
    if validator is None:
        return
    error = jsonschema.exceptions.best_match(validator.iter_errors(params))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "params"
        raise InvalidParams(f"{method_name}: {where}: {error.message}", data={"param": where})


@dataclass(frozen=True, slots=True)
class DeviceSelf:
    """This device as the API reports it."""

    device_id: str
    name: str
    security_level: str
    port: int
    default_store: str = "default"


class Api:
    """Method handlers with their collaborators injected (no daemon object):
    each one is the real part, built before the Api (daemon.py)."""

    def __init__(
        self,
        *,
        device: Callable[[], DeviceSelf],
        registry: StoreRegistry,
        subscriptions: Subscriptions,
        feed: ChangeFeed,
        devices: DeviceDirectory,
        engine: SyncEngine,
        queries: RemoteQueries,
        max_result_bytes: int = MAX_RESULT_BYTES,
    ) -> None:
        #: This device as the API reports it; a call, as the peer port is known only once the channels listen.
        self.device = device
        self.registry = registry
        self.subscriptions = subscriptions
        self.feed = feed
        self.devices = devices
        self.engine = engine
        self.queries = queries
        self.max_result_bytes = max_result_bytes
        self.started = time.time()

    async def dispatch(self, client: ClientConnection, request: Request) -> Any:
        handler = METHODS.get(request.method)
        if handler is None:
            raise MethodNotFound(f"unknown method {request.method!r}", data={"method": request.method})
        check_params(request.method, request.params)
        return await handler(self, client, from_wire(request.params))

    def store(self, params: dict[str, Any]) -> Store:
        return self.registry.get(params.get("bundle", "default"), params["store"])


def _store_summary(store: Store) -> dict[str, Any]:
    return {
        "bundle": store.bundle,
        "store": store.name,
        "path": str(store.path),
        "security_level": f"S{store.security_label}",
        "table_type": store.table_type,
        "distributed_tables": sorted(store.distributed),
        "schema_version": store.sync_schema_version,
        # What stops a store from syncing, at a glance: a half-applied evolution, a reconciler's queue.
        "revision": store.revisions[-1][0] if store.revisions else 0,
        "inconsistent_revision": store.inconsistent[0] if store.inconsistent else None,
        "queued_conflicts": store.queued,
        "replicas": [link.to_dict() for link in sorted(store.replicas.values(), key=lambda x: x.peer)],
    }


@method("device.info")
async def device_info(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    me = api.device()
    return {"device_id": me.device_id, "name": me.name, "security_level": me.security_level, "port": me.port, "version": __version__,
            "default_store": me.default_store}


@method("status")
async def status(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    info = await device_info(api, client, params)
    devices = await _device_dicts(api, api.devices)
    return {"device": info, "uptime_s": round(time.time() - api.started, 1),
            "stores": [_store_summary(s) for s in api.registry.stores()], "devices": devices,
            "traffic": api.engine.traffic.totals()}


@method("store.open")
async def store_open(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    label = params.get("security_level")
    store = await api.registry.open(params.get("bundle", "default"), params["store"], int(label[1]) if label else None)
    return {"store": store.name, "bundle": store.bundle, "path": str(store.path), "security_level": f"S{store.security_label}"}


@method("store.close")
async def store_close(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    key = (params.get("bundle", "default"), params["store"])
    await api.registry.close(*key)
    api.subscriptions.drop_store(key)
    return {}


@method("store.backup")
async def store_backup(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    """A consistent copy of an open store, made by the daemon while it runs (docs/operations.md)."""
    return await api.store(params).backup(Path(params["path"]))


@method("store.sync_log")
async def store_sync_log(api: Api, client: ClientConnection, params: dict[str, Any]) -> list[dict[str, Any]]:
    device = normalize_device_id(params["device"]) if "device" in params else None
    return await api.store(params).sync_log(params.get("limit", 100), device)


# -- evolutions (store/evolutions.py; docs/api.md "Evolutions") --------------------


async def _scripts(api: Api, params: dict[str, Any]) -> tuple[Store, Path, list[evolutions.Evolution]]:
    store = api.store(params)
    directory = api.registry.evolutions_dir(store.bundle, store.name)
    return store, directory, await asyncio.to_thread(evolutions.load_dir, directory)


@method("evolutions.status")
async def evolutions_status(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    store, directory, scripts = await _scripts(api, params)
    revisions = await store.evolutions_status(scripts)
    return {"directory": str(directory), "inconsistent": any(r.state.startswith("applying_") for r in revisions),
            "revisions": [{"id": r.id, "description": r.description, "state": r.state, "hash": r.hash, "stored_hash": r.stored_hash,
                           "applied_at": r.applied_at, "last_problem": r.last_problem} for r in revisions]}


@method("evolutions.apply")
async def evolutions_apply(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    store, _, scripts = await _scripts(api, params)
    return {"applied": await store.apply_evolutions(scripts, params.get("up_to"))}


@method("evolutions.mark_applied")
async def evolutions_mark_applied(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    store, _, scripts = await _scripts(api, params)
    await store.mark_evolution_applied(scripts, params["revision"])
    return {"revision": params["revision"], "state": evolutions.APPLIED}


@method("evolutions.resolve")
async def evolutions_resolve(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    return {"revision": params["revision"], "state": await api.store(params).resolve_evolution(params["revision"])}


@method("evolutions.log")
async def evolutions_log(api: Api, client: ClientConnection, params: dict[str, Any]) -> list[dict[str, Any]]:
    return await api.store(params).evolutions_log()


# -- versions (store/versions.py; docs/api.md "Versions") -------------------------


@method("versions.list")
async def versions_list(api: Api, client: ClientConnection, params: dict[str, Any]) -> list[dict[str, Any]]:
    return await api.store(params).versions()


@method("versions.diff")
async def versions_diff(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    """Between two versions (``from``, ``to``; no ``to``: the schema now), or
    between this device's distributed tables and what ``device`` offers of
    the store (its sync schema; column types do not travel)."""
    store = api.store(params)
    if "device" in params:
        if "from" in params or "to" in params:
            raise InvalidParams("versions.diff: params: give from (and to) or device, not both", data={"param": "device"})
        peer = normalize_device_id(params["device"])
        api.devices.check_may_receive(peer, store)  # a device the store may not reach is not shown it, nor compared
        info = api.devices.peers.peer_info(peer)
        offered = api.engine.peer_view(peer, info.hello.stores if info is not None and info.hello else ()).get((store.bundle, store.name))
        if offered is None:
            raise DeviceOffline(f"device {peer} has not offered store {store.bundle}/{store.name} (offline, or the store is not open "
                                "with distributed tables there)", data={"device_id": peer, "store": store.name})
        theirs = {t.name: {"sync_columns": list(t.sync_columns), "conflict_column": t.conflict_column} for t in offered.values()}
        return {"device": peer, **versions.diff_sync(await store.sync_view(), theirs)}
    if "from" not in params:
        raise InvalidParams("versions.diff: params: 'from' is a required property (or 'device')", data={"param": "from"})
    return {"from": params["from"], "to": params.get("to"), **await store.versions_diff(params["from"], params.get("to"))}


@method("store.execute")
async def store_execute(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    return await api.store(params).execute(params["sql"], params.get("params"))


@method("store.query")
async def store_query(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    try:
        return await api.store(params).query(params["sql"], params.get("params"), max_bytes=api.max_result_bytes)
    except ResultTooLarge as exc:
        _given_up(exc)
        raise


@method("store.insert")
async def store_insert(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    return {"rowid": await api.store(params).insert(params["table"], params["values"])}


@method("store.update")
async def store_update(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    return {"rows_affected": await api.store(params).update(params["values"], params["predicates"])}


@method("store.delete")
async def store_delete(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    return {"rows_affected": await api.store(params).delete(params["predicates"])}


@method("store.set_distributed_tables")
async def store_set_distributed_tables(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    store = api.store(params)
    config = params.get("config", {})
    # Check the per-bundle limit and set the tables under one lock, so
    # concurrent calls on different stores can't all pass the check.
    async with api.registry.distributing(store):
        if config.get("table_type") == TableType.SINGLE_VERSION:
            # Reads sync_schema.json; the result carries the accepted version and its warnings.
            outcome = await accepted_schema.set_tables(
                store, params["tables"], auto_sync=config.get("auto_sync", False), schema_path=api.registry.sync_schema_path
            )
            return outcome.to_result()
        await store.set_distributed_tables(
            params["tables"],
            table_type=config.get("table_type", TableType.COLLABORATIVE),
            auto_sync=config.get("auto_sync", False),
        )
    return {}


@method("store.distributed_table_name")
async def store_distributed_table_name(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    store = api.store(params)
    store.require_distributed(params["table"])
    if store.table_type != TableType.COLLABORATIVE:
        raise InvalidParams("distributed_table_name applies to collaborative tables only; single-version rows merge into the table itself")
    return {"table": device_table_name(params["device"], params["table"])}


@method("store.subscribe")
async def store_subscribe(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    store = api.store(params)
    sub = api.subscriptions.subscribe(client.outbox, (store.bundle, store.name), params["type"])
    return {"subscription": sub}


@method("store.unsubscribe")
async def store_unsubscribe(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    store = api.store(params)
    api.subscriptions.unsubscribe(client.outbox, (store.bundle, store.name), params["subscription"])
    return {}


@method("schema.validate")
async def schema_validate(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    """``document`` is the file's text (a JSON string) or its JSON value. A
    bad document is an answer (``valid: false``), never an error."""
    if "store" in params:
        report = await api.store(params).check_sync_schema(params["document"])
    else:
        # Up to 1 MiB of JSON Schema checks: off the event loop.
        report = await asyncio.to_thread(
            validate_document, params["document"], bundle=params.get("bundle"), document_rules=True
        )
    return report.to_dict()


@method("devices.list")
async def devices_list(api: Api, client: ClientConnection, params: dict[str, Any]) -> list[dict[str, Any]]:
    return await _device_dicts(api, api.devices)


async def _device_dicts(api: Api, directory: DeviceDirectory) -> list[dict[str, Any]]:
    """Device views plus, for online peers, where their sync schema differs
    from ours, and for trusted ones their lag per store (sync/lag.py)."""
    result = []
    for view in directory.list():
        entry = view.to_dict()
        info = directory.peers.peer_info(view.device_id)
        hello = info.hello if info is not None else None
        seen = api.engine.peer_view(view.device_id, hello.stores if hello else ())
        entry["schema_mismatches"] = schema_mismatches(api.registry.stores(), seen)
        entry["policy_mismatches"] = policy_mismatches(api.registry.stores(), seen)
        entry["evolutions"] = revision_states(api.registry.stores(), api.engine.peer_revisions.get(view.device_id, {}))
        entry["stores"] = await store_lags(api.engine.lag, api.registry.stores(), view.device_id, seen) if view.trusted else []
        entry["traffic"] = api.engine.traffic.peer_dict(view.device_id)
        result.append(entry)
    return result


@method("devices.trust")
async def devices_trust(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    """One device (``device_id``, ``name``) or a list (``devices``), trusted in one trust-file write.

    The schema checks each field; which of the two forms is given is checked
    here, where the message can say so plainly."""
    if "devices" in params:
        if "device_id" in params or "name" in params:
            raise InvalidParams("devices.trust: params: give device_id (and name) or devices, not both",
                                data={"param": "devices"})
        entries = [(e["device_id"], e.get("name")) for e in params["devices"]]
        return {"device_ids": api.devices.trust_many(entries)}
    if "device_id" not in params:
        raise InvalidParams("devices.trust: params: 'device_id' is a required property (or 'devices', a list)",
                            data={"param": "device_id"})
    return {"device_id": api.devices.trust(params["device_id"], params.get("name"))}


@method("devices.untrust")
async def devices_untrust(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    return {"device_id": api.devices.untrust(params["device_id"])}


@method("devices.subscribe")
async def devices_subscribe(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    """deviceChange notifications: a device came online, went offline, or was (un)trusted."""
    return {"subscription": api.subscriptions.subscribe(client.outbox, None, "devices")}


@method("devices.unsubscribe")
async def devices_unsubscribe(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    api.subscriptions.unsubscribe(client.outbox, None, params["subscription"])
    return {}


@method("store.sync")
async def store_sync(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    """Push or pull; the caller gets syncProgress notifications while it runs."""
    store = api.store(params)

    def progress(schedule: str, code: int, stats: Stats, direction: str) -> None:
        details = {table: {direction: {"total": n, "successful": n, "failed": 0, "remained": 0}}
                   for table, n in stats.tables.items()}
        if stats.failed:
            details.setdefault("*", {})[direction] = {"total": stats.sent, "successful": stats.sent - stats.failed,
                                                      "failed": stats.failed, "remained": 0}
        client.outbox.notify("syncProgress", {"store": store.name, "bundle": store.bundle, "schedule": schedule,
                                              "code": int(code), "details": details})

    results = await api.engine.sync(store, params["mode"], params.get("predicates"), progress, refresh=params.get("refresh", False))
    return {"results": results}


@method("store.rebuild")
async def store_rebuild(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    """Drop this device's copy of a distributed table and pull the store
    from every online trusted peer (store/rebuild.py). Only with
    ``yes_destroy_local_data: true``; refused while local changes are unsent."""
    store = api.store(params)
    if params.get("yes_destroy_local_data") is not True:
        raise RebuildRefused("store.rebuild drops this device's copy of the table: pass yes_destroy_local_data: true "
                             "(CLI --yes-destroy-local-data)", data={"param": "yes_destroy_local_data"})
    dropped = await store.rebuild_table(params["table"])
    try:
        results = await api.engine.sync(store, "pull", None)
    except SyncInProgress:
        results = []  # the running sync, anti-entropy or the next pull brings the rows back
    return {"table": params["table"], "dropped_tables": list(dropped.tables), "dropped_rows": dropped.rows, "results": results}


# -- replica links (store/replicas.py; docs/replicas.md) ------------------------


def _link_dict(store: Store, link: replicas.Link) -> dict[str, Any]:
    return {"store": store.name, "bundle": store.bundle, **link.to_dict()}


@method("replica.set")
async def replica_set(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    """This device's end of the link with ``peer`` for a store: two-way (the
    default), send or receive. The other device sets its own end; a session
    between ends that do not agree answers REPLICA_MISMATCH."""
    store = api.store(params)
    link = replicas.Link(normalize_device_id(params["peer"]), ReplicaKind(params["kind"]))
    await store.set_replica(link)
    return _link_dict(store, store.replica(link.peer))


@method("replica.list")
async def replica_list(api: Api, client: ClientConnection, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Every link that is not two-way, of one store or of every open store."""
    stores = [api.store(params)] if "store" in params else api.registry.stores()
    return [_link_dict(s, link) for s in stores for link in sorted(s.replicas.values(), key=lambda x: x.peer)]


@method("store.checkout")
async def store_checkout(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    """Check out selected rows from ``device`` (a parent whose end stays
    two-way): record the checkout link and pull them; edits are allowed here
    and go back once with ``store.checkin``."""
    store = api.store(params)
    peer = normalize_device_id(params["device"])
    current = store.replica(peer)
    if current.kind not in (ReplicaKind.TWO_WAY, ReplicaKind.CHECKOUT):
        raise ReplicaMismatch(f"the link with {peer} for store {store.name} is {current.kind}; set it two-way before a checkout",
                              data={"device_id": peer, "kind": current.kind.value})
    where = params.get("where")
    predicates = {"devices": [peer], **({"table": params["table"]} if "table" in params else {}), **({"where": where} if where else {})}
    compile_where(store, params.get("table"), where)  # a bad filter fails here, before the link is recorded
    await store.set_replica(replicas.Link(peer, ReplicaKind.CHECKOUT, params.get("table"), json.dumps(where) if where else None))
    results = await api.engine.sync(store, "pull", predicates)
    return {"device": peer, "results": results, "link": _link_dict(store, store.replica(peer))}


@method("store.checkin")
async def store_checkin(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    """Push a checkout's edits back to its parent, once: on success the link closes."""
    store = api.store(params)
    links = [link for link in store.replicas.values() if link.kind is ReplicaKind.CHECKOUT
             and ("device" not in params or link.peer == normalize_device_id(params["device"]))]
    open_links = [link for link in links if not link.closed]
    if len(open_links) != 1:
        why = ("its checkout was already checked in: the link is closed" if links and not open_links
               else "there is no open checkout" if not links else "there are several open checkouts: say which device")
        raise ReplicaMismatch(f"store {store.name}: {why}", data={"store": store.name})
    link = open_links[0]
    predicates: dict[str, Any] = {"devices": [link.peer]}
    if link.table is not None:
        predicates["table"] = link.table
    if link.filter is not None:
        predicates["where"] = json.loads(link.filter)
    results = await api.engine.sync(store, "push", predicates)
    if all(r["code"] == 0 for r in results):
        await store.set_replica(replace(link, closed=True, at=0))
    return {"device": link.peer, "results": results, "link": _link_dict(store, store.replica(link.peer))}


@method("store.sync_failures")
async def store_sync_failures(api: Api, client: ClientConnection, params: dict[str, Any]) -> list[dict[str, Any]]:
    failures = await api.store(params).sync_failures(params.get("limit", 100))
    return [
        {"id": f.id, "origin": f.origin, "table": f.table, "reason": f.reason, "at": f.at,
         "change": _change_dict(f.change)}
        for f in failures
    ]


@method("store.conflicts")
async def store_conflicts(api: Api, client: ClientConnection, params: dict[str, Any]) -> list[dict[str, Any]]:
    found = await api.store(params).conflicts(params.get("table"), params.get("limit", 100))
    return [
        {"id": c.id, "table": c.table, "key": c.key, "column": c.column, "losing_value": c.losing_value,
         "winner": c.winner, "winner_hlc": c.winner_hlc, "loser": c.loser, "loser_hlc": c.loser_hlc, "at": c.at,
         "kind": "value" if c.other_column is None else "row", "other_column": c.other_column}
        for c in found
    ]


@method("store.clear_conflicts")
async def store_clear_conflicts(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    return {"cleared": await api.store(params).clear_conflicts(params.get("up_to"), params.get("table"))}


@method("conflicts.policy")
async def conflicts_policy(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    """A single_version table's conflict policy here (store/policies.py); every device must set the same."""
    store = api.store(params)
    kind, detect = params["policy"], params.get("detect", policies.COLUMN)
    # The param each kind needs, and what it names; no other kind takes it.
    needs = {policies.MANUAL: ("reconciler", "the device that resolves conflicts"),
             policies.PRIORITY: ("devices", "the devices it favours, strongest first")}
    for owner, (param, what) in needs.items():
        if (kind == owner) != (param in params):
            problem = f"{kind} needs {param} ({what})" if kind == owner else f"{param} goes with the {owner} policy, not {kind}"
            raise InvalidParams(f"conflicts.policy: params: {problem}", data={"param": param})
    if kind == policies.MANUAL:
        policy = policies.Policy(kind, normalize_device_id(params["reconciler"]), detect)
    elif kind == policies.PRIORITY:
        devices = tuple(normalize_device_id(d) for d in params["devices"])
        if len(set(devices)) != len(devices):
            raise InvalidParams("conflicts.policy: params: devices: a device is listed twice", data={"param": "devices"})
        policy = policies.Policy(kind, None, detect, devices)
    else:
        policy = policies.Policy(policies.LWW, None, detect)
    await store.set_policy(params["table"], policy)
    return {"store": store.name, "bundle": store.bundle, "table": params["table"], **policy.to_dict()}


@method("conflicts.queue")
async def conflicts_queue(api: Api, client: ClientConnection, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Changes queued on this reconciler, oldest first, each with an ``id`` to resolve."""
    return await api.store(params).conflict_queue(params.get("limit", 100))


@method("conflicts.resolve")
async def conflicts_resolve(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    """Settle one queued change: keep the local value, take the remote one, or write ``value``."""
    if (params["take"] == "value") != ("value" in params):
        raise InvalidParams("conflicts.resolve: params: give value with take: value (and only then)", data={"param": "value"})
    store = api.store(params)
    done = await store.resolve_queued(params["id"], params["take"], params.get("value"))
    api.engine.on_local_changes(store, [done["table"]])  # auto-sync takes the resolution to the peers
    return done


@method("store.retry_failure")
async def store_retry_failure(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    store = api.store(params)
    result = await store.retry_failure(params["id"])
    api.feed.on_applied(store, "", result)
    return {"applied": result.applied, "failed": result.failed, "conflicts": result.conflicts}


@method("store.discard_failure")
async def store_discard_failure(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    await api.store(params).discard_failure(params["id"])
    return {}


def _change_dict(change: Any) -> dict[str, Any] | None:
    if change is None:
        return None
    return {
        "table": change.table, "key_column": change.key_column, "key": change.key,
        "values": {c.column: c.value for c in change.cells},
        "deleted": change.tomb_hlc is not None and not change.cells,
    }


@method("store.remote_query")
async def store_remote_query(api: Api, client: ClientConnection, params: dict[str, Any]) -> dict[str, Any]:
    """Rows of ``device``'s copy of ``table``; the device checks trust, level and columns."""
    store = api.store(params)
    store.require_distributed(params["table"])
    device = normalize_device_id(params["device"])
    try:
        return await api.queries.query(store, device, params["table"], params.get("predicates"), params.get("columns"))
    except ResultTooLarge as exc:
        _given_up(exc)
        raise


def _given_up(exc: ResultTooLarge) -> None:
    """A result was dropped at its cap: what it had read is freed now, give it back."""
    if exc.data.get("max_bytes", 0) >= TRIM_AFTER_BYTES:
        exc.__traceback__ = None  # its frames held the rows read so far
        give_back_memory()
