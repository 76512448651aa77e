"""The console function's HTTP surface on Starlette: the route table, access (access.py) on
every route, and the handlers that render the Jinja2 templates (autoescaped) from views.py's rows.

Pages are GETs; every action (promote, rollback, canary, try, upload, log in and out) is a POST
from a form carrying the session's CSRF token, so a page of another site cannot act through a
visitor's browser. Blocking work (the bucket, the broker, predict) runs on Starlette's worker
threads, not on the event loop. A client's mistake is a 4xx page saying what to do; a part
that cannot be reached is a 502 or 503 page naming it.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import quote, urlencode, urlsplit

import jinja2
import requests
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from bucketml import auth, settings
from bucketml.console import views
from bucketml.console.access import COOKIE, CSRF_FIELD, SESSION_SECONDS, Session, Sessions, csrf_matches
from bucketml.contracts import events
from bucketml.contracts.upload import UploadSpecError, upload_metadata
from bucketml.local.client import Failure, broker_events, describe, serving_state
from bucketml.registry.model_registry import Registry, RegistryError, check_model_name, check_version
from bucketml.steps import steering
from bucketml.storage import NotFound, Storage, StorageError

HERE = Path(__file__).resolve().parent
FORM_BYTES = 64 * 1024  # the largest action form (not an upload)
EVENT_PAGE = 1000  # the broker's largest page
EVENTS_SHOWN = 200
FILE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
# report.html is self-contained: inline styles and data: images (plots as SVG), no script.
# `sandbox` with no allowances also keeps it from running anything or posting a form.
REPORT_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
              "form-action 'none'; frame-ancestors 'self'; sandbox")
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
TASKS = ("auto", "classification", "regression")
PROMOTIONS = ("", "always", "if_better", "never", "canary")

Handler = Callable[[Request, "Visit"], Awaitable[Response]]


class Visit:
    """One request's access: its session (a new anonymous one is set as a cookie on the answer)."""

    def __init__(self, session: Session | None, cookie: str | None, by_bearer: bool):
        self.session = session
        self.new_cookie = cookie
        self.by_bearer = by_bearer

    @property
    def csrf(self) -> str:
        return self.session.csrf if self.session else ""


