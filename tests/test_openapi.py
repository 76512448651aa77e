"""The predict function's OpenAPI document (shared/bucketml/serving/openapi.yaml): valid OpenAPI 3.1,
covering every route in ROUTE_TABLE and nothing else, served at /openapi.json, and copied in
docs/openapi.json. (tests/test_predict_fuzz.py fuzzes a real process from it.)

After editing the YAML, regenerate docs/openapi.json with:

    .venv/bin/python -c "import json, yaml; doc = yaml.safe_load(open('shared/bucketml/serving/openapi.yaml', encoding='utf-8')); \\
        open('docs/openapi.json', 'w', encoding='utf-8').write(json.dumps(doc, indent=2, ensure_ascii=False) + '\\n')"
"""

from __future__ import annotations

import asyncio
import json
import re
import types

import jsonschema
import pytest
import yaml
from starlette.routing import Match

from bucketml.serving.app import STATUS_OF, PredictApp
from bucketml.serving.errors import BucketUnavailable, UnknownModel, VersionNotLoadable
from bucketml.serving.service import PredictService
from helpers import ROOT

YAML = ROOT / "shared" / "bucketml" / "serving" / "openapi.yaml"
DOCS_JSON = ROOT / "docs" / "openapi.json"
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# The routes, not a model, matter here: a service whose manager is never asked about one.
APP = PredictApp(PredictService(types.SimpleNamespace(ensure_watching=lambda: None)))


@pytest.fixture(scope="module")
def document() -> dict:
    return yaml.safe_load(YAML.read_text(encoding="utf-8"))


def served(path: str, method: str = "GET", body: bytes = b"", app: PredictApp = APP) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request through the predict app, in-process, as ASGI."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": []}
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in sent[0]["headers"]}
    return sent[0]["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


def openapi_path(route_path: str) -> str:
    """/v2/models/{model}/versions/{version:version} -> /v2/models/{model}/versions/{version}"""
    return re.sub(r"\{([^{}:]+):[^{}]+\}", r"{\1}", route_path)


def test_the_document_is_valid_openapi_3_1(document):
    definitions = pytest.importorskip("schemathesis.specs.openapi.definitions")
    meta = definitions.OPENAPI_31
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in
              jsonschema.validators.validator_for(meta)(meta).iter_errors(document)]
    assert not errors, "\n".join(errors)
    assert document["openapi"].startswith("3.1.")
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_every_route_is_documented_with_its_methods(document):
    methods: dict[str, set[str]] = {}
    for route in APP.routes:
        methods.setdefault(openapi_path(route.path), set()).update(route.methods - {"HEAD"})
    for path, route_methods in methods.items():
        assert path in document["paths"], f"{path} is not in openapi.yaml"
        documented = {m.upper() for m in document["paths"][path] if m in METHODS}
        assert documented == route_methods, (path, documented, route_methods)


def test_every_documented_operation_is_a_route(document):
    samples = {"model": "churn", "version": "3"}
    for path, item in document["paths"].items():
        url = re.sub(r"\{([^}]+)\}", lambda m: samples[m[1]], path)
        for method in set(item) & METHODS:
            scope = {"type": "http", "method": method.upper(), "path": url, "root_path": ""}
            matched = [r for r in APP.routes if r.matches(scope)[0] is Match.FULL]
            assert matched, (path, method)
            assert callable(getattr(PredictService, matched[0].name, None)), (path, method, matched[0].name)


def test_every_error_answer_is_documented_as_the_error_object(document):
    components = document["components"]["responses"]
    for path, item in document["paths"].items():
        for method in set(item) & METHODS:
            for status, response in item[method]["responses"].items():
                if "$ref" in response:
                    response = components[response["$ref"].rsplit("/", 1)[1]]
                if int(status) >= 400 and (path, status) != ("/v2/health/ready", "503"):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (path, method, status)


