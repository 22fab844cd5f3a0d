"""Identity resolution: one batch of events and the stored state it touches, turned into the writes to make."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from operator import attrgetter
from typing import Any

from google.protobuf.struct_pb2 import Struct, Value
from parley.common.v1.event_pb2 import Event, EventType

from services.common.db import dumps_json
from services.identity.phones import phone_time_zone

ANONYMOUS = "anonymous"
USER = "user"

# Traits key that holds the phone; on a contact it is kept in E.164.
PHONE_KEY = "phone"

IdentityKey = tuple[str, str]  # (kind, external id)

# Plain ints: comparing against the enum wrapper's attributes costs a lookup per event.
_ALIAS = int(EventType.EVENT_TYPE_ALIAS)
_IDENTIFY = int(EventType.EVENT_TYPE_IDENTIFY)


def event_time_us(event: Event) -> int:
    """The event's time in epoch microseconds: its skew-corrected timestamp, else when it was received."""
    # Ingest always sets the timestamp; the received_at wrapper is only made when it is missing.
    ts = event.timestamp
    seconds, nanos = ts.seconds, ts.nanos
    if not (seconds or nanos):
        ts = event.received_at
        seconds, nanos = ts.seconds, ts.nanos
    return seconds * 1_000_000 + nanos // 1000


# The most a contact's properties, or a user's traits, hold, as JSON. Each identify may carry 32
# KiB, and keys gather over events: without a bound one person could outgrow every response that
# holds it (gRPC refuses messages over 16 MiB), and the campaign and consent streams, which read
# the contacts of the events they follow, would stop on it for every workspace.
MAX_PROPERTIES_BYTES = 256 * 1024

_MISSING = object()


class Sized:
    """A property set's JSON size, worked out when first needed, and the keys refused for it."""

    __slots__ = ("bytes", "refused")

    def __init__(self) -> None:
        self.bytes = -1
        self.refused = 0


# A JSON number in exponent form: jsonb stores, and gives back, every number written out in full
# (1e300 as 301 digits), so its size is counted that way, and a value sizes the same before it is
# stored and after it is read back (a float past 2^64 comes back as an int).
_EXPONENT_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?[eE][-+]?[0-9]+")


def _json_bytes(value: Any) -> int:
    """``value``'s size as jsonb writes it out."""
    text = dumps_json(value)
    size = len(text)
    if b"e" in text or b"E" in text:
        for match in _EXPONENT_NUMBER.finditer(text):
            number = match.group()
            size += len(format(Decimal(number.decode()), "f")) - len(number)
    return size


def _entry_bytes(key: str, value: Any) -> int:
    # ``"key":value,`` as JSON writes it.
    return _json_bytes(key) + _json_bytes(value) + 2


# What a removed key's kept time costs: ``"key":<epoch µs>,`` in the set's times.
_TIME_BYTES = 19


def _removed_bytes(key: str) -> int:
    return _json_bytes(key) + _TIME_BYTES


def _footprint(key: str, value: Any, timed: bool) -> int:
    """A key's bytes in a set: its entry while it holds a value, else its kept time, if any."""
    if value is not _MISSING:
        return _entry_bytes(key, value)
    return _removed_bytes(key) if timed else 0


def _set_bytes(properties: dict[str, Any], times: dict[str, int]) -> int:
    """A set's size: its properties as JSON, and the kept times of the keys it removed."""
    size = _json_bytes(properties) if properties else 1  # 1 + each entry (braces, less a comma)
    for key in times:
        if key not in properties:
            size += _removed_bytes(key)
    return size