class Console:
    def __init__(self, storage: Storage, sessions: Sessions, broker_url: str, predict_url: str, secure_cookie: bool):
        self.storage = storage
        self.registry = Registry(storage)
        self.cards = views.Cards(self.registry)
        self.sessions = sessions
        self.broker_url = broker_url.rstrip("/")
        self.predict_url = predict_url.rstrip("/")
        self.secure_cookie = secure_cookie
        environment = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                                         undefined=jinja2.StrictUndefined)
        self.templates = Jinja2Templates(env=environment)
        self.app = Starlette(routes=[
            Route("/", self._page(self.models), methods=["GET"]),
            Route("/models/{model}", self._page(self.model), methods=["GET"]),
            Route("/models/{model}/versions/{version:int}/report", self._page(self.report), methods=["GET"]),
            Route("/models/{model}/promote", self._page(self.promote), methods=["POST"]),
            Route("/models/{model}/rollback", self._page(self.rollback), methods=["POST"]),
            Route("/models/{model}/canary", self._page(self.canary), methods=["POST"]),
            Route("/models/{model}/try", self._page(self.try_it), methods=["POST"]),
            Route("/events", self._page(self.events), methods=["GET"]),
            Route("/upload", self._page(self.upload_form), methods=["GET"]),
            Route("/upload", self._page(self.upload), methods=["POST"]),
            Route("/follow", self._page(self.follow), methods=["GET"]),
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self._page(self.logout), methods=["POST"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ], exception_handlers={HTTPException: self._http_error, StorageError: self._storage_error})

    @classmethod
    def from_environment(cls) -> Console:
        """Raises settings.ConfigError when the settings do not allow starting (reachable beyond
        loopback with no token: the message says what to set)."""
        from bucketml.storage import open_storage

        host, how = auth.function_listen_host()
        policy = auth.server_policy(host, "the console", how)
        token = settings.token() if policy.required else None
        return cls(open_storage(settings.bucket_url()), Sessions(policy, token), settings.broker_url(),
                   settings.predict_url(), secure_cookie=settings.platform().knative_service is not None)

    async def __call__(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)

    # --- access -------------------------------------------------------------------------
    def _page(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """Access for one route: the login (or a bearer token) when required, and on a POST the
        form's CSRF token; checked before a body is read."""

        async def endpoint(request: Request) -> Response:
            by_bearer = self.sessions.bearer_accepted(request.headers.get("authorization"))
            session = self.sessions.read(request.cookies.get(COOKIE))
            cookie = None
            if session is None and not by_bearer:
                if self.sessions.required:
                    if request.method == "GET":
                        return RedirectResponse("/login?" + urlencode({"next": _local_path(request)}), 303)
                    return self._error(request, None, 401, "Log in first: this console requires the bearer token "
                                                           "for every page and action beyond this machine.")
                session, cookie = self.sessions.new(logged_in=False)
            visit = Visit(session, cookie, by_bearer)
            if request.method == "POST" and not by_bearer:
                refusal = await self._refuse_post(request, visit)
                if refusal is not None:
                    return refusal
            response = await handler(request, visit)
            if cookie is not None:
                self._set_cookie(response, cookie)
            return response

        return endpoint

    async def _refuse_post(self, request: Request, visit: Visit) -> Response | None:
        origin = request.headers.get("origin")
        # Host only, not the scheme: behind a proxy that ends TLS the console sees http.
        if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host", ""):
            return self._error(request, visit, 403, f"This action came from another site ({origin}); "
                                                    "use the console's own pages.")
        limit = self._upload_limit() + FORM_BYTES if request.url.path == "/upload" else FORM_BYTES
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return self._error(request, visit, 413, f"The request is {int(length)} bytes, over this form's limit "
                                                    f"of {limit} bytes (BUCKETML_MAX_UPLOAD_BYTES for an upload).")
        _limit_body(request, limit)  # a body sent without Content-Length (chunked) is cut off there too
        try:
            form = await self._form(request)
        except BodyTooLarge:
            return self._error(request, visit, 413, f"The request is over this form's limit of {limit} bytes "
                                                    "(BUCKETML_MAX_UPLOAD_BYTES for an upload).")
        if not csrf_matches(visit.session, form.get(CSRF_FIELD) if isinstance(form.get(CSRF_FIELD), str) else None):
            return self._error(request, visit, 403, "This form is out of date or did not come from this console "
                                                    "(its CSRF token does not match your session): reload the page "
                                                    "and try again.")
        return None

    async def _form(self, request: Request) -> FormData:
        return await request.form(max_files=1, max_fields=1000)

    def _set_cookie(self, response: Response, cookie: str) -> None:
        response.set_cookie(COOKIE, cookie, max_age=SESSION_SECONDS, httponly=True, samesite="strict",
                            secure=self.secure_cookie, path="/")

    # --- rendering ---------------------------------------------------------------------
    def _render(self, request: Request, visit: Visit | None, template: str, status: int = 200,
                **context: Any) -> Response:
        context.update(csrf=visit.csrf if visit else "", csrf_field=CSRF_FIELD, required=self.sessions.required,
                       logged_in=bool(visit and visit.session and visit.session.logged_in))
        response = self.templates.TemplateResponse(request, template, context, status_code=status)
        response.headers["Content-Security-Policy"] = PAGE_CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["Cache-Control"] = "no-store"
        return response

    def _error(self, request: Request, visit: Visit | None, status: int, message: str) -> Response:
        return self._render(request, visit, "error.html", status, title=f"HTTP {status}", message=message)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return self._error(request, None, exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    async def _storage_error(self, request: Request, exc: Exception) -> Response:
        """The bucket did not answer (or refused): the page cannot be made, and it is not the visitor's fault."""
        return self._error(request, None, 503, f"The bucket could not be read or written: {exc}. "
                                               "Check that it is reachable from where the console runs, then reload.")

    # --- pages -------------------------------------------------------------------------
    async def healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok")

    async def models(self, request: Request, visit: Visit) -> Response:
        rows = await run_in_threadpool(views.model_rows, self.cards)
        return self._render(request, visit, "models.html", rows=rows, title="Models")

    async def model(self, request: Request, visit: Visit, status: int = 200, **extra: Any) -> Response:
        name = request.path_params["model"]
        try:
            check_model_name(name)
            page = await run_in_threadpool(views.model_page, self.cards, name)
        except RegistryError as exc:
            return self._error(request, visit, 404, str(exc))
        except NotFound as exc:
            return self._error(request, visit, 404, f"{exc}; upload a dataset for it on the Upload page.")
        extra.setdefault("lines", [])
        extra.setdefault("answer", None)
        extra.setdefault("values", [""] * len(page.schema))
        return self._render(request, visit, "model.html", status, page=page, title=name, **extra)

    async def report(self, request: Request, visit: Visit) -> Response:
        name, version = request.path_params["model"], request.path_params["version"]
        try:
            object_name = Registry.version_prefix(name, check_version(version)) + "report.html"
            body = await run_in_threadpool(self.storage.read, object_name)
        except RegistryError as exc:
            return self._error(request, visit, 404, str(exc))
        except NotFound:
            try:
                card = await run_in_threadpool(self.registry.model_card, name, version)
            except NotFound:
                return self._error(request, visit, 404, f"model '{name}' has no version {version}")
            why = (f"it could not be rendered: {card.report_error}" if card.report_error
                   else "it was trained before reports existed")
            return self._error(request, visit, 404, f"version {version} of '{name}' has no report ({why})")
        return Response(body, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": REPORT_CSP, "X-Content-Type-Options": "nosniff",
                                 "Cache-Control": "no-store"})

    async def events(self, request: Request, visit: Visit) -> Response:
        model = request.query_params.get("model", "").strip()
        type_ = request.query_params.get("type", "").strip()
        filters = {k: v for k, v in {"model": model, "type": type_}.items() if v}
        try:
            found = await run_in_threadpool(self._newest_events, filters)
            error = None
        except Failure as exc:
            found, error = [], f"The broker's event log at {self.broker_url} could not be read: {exc.format_message()}"
        shown = []
        for event in found:
            data = event.get("data")
            shown.append({"seq": event.get("seq"), "time": event.get("time") or "", "type": event.get("type"),
                          "subject": event.get("subject") or "",
                          "line": describe(event["type"], data if isinstance(data, dict) else {}).strip(),
                          "data": json.dumps(data, indent=2, ensure_ascii=False)})
        types = sorted({*events.PLATFORM_TYPES, events.OBJECT_FINALIZED})
        return self._render(request, visit, "events.html", events=shown, model=model, type=type_, types=types,
                            error=error, title="Events", shown_limit=EVENTS_SHOWN)

    def _newest_events(self, filters: dict[str, str]) -> list[dict]:
        """The newest EVENTS_SHOWN events, newest first (one page of the broker's log, order=desc)."""
        return broker_events(self.broker_url, order="desc", limit=EVENTS_SHOWN, **filters)

    # --- actions -----------------------------------------------------------------------
    def _announce(self, lines: list[str]) -> steering.Announce:
        def announce(event, fallback: str) -> None:
            try:
                response = events.post(self.broker_url, event)
                if response.status_code < 300:
                    return
                why = f"HTTP {response.status_code}"
            except requests.RequestException as exc:
                why = type(exc).__name__
            lines.append(f"the broker at {self.broker_url} did not take the {event['type']} event ({why}); {fallback}")

        return announce

    async def _confirmed(self, request: Request, visit: Visit, action: str, what: str,
                         fields: dict[str, str]) -> Response | None:
        """None when the form says the step was confirmed; else the confirmation page."""
        form = await self._form(request)
        if form.get("confirmed") == "yes":
            return None
        return self._render(request, visit, "confirm.html", title=f"Confirm {action}", model=request.path_params["model"],
                            action=action, what=what, fields=fields)

    def _int_field(self, form: FormData, field: str, required: bool = True) -> int | None:
        value = form.get(field)
        text = value.strip() if isinstance(value, str) else ""
        if not text and not required:
            return None
        if not text.isdigit():
            raise ValueError(f"'{field}' must be a whole number, got {text!r}")
        return int(text)

    async def _step(self, request: Request, visit: Visit, action: str, run: Callable[[Registry, str, FormData, list[str]], Any],
                    what: Callable[[FormData], str], fields: tuple[str, ...]) -> Response:
        name = request.path_params["model"]
        form = await self._form(request)
        try:
            check_model_name(name)
            description = what(form)
        except (RegistryError, ValueError) as exc:
            return await self.model(request, visit, 400, lines=[f"error: {exc}"])
        confirm = await self._confirmed(request, visit, action, description,
                                        {f: str(form.get(f) or "") for f in fields})
        if confirm is not None:
            return confirm
        lines: list[str] = []
        try:
            await run_in_threadpool(run, self.registry, name, form, lines)
            status = 200
        except (RegistryError, NotFound, ValueError) as exc:
            lines.append(f"error: {exc}")
            status = 409
        return await self.model(request, visit, status, lines=lines)

    async def promote(self, request: Request, visit: Visit) -> Response:
        def run(registry: Registry, name: str, form: FormData, lines: list[str]) -> None:
            steering.promote(registry, name, self._int_field(form, "version"), self.predict_url, "the console",
                             lines.append, self._announce(lines))

        return await self._step(request, visit, "promote", run,
                                lambda form: f"make version {self._int_field(form, 'version')} the current version "
                                             f"of {request.path_params['model']}", ("version",))

    async def rollback(self, request: Request, visit: Visit) -> Response:
        def run(registry: Registry, name: str, form: FormData, lines: list[str]) -> None:
            steering.rollback(registry, name, self._int_field(form, "to", required=False), self.predict_url,
                              "the console", lines.append, self._announce(lines))

        def what(form: FormData) -> str:
            to = self._int_field(form, "to", required=False)
            target = f"version {to}" if to is not None else "the version before the current one"
            return (f"roll {request.path_params['model']} back to {target} "
                    "(with a canary: remove the canary, the current version stays)")

        return await self._step(request, visit, "rollback", run, what, ("to",))

    async def canary(self, request: Request, visit: Visit) -> Response:
        def run(registry: Registry, name: str, form: FormData, lines: list[str]) -> None:
            steering.start_canary(registry, name, self._int_field(form, "version"), self._int_field(form, "percent"),
                                  lines.append, self._announce(lines))

        return await self._step(request, visit, "canary", run,
                                lambda form: f"send {self._int_field(form, 'percent')}% of unpinned requests to version "
                                             f"{self._int_field(form, 'version')} of {request.path_params['model']}",
                                ("version", "percent"))

    async def try_it(self, request: Request, visit: Visit) -> Response:
        name = request.path_params["model"]
        form = await self._form(request)
        try:
            check_model_name(name)
            page = await run_in_threadpool(views.model_page, self.cards, name)
        except (RegistryError, NotFound) as exc:
            return self._error(request, visit, 404, str(exc))
        values = [str(form.get(f"c{i}") or "") for i in range(len(page.schema))]
        record = views.try_record(page.schema, values)
        body = {"model": name, "records": [record]}
        try:
            response = await run_in_threadpool(lambda: requests.post(
                self.predict_url + "/predict", json=body, headers=auth.client_headers(), timeout=30))
            answer = {"status": response.status_code, "request": json.dumps(body, ensure_ascii=False),
                      "body": _pretty(response.text)}
        except requests.RequestException as exc:
            answer = {"status": None, "request": json.dumps(body, ensure_ascii=False),
                      "body": f"the predict function at {self.predict_url} could not be reached ({type(exc).__name__})"}
        return await self.model(request, visit, 200, answer=answer, values=values)

    # --- upload --------------------------------------------------------------------------
    def _upload_limit(self) -> int:
        from bucketml.training.reading import Limits  # the limits preprocess enforces

        try:
            return Limits.from_environment().max_upload_bytes
        except ValueError:
            return Limits().max_upload_bytes

    async def upload_form(self, request: Request, visit: Visit, status: int = 200, error: str | None = None,
                          fields: dict[str, str] | None = None) -> Response:
        return self._render(request, visit, "upload.html", status, title="Upload", error=error, tasks=TASKS,
                            promotions=PROMOTIONS, fields=fields or {}, limit=self._upload_limit())

    async def upload(self, request: Request, visit: Visit) -> Response:
        form = await self._form(request)
        fields = {key: str(form.get(key) or "").strip() for key in ("model", "target", "task", "promotion", "settings")}
        file = form.get("file")
        if not isinstance(file, UploadFile) or not file.filename:
            return await self.upload_form(request, visit, 400, "Choose a CSV file to upload.", fields)
        try:
            model = check_model_name(fields["model"])
            settings_lines = [line.strip() for line in fields["settings"].splitlines() if line.strip()]
            if fields["promotion"]:
                settings_lines.append(f"promotion={fields['promotion']}")
            metadata = upload_metadata(fields["target"] or None, None if fields["task"] in ("", "auto") else fields["task"],
                                       settings_lines, target_label="Target", task_label="Task", set_label="Spec setting")
        except (RegistryError, UploadSpecError) as exc:
            return await self.upload_form(request, visit, 400, str(exc), fields)
        limit = self._upload_limit()
        data = await file.read(limit + 1)
        if len(data) > limit:
            return await self.upload_form(
                request, visit, 413, f"{file.filename} is over the upload limit of {limit} bytes "
                                     "(BUCKETML_MAX_UPLOAD_BYTES); nothing was uploaded: split the file, compress it "
                                     "(.csv.gz), or raise the limit where preprocess runs and here.", fields)
        filename = FILE_NAME.sub("_", Path(file.filename).name).strip("._") or "upload.csv"
        name = f"datasets/{model}/{filename}"
        try:
            after = await run_in_threadpool(self._last_seq)
            info = await run_in_threadpool(lambda: self.storage.write(name, data, content_type="text/csv",
                                                                      metadata=metadata))
        except StorageError as exc:
            return await self.upload_form(request, visit, 503, f"The bucket did not take the file: {exc}", fields)
        query = {"model": model, "name": name, "generation": info.generation, "size": info.size}
        if after is not None:
            query["after"] = after
        return RedirectResponse("/follow?" + urlencode(query), 303)

    def _last_seq(self) -> int | None:
        """The newest event's seq before an upload, so following it reads only what comes after;
        None when the broker keeps no log this console can read (a cluster's Knative Broker)."""
        try:
            newest = broker_events(self.broker_url, order="desc", limit=1)
        except Failure:
            return None
        return newest[0]["seq"] if newest else 0

    async def follow(self, request: Request, visit: Visit) -> Response:
        q = request.query_params
        model, name, generation = q.get("model", ""), q.get("name", ""), q.get("generation", "")
        try:
            check_model_name(model)
        except RegistryError as exc:
            return self._error(request, visit, 400, str(exc))
        after = q.get("after", "")
        lines = [f"uploaded   {name} (generation {generation}, {q.get('size', '?')} bytes)"]
        if not after.isdigit():
            state = "unknown"
            lines.append(f"the broker at {self.broker_url} keeps no event log this console can read; "
                         "see the model's page for what became of the upload")
        else:
            state = await run_in_threadpool(self._follow_lines, model, name, generation, int(after), lines)
        return self._render(request, visit, "follow.html", title=f"Upload of {name}", lines=lines, state=state,
                            model=model, done=state != "waiting" and state != "serving")

    def _follow_lines(self, model: str, name: str, generation: str, after: int, lines: list[str]) -> str:
        """The upload's lines as `bucketml upload` prints them, and where it stands: waiting,
        serving (published, predict not yet serving it), served, trained, rejected, failed."""
        try:
            outcome = None
            while True:
                page = broker_events(self.broker_url, after=after, limit=EVENT_PAGE)
                for event in page:
                    data = event.get("data") if isinstance(event.get("data"), dict) else {}
                    upload = data if event["type"] == events.OBJECT_FINALIZED else data.get("upload") or {}
                    if upload.get("name") != name or str(upload.get("generation")) != str(generation):
                        continue
                    lines.append(describe(event["type"], data))
                    promoted = event["type"] == events.MODEL_TRAINED and data.get("current_version") == data.get("version")
                    if event["type"] in events.UPLOAD_OUTCOMES and not promoted:
                        outcome = event
                if len(page) < EVENT_PAGE or outcome is not None:
                    break
                after = page[-1]["seq"]
        except Failure as exc:
            lines.append(f"error: {exc.format_message()}")
            return "waiting"
        if outcome is None:
            return "waiting"
        kind = outcome["type"]
        if kind == events.DATASET_REJECTED:
            return "rejected"
        if kind == events.TRAINING_FAILED:
            return "failed"
        if kind == events.MODEL_TRAINED:
            return "trained"
        version = outcome["data"]["version"]
        try:
            reason = serving_state(self.predict_url, model, version)
        except Failure as exc:
            reason = exc.format_message()
        if reason is None:
            lines.append(f"  served     {model} version {version}")
            return "served"
        lines.append(f"  waiting    for predict at {self.predict_url} to serve {model} version {version} ({reason})")
        return "serving"

    # --- login ---------------------------------------------------------------------------
    async def login_form(self, request: Request, status: int = 200, error: str | None = None,
                         next_path: str | None = None) -> Response:
        session = self.sessions.read(request.cookies.get(COOKIE))
        visit = Visit(session, None, False)
        return self._render(request, visit, "login.html", status, title="Log in", error=error,
                            next=_safe_next(next_path or request.query_params.get("next")))

    async def login(self, request: Request) -> Response:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > FORM_BYTES:
            return self._error(request, None, 413, "The login form is too large.")
        form = await self._form(request)
        token, next_path = form.get("token"), form.get("next")
        next_path = next_path if isinstance(next_path, str) else None
        if not self.sessions.required:
            return RedirectResponse("/", 303)
        if not isinstance(token, str) or not self.sessions.token_accepted(token):
            await asyncio.sleep(0.2)  # a guess costs a moment (without holding up other requests)
            return await self.login_form(request, 401, "That is not the token this console was given "
                                                       "(BUCKETML_TOKEN or BUCKETML_TOKEN_FILE where it runs).",
                                         next_path)
        _, cookie = self.sessions.new(logged_in=True)
        response = RedirectResponse(_safe_next(next_path), 303)
        self._set_cookie(response, cookie)
        return response

    async def logout(self, request: Request, visit: Visit) -> Response:
        response = RedirectResponse("/login" if self.sessions.required else "/", 303)
        response.delete_cookie(COOKIE, path="/")
        return response


class BodyTooLarge(Exception):
    """A request body went past its limit while it was read."""


def _limit_body(request: Request, limit: int) -> None:
    """Make the request's body reader raise BodyTooLarge once more than `limit` bytes arrived,
    so a chunked upload is not spooled to disk without end."""
    receive = request.receive
    received = 0

    async def limited():
        nonlocal received
        message = await receive()
        if message.get("type") == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge()
        return message

    request._receive = limited  # Starlette reads the body (and parses forms) through this channel


def _local_path(request: Request) -> str:
    return request.url.path + (f"?{request.url.query}" if request.url.query else "")


def _safe_next(target: str | None) -> str:
    """Where to go after logging in: a path of this console only (never another site)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return quote(target, safe="/?&=%:.,-_~+")


def _pretty(text: str) -> str:
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text[:2000]
