"""Named lists of latents with a note per latent: create, add, remove, export."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from app.store.models import Latent, LatentList, ListItem, Sae


def all_lists(session: Session) -> list[LatentList]:
    return list(session.scalars(select(LatentList).options(selectinload(LatentList.items))
                                .order_by(LatentList.id.desc())))


def get_list(session: Session, list_id: int) -> LatentList | None:
    return session.get(LatentList, list_id, options=[selectinload(LatentList.items)])


def create_list(sessions: sessionmaker[Session], name: str, description: str = "") -> int:
    with sessions.begin() as session:
        made = LatentList(name=name, description=description)
        session.add(made)
        session.flush()
        return made.id


def add_item(sessions: sessionmaker[Session], list_id: int, sae_id: int, index: int,
             note: str = "") -> None:
    """Add a latent (or update its note when it is already on the list); ValueError names
    what does not exist."""
    with sessions.begin() as session:
        if session.get(LatentList, list_id) is None:
            raise LookupError(f"there is no list {list_id}")
        sae = session.get(Sae, sae_id)
        if sae is None or not 0 <= index < sae.n_latents:
            raise ValueError(f"SAE {sae_id} has no latent {index}")
        item = session.scalars(select(ListItem).where(
            ListItem.list_id == list_id, ListItem.sae_id == sae_id,
            ListItem.latent_index == index)).one_or_none()
        if item is None:
            session.add(ListItem(list_id=list_id, sae_id=sae_id, latent_index=index,
                                 note=note))
        else:
            item.note = note


def remove_item(sessions: sessionmaker[Session], list_id: int, item_id: int) -> None:
    with sessions.begin() as session:
        session.execute(delete(ListItem).where(ListItem.id == item_id,
                                               ListItem.list_id == list_id))


def list_rows(session: Session, latent_list: LatentList) -> list[dict[str, Any]]:
    """Each item with its SAE's name, model and layer and the latent's explanation."""
    saes = {s.id: s for s in session.scalars(select(Sae).options(selectinload(Sae.model))
                                             .where(Sae.id.in_({i.sae_id for i in
                                                                latent_list.items})))}
    rows = []
    for item in latent_list.items:
        sae = saes[item.sae_id]
        latent = session.scalars(select(Latent.explanation).where(
            Latent.sae_id == item.sae_id, Latent.index == item.latent_index)).first()
        rows.append({"id": item.id, "sae_id": sae.id, "sae": sae.name,
                     "model": sae.model.name, "layer": sae.layer, "index": item.latent_index,
                     "note": item.note, "explanation": latent})
    return rows


def export_list(session: Session, latent_list: LatentList) -> dict[str, Any]:
    """The list as saelab JSON (what it holds, with each latent's label and note)."""
    return {"format": "saelab-list", "version": 1, "name": latent_list.name,
            "description": latent_list.description, "items": list_rows(session, latent_list)}


def neuronpedia_list(session: Session, latent_list: LatentList) -> dict[str, Any]:
    """The list in Neuronpedia's list/quick-list shape: ``modelId``, ``layer`` (the source
    id, ``<layer>-saelab-<sae id>`` for SAEs that live here) and ``index`` as a string, with
    the note as ``description``."""
    return {"name": latent_list.name, "description": latent_list.description,
            "features": [{"modelId": row["model"],
                          "layer": f"{row['layer']}-saelab-{row['sae_id']}",
                          "index": str(row["index"]), "description": row["note"]}
                         for row in list_rows(session, latent_list)]}