def merge_properties(
    properties: dict[str, Any],
    times: dict[str, int],
    changes: dict[str, Any],
    at: int,
    sized: Sized | None = None,
) -> bool:
    """Merge ``changes`` set at event time ``at`` into ``properties``, per key, newest time winning.

    A ``None`` value removes the key; its time is kept so an older value cannot bring it back.
    On equal times the later write wins. With ``sized``, a change that would take the set (its
    properties and the kept times of removed keys, ``_set_bytes``) past ``MAX_PROPERTIES_BYTES``
    is left out, counted in ``sized.refused``: a new or larger value, or the removal of a key the
    set does not hold (which only keeps a time). Removing a held key, shrinking one and the
    phone always apply. Keys go in sorted order then, so which of them fit never depends on the
    order a set's keys came in (a batch, or read back one by one). Returns whether anything changed.
    """
    changed = False
    for key in sorted(changes) if sized is not None else changes:
        value = changes[key]
        if at < times.get(key, -(2**63)):
            continue
        old = properties.get(key, _MISSING)
        if sized is not None and (value is None or old != value):
            # After the merge the key holds ``value``, or only its kept time.
            after = _MISSING if value is None else value
            grows = _footprint(key, after, True) - _footprint(key, old, key in times)
            if grows:
                if sized.bytes < 0:
                    sized.bytes = _set_bytes(properties, times)
                bounded = key != PHONE_KEY and not (value is None and old is not _MISSING)
                if grows > 0 and bounded and sized.bytes + grows > MAX_PROPERTIES_BYTES:
                    sized.refused += 1
                    continue
                sized.bytes += grows
        if times.get(key) != at:
            times[key] = at
            changed = True
        if value is None:
            if old is not _MISSING:
                del properties[key]
                changed = True
        elif old != value:
            properties[key] = value
            changed = True
    return changed


def merge_stamped(
    properties: dict[str, Any],
    times: dict[str, int],
    other: dict[str, Any],
    other_times: dict[str, int],
    *,
    contact: bool = True,
    sized: Sized | None = None,
) -> bool:
    """Merge another stamped property set (each key with its own time) into this one: a contact's
    properties, or with ``contact=False`` a user's traits."""
    changed = False
    for key in sorted(other_times) if sized is not None else other_times:
        at = other_times[key]
        if contact and key == PHONE_KEY:
            continue  # a contact's phone property is its own phone, never another contact's
        changed |= merge_properties(properties, times, {key: other.get(key)}, at, sized)
    return changed


_TIME = attrgetter("time_us")


@dataclass(slots=True)
class UserState:
    """A user as loaded (locked) from the database, or created by this batch."""

    key: uuid.UUID
    contact_id: uuid.UUID | None = None
    phone: str | None = None
    phone_time: int | None = None
    traits: dict[str, Any] = field(default_factory=dict)
    trait_times: dict[str, int] = field(default_factory=dict)
    identified: bool = False
    merged_into: uuid.UUID | None = None
    stored: bool = False
    dirty: bool = False
    sized: Sized = field(default_factory=Sized)


@dataclass(slots=True)
class ContactState:
    """A contact as loaded (locked) from the database, or created by this batch."""

    id: uuid.UUID
    phone: str
    properties: dict[str, Any] = field(default_factory=dict)
    property_times: dict[str, int] = field(default_factory=dict)
    phone_time_zone: str = ""
    stored: bool = False
    dirty: bool = False
    sized: Sized = field(default_factory=Sized)


@dataclass
class StoredState:
    """What the batch touches, read under the batch's locks."""

    identities: dict[IdentityKey, uuid.UUID]
    users: dict[uuid.UUID, UserState]
    contacts: dict[uuid.UUID, ContactState]
    # message_id -> current contact of events stored before this batch.
    existing: dict[str, uuid.UUID | None]


@dataclass(slots=True)
class NewEvent:
    """An event this batch stores."""

    index: int
    event: Event
    time_us: int
    # An identify's traits (from ``prepare``); None for other events.
    traits: dict[str, Any] | None = None
    user_key: uuid.UUID | None = None
    contact_id: uuid.UUID | None = None


@dataclass(slots=True)
class Outcome:
    """The per-request-event result: stored now (ACCEPTED) or before (DUPLICATE)."""

    duplicate: bool
    contact_id: uuid.UUID | None
    # For ACCEPTED: the event to store; for a duplicate within the batch: the one stored.
    new: NewEvent | None = None


@dataclass
class Plan:
    """Everything one batch writes, computed before any write."""

    outcomes: list[Outcome]
    # In event-time order, request order on ties.
    events: list[NewEvent]
    new_identities: list[tuple[str, str, uuid.UUID]]
    users: list[UserState]
    contacts: list[ContactState]
    # (original user key, contact): that user's stored events without a contact become the contact's.
    adopt: list[tuple[uuid.UUID, uuid.UUID]]
    # (user key joined, user key it joined): ids, events and contact links move over.
    merges: list[tuple[uuid.UUID, uuid.UUID]]
    contact_users: list[tuple[uuid.UUID, uuid.UUID]]


