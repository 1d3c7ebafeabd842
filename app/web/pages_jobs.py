"""Job pages: the queue form (field errors inline), the list, a job's live page, cancel."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response

from app import jobs
from app.job_params import FIELDS_OF
from app.web import views
from app.web.deps import RenderDep, SessionDep, SettingsDep, celery_app
from app.web.security import require_admin

router = APIRouter(include_in_schema=False)

FORM_FIELDS = ("model", "layer", "dataset", "tokens", "site", "latents", "k", "arch", "skip",
               "nproc", "sweep_latents", "sweep_k", "sweep_arch", "acts", "sae", "sae_id",
               "latent_range", "explainer", "explain_count", "steer_eval_count", "strengths")


KINDS_OF = {name: [kind for kind, fields in FIELDS_OF.items() if name in fields]
            for name in FORM_FIELDS}
"""The job kinds that read each form field (the form shows a field for those only)."""


def form_defaults(settings) -> dict[str, str]:
    """What the form starts with: a pipeline that finishes in minutes on the embedded model."""
    defaults = jobs.JobParams()
    return {"kind": "pipeline", "model": settings.default_model, "layer": "6",
            "dataset": defaults.dataset, "tokens": str(defaults.tokens),
            "latents": str(defaults.latents), "k": str(defaults.k), "arch": "",
            "site": "resid", "skip": "",
            "nproc": str(defaults.nproc), "acts": "", "sae": "", "sae_id": "",
            "latent_range": "", "explainer": defaults.explainer,
            "explain_count": str(defaults.explain_count),
            "steer_eval_count": str(defaults.steer_eval_count),
            "strengths": defaults.strengths, "sweep_latents": "1024,4096",
            "sweep_k": "16,32", "sweep_arch": ""}


@router.get("/jobs")
def jobs_page(request: Request, session: SessionDep, render: RenderDep,
              settings: SettingsDep, kind: Literal[tuple(jobs.KINDS)] = "pipeline"  # type: ignore[valid-type]
              ) -> Response:
    """The jobs page; ``?kind=analyze`` opens the form on that kind (an SAE to add)."""
    form = {**form_defaults(settings), "kind": kind}
    return render(request, "jobs.html", {"jobs": jobs.recent(session, 50), "form": form,
                                         "errors": {}, "kinds": jobs.KINDS,
                                         "kinds_of": KINDS_OF})


@router.post("/jobs", dependencies=[Depends(require_admin)])
async def submit_job(request: Request, render: RenderDep, settings: SettingsDep,
                     kind: Annotated[str, Form()] = "pipeline") -> Response:
    raw = await request.form()
    form = {name: str(raw.get(name, "")).strip() for name in FORM_FIELDS}
    wanted = FIELDS_OF.get(kind, FORM_FIELDS)  # the other kinds' fields are hidden
    params = {name: value for name, value in form.items() if value and name in wanted}
    try:
        job = jobs.submit(request.app.state.sessions, celery_app(request), kind, params,
                          request.app.state.settings, web=True)
    except jobs.JobError as exc:
        status = views.job_error(exc).status_code
        errors = exc.fields or {"kind": str(exc)}
        return render(request, "jobs.html", {"form": {**form, "kind": kind}, "errors": errors,
                                             "kinds": jobs.KINDS, "kinds_of": KINDS_OF},
                      status=status, block="job_form")
    target = f"/jobs/{job.id}"
    if request.headers.get("HX-Request") == "true":
        return Response(status_code=204, headers={"HX-Redirect": target})
    return RedirectResponse(target, status_code=303)


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: int, session: SessionDep,
             render: RenderDep) -> Response:
    job = views.job_or_404(session, job_id)
    shown = FIELDS_OF.get(job.kind, ())
    params = {k: v for k, v in (job.params or {}).items() if k in shown or k == "queue"}
    return render(request, "job.html", {"job": job, "active": job.state in jobs.ACTIVE,
                                        "params": params,
                                        "metrics": _sae_metrics(session, job)})


@router.post("/jobs/{job_id}/cancel", dependencies=[Depends(require_admin)])
def cancel_job(request: Request, job_id: int, settings: SettingsDep) -> Response:
    try:
        jobs.cancel(request.app.state.sessions, job_id, settings)
    except jobs.JobError as exc:
        raise views.job_error(exc) from None
    target = f"/jobs/{job_id}"
    if request.headers.get("HX-Request") == "true":
        return Response(status_code=204, headers={"HX-Redirect": target})
    return RedirectResponse(target, status_code=303)


def _sae_metrics(session, job) -> dict | None:
    """The headline metrics of the SAE a finished job stored (None before that)."""
    from app.store.models import Sae

    sae_id = (job.result or {}).get("sae_id")
    sae = session.get(Sae, sae_id) if sae_id else None
    return views.headline(sae) if sae is not None else None
