"""Lists of latents: the index (and a form to start one), a list's page with notes, adding
a latent from the feature, probe and search views, and exports (saelab JSON, Neuronpedia's
list format). Changing a list needs the admin token when one is set."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from app.store import lists as store
from app.web.deps import RenderDep, SessionDep
from app.web.security import require_admin

router = APIRouter(include_in_schema=False)
Name = Annotated[str, Form(min_length=1, max_length=200)]
Note = Annotated[str, Form(max_length=2000)]


@router.get("/lists")
def lists_page(request: Request, session: SessionDep, render: RenderDep,
               sae: int | None = None, index: int | None = None) -> Response:
    """Every list; ``?sae=&index=`` offers to add that latent to one of them."""
    return render(request, "lists.html", {"lists": store.all_lists(session),
                                          "adding": (sae, index) if sae and index is not None
                                          else None})


@router.post("/lists", dependencies=[Depends(require_admin)])
def create_list(request: Request, name: Name, description: Note = "") -> Response:
    list_id = store.create_list(request.app.state.sessions, name.strip(), description)
    return RedirectResponse(f"/lists/{list_id}", status_code=303)


@router.get("/lists/{list_id}")
def list_page(request: Request, list_id: int, session: SessionDep,
              render: RenderDep) -> Response:
    latent_list = _list_or_404(session, list_id)
    return render(request, "list.html", {"list": latent_list,
                                         "rows": store.list_rows(session, latent_list)})


@router.post("/lists/{list_id}/items", dependencies=[Depends(require_admin)])
def add_item(request: Request, list_id: int, sae_id: Annotated[int, Form(ge=1, le=2**62)],
             index: Annotated[int, Form(ge=0, le=2**31)], note: Note = "") -> Response:
    try:
        store.add_item(request.app.state.sessions, list_id, sae_id, index, note)
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from None
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    return RedirectResponse(f"/lists/{list_id}", status_code=303)


@router.post("/lists/{list_id}/items/{item_id}/remove", dependencies=[Depends(require_admin)])
def remove_item(request: Request, list_id: int, item_id: int) -> Response:
    store.remove_item(request.app.state.sessions, list_id, item_id)
    return RedirectResponse(f"/lists/{list_id}", status_code=303)


@router.get("/lists/{list_id}/export.json")
def export_list(list_id: int, session: SessionDep) -> JSONResponse:
    latent_list = _list_or_404(session, list_id)
    return _download(store.export_list(session, latent_list), f"list-{list_id}.json")


@router.get("/lists/{list_id}/neuronpedia.json")
def neuronpedia_list(list_id: int, session: SessionDep) -> JSONResponse:
    latent_list = _list_or_404(session, list_id)
    return _download(store.neuronpedia_list(session, latent_list),
                     f"list-{list_id}-neuronpedia.json")


def _download(data: dict, name: str) -> JSONResponse:
    return JSONResponse(data, headers={"Content-Disposition": f'attachment; filename="{name}"'})


def _list_or_404(session, list_id: int):
    latent_list = store.get_list(session, list_id)
    if latent_list is None:
        raise HTTPException(404, f"there is no list {list_id}")
    return latent_list
