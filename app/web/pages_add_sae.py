"""The Add-an-SAE page: a folder written by saelab, SAELens, sparsify or dictionary_learning
(an SAE, or a saelab or SAELens transcoder; inside the allowed roots) is read at once, then
queued as the ``analyze`` job that ``saelab import-sae`` queues (both build it with
``app.sae_import.import_params``).

A folder that cannot be read, or that lacks a model or layer nobody gave, comes back as the
form with the problem under its field (422) and nothing is stored. Registered before the
SAE pages, whose ``/saes/{sae_id}`` would otherwise take ``/saes/add``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response

from app import jobs
from app.job_params import PATH
from app.paths import PathRefused, checked_path, checked_source
from app.sae_import import DEFAULT_DATASET, DEFAULT_TOKENS, SaeFolderError, import_params
from app.settings import Settings
from app.web import views
from app.web.deps import RenderDep, SettingsDep, celery_app
from app.web.security import require_admin

router = APIRouter(include_in_schema=False)
TEMPLATE = "add_sae.html"
FormText = Annotated[str, Form(max_length=PATH)]
_FORM_FIELD = {"analyze_tokens": "tokens"}
"""Job parameters the form names otherwise."""


@router.get("/saes/add")
def add_sae_page(request: Request, render: RenderDep) -> Response:
    form = {"sae": "", "model": "", "layer": "", "dataset": DEFAULT_DATASET,
            "tokens": str(DEFAULT_TOKENS)}
    return render(request, TEMPLATE, {"form": form, "errors": {}})


@router.post("/saes/add", dependencies=[Depends(require_admin)])
def add_sae(request: Request, render: RenderDep, settings: SettingsDep, sae: FormText = "",
            model: FormText = "", layer: FormText = "", dataset: FormText = DEFAULT_DATASET,
            tokens: FormText = str(DEFAULT_TOKENS)) -> Response:
    """Check the folder now; queue its analysis and go to the job's page."""
    form = {"sae": sae.strip(), "model": model.strip(), "layer": layer.strip(),
            "dataset": dataset.strip() or DEFAULT_DATASET, "tokens": tokens.strip()}
    status = 422
    try:
        params = _params(form, settings)
        job = jobs.submit(request.app.state.sessions, celery_app(request), "analyze", params,
                          settings, web=True)
    except (PathRefused, SaeFolderError) as exc:
        errors = {exc.field: _with_fix(exc)}
    except jobs.JobError as exc:
        status = views.job_error(exc).status_code
        errors = {_FORM_FIELD.get(name, name): problem
                  for name, problem in exc.fields.items()} or {"form": str(exc)}
    else:
        target = f"/jobs/{job.id}"
        if request.headers.get("HX-Request") == "true":
            return Response(status_code=204, headers={"HX-Redirect": target})
        return RedirectResponse(target, status_code=303)
    return render(request, TEMPLATE, {"form": form, "errors": errors}, status=status,
                  block="add_form" if request.headers.get("HX-Request") == "true" else None)


def _params(form: dict[str, str], settings: Settings) -> dict[str, Any]:
    """The analyze job's params: the paths allow-listed before anything reads them (the
    folder, then the model), the folder read by the same function as ``saelab
    import-sae``."""
    if not form["sae"]:
        raise SaeFolderError("sae", "give the folder that holds the SAE")
    folder = checked_path("sae", form["sae"], settings)
    layer = _number(form, "layer", "a block number, from 0")
    tokens = _number(form, "tokens", "a number of tokens")
    params, _ = import_params(
        folder, model=form["model"] or None, layer=layer, dataset=form["dataset"],
        tokens=DEFAULT_TOKENS if tokens is None else tokens,
        vet_model=lambda name: checked_source("model", name, settings,
                                              hub=settings.hub_access))
    return params


def _number(form: dict[str, str], name: str, what: str) -> int | None:
    """The field as an integer; None when left empty."""
    if not form[name]:
        return None
    try:
        return int(form[name])
    except ValueError:
        raise SaeFolderError(name, f"{form[name]!r} is not {what}") from None


def _with_fix(exc: PathRefused | SaeFolderError) -> str:
    """The problem, and for a model or layer the folder does not name what to do."""
    missing = isinstance(exc, SaeFolderError) and exc.missing
    return f"{exc.problem}: enter it here" if missing else exc.problem