@dataclass
class Prepared:
    """A batch's events with everything that needs no lock worked out beforehand: done while
    an earlier batch holds the locks this one will wait for, not inside the transaction."""

    events: Sequence[Event]
    # Per event: its time (``event_time_us``), for an identify its traits as a dict, and the
    # ids it names (``identities_of``).
    times: list[int]
    traits: list[dict[str, Any] | None]
    event_ids: list[list[IdentityKey]]
    # The ids and phones the batch resolves: what it must lock and look up.
    ids: set[IdentityKey]
    phones: set[str]

    def part(self, indexes: Sequence[int]) -> Prepared:
        """The prepared batch of the events at ``indexes`` alone."""
        event_ids = [self.event_ids[i] for i in indexes]
        events = [self.events[i] for i in indexes]
        return Prepared(
            events,
            [self.times[i] for i in indexes],
            [self.traits[i] for i in indexes],
            event_ids,
            {k for keys in event_ids for k in keys},
            {e.phone for e in events if e.phone},
        )


def identities_of(e: Event) -> list[IdentityKey]:
    """The ids an event names, which resolution looks up and the batch locks."""
    ids: list[IdentityKey] = []
    if e.anonymous_id:
        ids.append((ANONYMOUS, e.anonymous_id))
    if e.user_id:
        ids.append((USER, e.user_id))
    if e.type == _ALIAS and e.previous_id:
        ids.append((ANONYMOUS, e.previous_id))
        ids.append((USER, e.previous_id))
    return ids


def prepare(events: Sequence[Event]) -> Prepared:
    """Everything about ``events`` that does not depend on stored state."""
    times = [event_time_us(e) for e in events]
    traits = [(struct_dict(e.traits) if e.HasField("traits") else {}) if e.type == _IDENTIFY else None for e in events]
    event_ids = [identities_of(e) for e in events]
    ids = {k for keys in event_ids for k in keys}
    return Prepared(events, times, traits, event_ids, ids, {e.phone for e in events if e.phone})


def struct_dict(struct: Struct) -> dict[str, Any]:
    """``struct`` as plain Python values, as ``json_format.MessageToDict`` gives them (numbers as
    floats) at a fraction of its cost: every identify's traits go through here. NaN and infinite
    numbers, which that refuses, never get here (``servicer._check_batch``)."""
    return {key: _plain(value) for key, value in struct.fields.items()}


