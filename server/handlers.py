"""The client-facing protocol on the server: what each message a client sends does.

``ClientMessages.handle`` decodes a message (``shared/protocol.py``), finds the session it names
(honoured only from the connection that opened it: its routing id, and with CURVE its public
key), acts on it through the sessions, the catalog, the leases and the scheduler, and answers
through the outbox; anything refused is one ERROR with a typed code (and a rate-limited log
line), never an exception out of here.

- HELLO: a session (within the connection's and the server's limits), checked against the data
  and sized, and WELCOME naming the data (its fingerprint, the transform) and, for the fast
  path, the ring and a challenge;
- CLAIM: the challenge signed with the ring's key gets the session's lease table (GRANT);
- REQUEST, RELEASE, PING, BYE, STATS.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections import Counter
from collections.abc import Callable

from batchfeed.shared import protocol
from batchfeed.shared.errors import BatchfeedError, ProtocolError
from batchfeed.shared.plan import PlanParams
from batchfeed.shared.schema import schema_to_wire
from batchfeed.shared.shm import claim_proof
from batchfeed.shared.version import __version__

from .catalog import Catalog
from .config import ServerConfig
from .leases import Leases
from .outbox import Outbox
from .ratelog import RateLimitedLog
from .ring import SlotRing
from .scheduler import Scheduler
from .session import Owner, new_session
from .session_table import MAX_REPORTED, SessionTable
from .sizing import size_session
from .transform_runner import Transform

log = logging.getLogger("batchfeed.server")


class ClientMessages:
    def __init__(self, config: ServerConfig, catalog: Catalog, sessions: SessionTable,
                 leases: Leases, ring: SlotRing, scheduler: Scheduler,
                 transforms: dict[str, Transform], outbox: Outbox,
                 describe: Callable[[], dict], counters: Counter[str], errors: Counter[str],
                 ratelog: RateLimitedLog):
        self.config = config
        self.catalog = catalog
        self.sessions = sessions
        self.leases = leases
        self.ring = ring
        self.scheduler = scheduler
        self.transforms = transforms
        self.outbox = outbox
        self.describe = describe  # the server's report, for STATS
        self.counters = counters
        self.errors = errors
        self.log = ratelog

    def handle(self, owner: Owner, frames: list) -> None:
        """One message from the connection ``owner``: decoded, acted on, answered (an ERROR
        for anything refused)."""
        self.counters["messages"] += 1
        session_id = None
        try:
            msg = protocol.decode(frames)
            session_id = msg.header.get("session")
            handler = self._handlers.get(msg.kind)
            if handler is None:
                raise ProtocolError(f"a server does not accept {msg.kind} messages")
            handler(self, owner, msg.header)
        except BatchfeedError as exc:
            self.errors[exc.code] += 1
            self.log.log(logging.INFO, exc.code, "refused a client message (%s): %s", exc.code,
                         exc)
            session = session_id if type(session_id) is int else None
            self.outbox.send(owner[0], protocol.error(exc.code, str(exc), session=session))

    def _on_hello(self, owner: Owner, h: dict) -> None:
        self.sessions.check_room(owner)  # before any work: a peer past its limit costs nothing
        params = PlanParams.from_wire(h["params"])
        dataset = self.catalog.dataset(h["dataset"])
        plan = self.catalog.plan(dataset, params, self.config.max_order_bytes)
        fields = self.catalog.served_fields(dataset, plan)
        sizing = size_session(self.catalog.estimate(dataset, plan), h["prefetch"],
                              self.ring.slot_bytes, self.config.chunk_bytes)
        session = new_session(owner, dataset, plan, sizing, name=h["name"] or "",
                              challenge=secrets.token_hex(16) if h["fastpath"] else "")
        self.sessions.open(session, h["resume"], h["resume_secret"])
        self.counters["sessions"] += 1
        log.info("session %x (%s) from %s: %s on %s", session.id, session.label,
                 session.name or "?", params, dataset.name)
        transform = self.transforms.get(dataset.name)
        self.outbox.send(owner[0], protocol.welcome(
            session=session.id,
            secret=session.secret,
            dataset=dataset.name,
            rows=dataset.rows,
            batches_per_epoch=plan.batches_per_epoch,
            prefetch=sizing.prefetch,
            fields=schema_to_wire(fields),
            server=__version__,
            units=plan.epoch_rows if params.units != "rows" else None,
            shard=list(dataset.shard) if dataset.shard is not None else None,
            classes=list(dataset.classes) or None,
            fingerprint=dataset.fingerprint.to_wire() if dataset.fingerprint else None,
            transform=transform.name if transform is not None else None,
            ring=self.ring.describe() if session.challenge else None,
            challenge=session.challenge or None,
        ))

    def _on_claim(self, owner: Owner, h: dict) -> None:
        """A fast-path CLAIM: proved (the challenge signed with the ring's key), it gets the
        session's lease table, once; otherwise the session goes on over the socket."""
        s = self.sessions.find(h["session"], owner)
        challenge, s.challenge = s.challenge, ""  # one attempt per session
        if not challenge or not hmac.compare_digest(h["proof"],
                                                    claim_proof(self.ring.key, challenge)):
            self.counters["claims_refused"] += 1
            self.log.log(logging.WARNING, "claim", "session %s: a fast-path claim without the "
                         "proof of shared memory was refused; its batches keep coming over "
                         "the socket", s.label)
            return
        s.table = self.leases.grant()
        if s.table is None:
            return  # no room for a table: the socket it is
        self.outbox.send(owner[0], protocol.grant(session=s.id, table=s.table.name))
        log.info("session %x (%s): fast path granted", s.id, s.label)

    def _on_stats(self, owner: Owner, h: dict) -> None:
        self.outbox.send(owner[0], protocol.report(self.describe(),
                                                   self.sessions.describe(MAX_REPORTED)))

    def _on_request(self, owner: Owner, h: dict) -> None:
        s = self.sessions.find(h["session"], owner)
        if s.table is not None:
            self.leases.collect(s.table)
        s.trainer_at(h["at"])
        if s.request(h["stream"], h["epoch"], h["k0"], h["count"]):
            self.scheduler.wake(s)

    def _on_release(self, owner: Owner, h: dict) -> None:
        s = self.sessions.find(h["session"], owner)
        if s.table is not None:
            self.leases.collect(s.table)

    def _on_ping(self, owner: Owner, h: dict) -> None:
        if h["session"] is not None:
            self.sessions.find(h["session"], owner).trainer_at(h["at"])
        self.outbox.send(owner[0], protocol.pong())

    def _on_bye(self, owner: Owner, h: dict) -> None:
        s = self.sessions.find(h["session"], owner)
        self.sessions.close(s, "said bye")
        self.outbox.send(owner[0], protocol.pong(s.id))  # nothing of the session follows this

    _handlers = {
        protocol.HELLO: _on_hello,
        protocol.CLAIM: _on_claim,
        protocol.REQUEST: _on_request,
        protocol.RELEASE: _on_release,
        protocol.PING: _on_ping,
        protocol.BYE: _on_bye,
        protocol.STATS: _on_stats,
    }