@pytest.mark.parametrize("error", [VersionNotLoadable, BucketUnavailable])
def test_every_status_of_a_pinned_version_is_documented_where_it_is_answered(document, error):
    """A version other than the served one is loaded on demand: a stored version that cannot be
    loaded is a 409, a bucket that cannot be read then a 503 (STATUS_OF). Every operation that
    takes a version answers it and documents it; every operation documents what it answered."""
    def get(model, version=None):
        if version is None:
            raise UnknownModel(f"model '{model}' is not served")
        raise error(f"model '{model}' version {version}: refused")

    manager = types.SimpleNamespace(ensure_watching=lambda: None, get=get, routed=get, ready=lambda: False, loaded=dict,
                                    errors=dict, canaries=dict, shadows=dict, refresh=lambda model: None)
    app = PredictApp(PredictService(manager))
    pinned = 0
    for path, item in document["paths"].items():
        for method in set(item) & METHODS:
            takes_version = "{version}" in path or path == "/predict"
            url = re.sub(r"\{([^}]+)\}", lambda m: {"model": "churn", "version": "3"}[m[1]], path)
            body = b'{"model": "churn", "version": 3, "records": [{}]}' if path == "/predict" else b""
            status, _, _ = served(url, method.upper(), body, app)
            documented = set(item[method]["responses"])
            assert str(status) in documented, (path, method, status, sorted(documented))
            if takes_version:
                pinned += 1
                assert status == STATUS_OF[error], (path, method, status)
    assert pinned == 4  # /predict, and a version's metadata, readiness and inference


def test_openapi_json_is_served_and_equals_docs_openapi_json(document):
    status, headers, body = served("/openapi.json")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == document
    assert json.loads(DOCS_JSON.read_text(encoding="utf-8")) == json.loads(body), (
        "docs/openapi.json is stale: regenerate it from shared/bucketml/serving/openapi.yaml (see this module's docstring)"
    )
    status, _, body = served("/openapi.json", "POST")
    assert status == 405 and json.loads(body) == {
        "error": "POST /openapi.json: The method is not allowed for the requested URL."}


def test_every_example_fits_its_schema(document):
    from referencing import Registry
    from referencing.jsonschema import DRAFT202012

    registry = Registry().with_resource("urn:openapi", DRAFT202012.create_resource(document))

    def at(pointer: str):
        node = document
        for part in pointer.removeprefix("#/").split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def followed(pointer: str) -> str:
        """The pointer, through any $ref, to what it finally names."""
        node = at(pointer)
        return followed(node["$ref"]) if isinstance(node, dict) and "$ref" in node else pointer

    def escaped(key: str) -> str:
        return key.replace("~", "~0").replace("/", "~1")

    def check(schema_pointer: str, value, where) -> None:
        validator = jsonschema.Draft202012Validator({"$ref": "urn:openapi" + schema_pointer}, registry=registry)
        errors = [e.message for e in validator.iter_errors(value)]
        assert not errors, (where, errors)

    checked = 0
    for path, item in document["paths"].items():
        for method in set(item) & METHODS:
            base = f"#/paths/{escaped(path)}/{method}"
            bodies = [f"{base}/requestBody"] if "requestBody" in item[method] else []
            bodies += [f"{base}/responses/{status}" for status in item[method]["responses"]]
            for body in map(followed, bodies):
                for media_type, media in at(body).get("content", {}).items():
                    schema = f"{body}/content/{escaped(media_type)}/schema"
                    named = [("example", media["example"])] if "example" in media else []
                    named += [(name, at(followed(f"{body}/content/{escaped(media_type)}/examples/{name}"))["value"])
                              for name in media.get("examples", {})]
                    for name, value in named:
                        check(schema, value, (path, method, body, media_type, name))
                        checked += 1
    for name, parameter in document["components"]["parameters"].items():
        if "example" in parameter:
            check(f"#/components/parameters/{name}/schema", parameter["example"], name)
            checked += 1
    assert checked >= 15
