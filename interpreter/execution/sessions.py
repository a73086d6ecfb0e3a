"""Which session a run belongs to (DESIGN §6).

The first rule that finds a live session of the same principal *and* the same ``user_id`` wins:
the explicit ``session_id``, the ``runtime_session_hint``, the session of a referenced file (run
sessions only: an upload session is shared storage, and continuing it would merge conversations),
the ``entity_id``; otherwise a new session. An unknown, expired or foreign id simply matches nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from interpreter.files.catalog import Catalog, Session


@dataclass(frozen=True)
class Resolved:
    session: Session
    status: Literal["new", "reused"]


async def resolve_session(
    catalog: Catalog,
    owner: str,
    *,
    user_id: str | None,
    session_id: str | None = None,
    hint: str | None = None,
    file_session_ids: Iterable[str] = (),
    entity_id: str | None = None,
) -> Resolved:
    found = await _find(catalog, owner, user_id, session_id, hint, file_session_ids, entity_id)
    if found is None:
        session = await catalog.create_session(owner, "exec", user_id=user_id, entity_id=entity_id)
        status: Literal["new", "reused"] = "new"
    else:
        session, status = found, "reused"
        await catalog.touch(session)
    # The hint and the entity now lead here (first use creates the mapping, later uses refresh it).
    if hint:
        await catalog.link(session, "hint", hint)
    if entity_id:
        await catalog.link(session, "entity", entity_id)
    return Resolved(session, status)


async def _find(
    catalog: Catalog, owner: str, user_id: str | None, session_id: str | None, hint: str | None,
    file_session_ids: Iterable[str], entity_id: str | None,
) -> Session | None:  # fmt: skip
    def same_user(session: Session | None) -> bool:
        return session is not None and session.user_id == user_id

    candidate = await catalog.session(owner, session_id)
    if same_user(candidate):
        return candidate
    if hint:
        candidate = await catalog.linked(owner, "hint", user_id, hint)
        if same_user(candidate):
            return candidate
    for file_session_id in dict.fromkeys(file_session_ids):
        candidate = await catalog.session(owner, file_session_id)
        if same_user(candidate) and candidate is not None and candidate.kind == "exec":
            return candidate
    if entity_id:
        candidate = await catalog.linked(owner, "entity", user_id, entity_id)
        if same_user(candidate):
            return candidate
    return None