def _plain(value: Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        return value.number_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_dict(value.struct_value)
    if kind == "list_value":
        return [_plain(v) for v in value.list_value.values]
    return None  # null_value, or no kind set (read as null, as MessageToDict does)


class _Resolver:
    def __init__(self, state: StoredState, new_id: Callable[[], uuid.UUID]) -> None:
        self.s = state
        self.new_id = new_id
        self.parent: dict[uuid.UUID, uuid.UUID] = {}
        # Per group root: original user keys whose stored events may still lack a contact.
        self.waiting_stored: dict[uuid.UUID, list[uuid.UUID]] = {}
        # Per group root: this batch's events still without a contact.
        self.waiting_new: dict[uuid.UUID, list[NewEvent]] = {}
        self.by_phone = {c.phone: c for c in state.contacts.values()}
        self.new_identities: list[tuple[str, str, uuid.UUID]] = []
        self.adopt: list[tuple[uuid.UUID, uuid.UUID]] = []
        self.merged: list[uuid.UUID] = []
        self.contact_users: set[tuple[uuid.UUID, uuid.UUID]] = set()
        for user in state.users.values():
            if user.contact_id is None:
                self.waiting_stored[user.key] = [user.key]

    def find(self, key: uuid.UUID) -> uuid.UUID:
        while key in self.parent:
            key = self.parent[key]
        return key

    def lookup(self, kind: str, external: str) -> uuid.UUID | None:
        key = self.s.identities.get((kind, external))
        return None if key is None else self.find(key)

    def register(self, kind: str, external: str, key: uuid.UUID) -> None:
        if (kind, external) not in self.s.identities:
            self.s.identities[(kind, external)] = key
            self.new_identities.append((kind, external, key))

    def new_user(self) -> UserState:
        user = UserState(key=self.new_id(), dirty=True)
        self.s.users[user.key] = user
        return user

    def give_contact(self, root: uuid.UUID, contact_id: uuid.UUID) -> None:
        """The group's first contact: everything it did so far becomes the contact's."""
        for key in self.waiting_stored.pop(root, []):
            if self.s.users[key].stored:
                self.adopt.append((key, contact_id))
        for ev in self.waiting_new.pop(root, []):
            ev.contact_id = contact_id
        self.contact_users.add((contact_id, root))

    def merge(self, gone_key: uuid.UUID, into_key: uuid.UUID) -> None:
        """Join user ``gone_key`` into ``into_key``: one person, one history."""
        gone, into = self.s.users[gone_key], self.s.users[into_key]
        self.parent[gone_key] = into_key
        self.merged.append(gone_key)
        gone.merged_into = into_key
        gone.dirty = into.dirty = True
        merge_stamped(into.traits, into.trait_times, gone.traits, gone.trait_times, contact=False, sized=into.sized)
        into.identified = into.identified or gone.identified
        if gone.contact_id is not None:
            self.contact_users.add((gone.contact_id, into_key))
        kept = into.contact_id
        if into.contact_id is None and gone.contact_id is not None:
            into.contact_id, into.phone, into.phone_time = gone.contact_id, gone.phone, gone.phone_time
            self.give_contact(into_key, gone.contact_id)
        elif gone.contact_id is None and into.contact_id is not None:
            self.waiting_stored[into_key] = self.waiting_stored.pop(gone_key, [])
            self.waiting_new[into_key] = self.waiting_new.pop(gone_key, [])
            self.give_contact(into_key, into.contact_id)
        else:
            if gone.contact_id is not None and (gone.phone_time or 0) > (into.phone_time or 0):
                into.contact_id, into.phone, into.phone_time = gone.contact_id, gone.phone, gone.phone_time
            self.waiting_stored.setdefault(into_key, []).extend(self.waiting_stored.pop(gone_key, []))
            self.waiting_new.setdefault(into_key, []).extend(self.waiting_new.pop(gone_key, []))
        if into.contact_id is None:
            return
        contact = self.s.contacts[into.contact_id]
        if into.contact_id == kept:
            # The survivor keeps its contact: the joined user's traits come to it. The survivor's
            # own are there already as far as they belong (a late identify with an older phone
            # kept its traits on that phone's contact).
            contact.dirty |= merge_stamped(
                contact.properties, contact.property_times, gone.traits, gone.trait_times, sized=contact.sized
            )
        else:
            # The survivor takes the joined user's contact, as with a first or newer phone: all of
            # the person's traits come with it.
            self.carry_traits(into, contact)

    def user_for(self, e: Event) -> UserState | None:
        # Each field read once: a protobuf attribute read costs about as much as the check made with it.
        user_id, anonymous_id = e.user_id, e.anonymous_id
        previous_id = e.previous_id if e.type == _ALIAS else ""
        ku = self.lookup(USER, user_id) if user_id else None
        ka = self.lookup(ANONYMOUS, anonymous_id) if anonymous_id else None
        key = ku
        anonymous_taken = False
        if ka is not None and ka != key:
            if key is None:
                # A known anonymous id of another identified user is not taken over by a new user id.
                if user_id and self.s.users[ka].identified:
                    anonymous_taken = True
                else:
                    key = ka
            elif not self.s.users[ka].identified:
                self.merge(ka, key)
            else:
                anonymous_taken = True
        if previous_id:
            kp = self.lookup(USER, previous_id) or self.lookup(ANONYMOUS, previous_id)
            if kp is not None and key is not None and kp != key:
                self.merge(kp, key)  # an alias joins whatever the previous id belonged to
            elif key is None:
                key = kp
        if key is None:
            if not (user_id or anonymous_id or previous_id):
                return None
            user = self.new_user()
            key = user.key
        else:
            user = self.s.users[key]
        if user_id:
            self.register(USER, user_id, key)
            if not user.identified:
                user.identified = user.dirty = True
        if anonymous_id and not anonymous_taken:
            self.register(ANONYMOUS, anonymous_id, key)
        if previous_id and (USER, previous_id) not in self.s.identities:
            if (ANONYMOUS, previous_id) not in self.s.identities:
                # An id never seen: it may have been a user id as well as an anonymous one
                # (Segment's previousId is either), so later events naming it as either join
                # this user instead of starting another person.
                self.register(USER, previous_id, key)
            self.register(ANONYMOUS, previous_id, key)
        return user

    def contact_for_phone(self, phone: str, zone: str) -> ContactState:
        contact = self.by_phone.get(phone)
        if contact is None:
            # Ingest sends the zone it found when it parsed the number; other callers may not.
            zone = zone or phone_time_zone(phone)
            contact = ContactState(id=self.new_id(), phone=phone, phone_time_zone=zone, dirty=True)
            self.by_phone[phone] = contact
            self.s.contacts[contact.id] = contact
        return contact

    def apply(self, ev: NewEvent) -> None:
        e, at = ev.event, ev.time_us
        user = self.user_for(e)
        ev.user_key = user.key if user else None
        contact: ContactState | None = None
        phone = e.phone
        if phone:
            contact = self.contact_for_phone(phone, e.phone_time_zone)
            if user is not None:
                self.contact_users.add((contact.id, user.key))
                if user.contact_id is None:
                    user.contact_id, user.phone, user.phone_time = contact.id, contact.phone, at
                    user.dirty = True
                    self.give_contact(user.key, contact.id)
                    self.carry_traits(user, contact)
                elif user.contact_id != contact.id:
                    # A newer phone makes the user's new contact; a late, older one does not.
                    if at >= (user.phone_time or 0):
                        user.contact_id, user.phone, user.phone_time = contact.id, contact.phone, at
                        user.dirty = True
                        self.carry_traits(user, contact)
                elif at > (user.phone_time or 0):
                    user.phone_time = at
                    user.dirty = True
            contact.dirty |= merge_properties(
                contact.properties, contact.property_times, {PHONE_KEY: phone}, at, contact.sized
            )
        elif user is not None and user.contact_id is not None:
            contact = self.s.contacts[user.contact_id]
        ev.contact_id = contact.id if contact else None
        if contact is None and user is not None:
            self.waiting_new.setdefault(user.key, []).append(ev)
        traits = ev.traits
        if traits:
            if user is not None:
                user.dirty |= merge_properties(user.traits, user.trait_times, traits, at, user.sized)
            if contact is not None:
                if PHONE_KEY in traits:
                    # A contact's phone property is its own number, set above when the event names
                    # it; an empty or null phone trait never reaches it. A copy: the prepared
                    # traits are read again if the batch is retried.
                    traits = {k: v for k, v in traits.items() if k != PHONE_KEY}
                contact.dirty |= merge_properties(contact.properties, contact.property_times, traits, at, contact.sized)

    def carry_traits(self, user: UserState, contact: ContactState) -> None:
        contact.dirty |= merge_stamped(
            contact.properties, contact.property_times, user.traits, user.trait_times, sized=contact.sized
        )


def resolve(
    events: Sequence[Event] | Prepared, state: StoredState, new_id: Callable[[], uuid.UUID] = uuid.uuid4
) -> Plan:
    """The writes that store ``events`` and resolve their users to contacts, given ``state``.

    Events are applied in event-time order (request order on ties), so a batch means the
    same as its events sent one by one in the order they happened. ``state`` is changed in place.
    """
    batch = events if isinstance(events, Prepared) else prepare(events)
    events, times, traits = batch.events, batch.times, batch.traits
    r = _Resolver(state, new_id)
    existing = state.existing
    outcomes: list[Outcome] = []
    first: dict[str, NewEvent] = {}
    fresh: list[NewEvent] = []
    for i, e in enumerate(events):
        message_id = e.message_id
        if message_id in existing:
            outcomes.append(Outcome(duplicate=True, contact_id=existing[message_id]))
        elif message_id in first:
            outcomes.append(Outcome(duplicate=True, contact_id=None, new=first[message_id]))
        else:
            ev = NewEvent(index=i, event=e, time_us=times[i], traits=traits[i])
            first[message_id] = ev
            fresh.append(ev)
            outcomes.append(Outcome(duplicate=False, contact_id=None, new=ev))
    # Stable: request order on equal times.
    fresh.sort(key=_TIME)
    for ev in fresh:
        r.apply(ev)
    # Merged-away keys resolve to the surviving user for everything written below.
    if r.parent:
        for ev in fresh:
            if ev.user_key is not None:
                ev.user_key = r.find(ev.user_key)
    for o in outcomes:
        if o.new is not None:
            o.contact_id = o.new.contact_id
    merges = [(k, r.find(k)) for k in r.merged if state.users[k].stored]
    for k in r.merged:
        state.users[k].merged_into = r.find(k)
    return Plan(
        outcomes=outcomes,
        events=fresh,
        new_identities=[(kind, ext, r.find(key)) for kind, ext, key in r.new_identities],
        users=[u for u in state.users.values() if u.dirty and (u.stored or u.merged_into is None)],
        contacts=[c for c in state.contacts.values() if c.dirty],
        adopt=r.adopt,
        merges=merges,
        contact_users=sorted({(c, r.find(k)) for c, k in r.contact_users}),
    )
