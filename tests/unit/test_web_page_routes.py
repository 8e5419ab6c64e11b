"""The web page's routes: its files, their CSP, /ui/'s redirect, and the `ui` setting."""

from __future__ import annotations

import falcon.testing

from frontend.app import create_app
from frontend.resources.ui import CSP
from frontend.wsgi import frontend_settings as wsgi_frontend_settings
from ipc.runtime import WebConfig
from tests.unit.defaults import frontend_settings


def test_page_and_files_are_served_with_a_self_only_csp(client):
    page = client.simulate_get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert 'src="ui/app.js"' in page.text and 'href="ui/app.css"' in page.text  # relative: proxy prefixes work
    for path, kind in (("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css")):
        asset = client.simulate_get(path)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert asset.headers["content-security-policy"] == CSP
    assert page.headers["content-security-policy"] == CSP
    assert "'unsafe-inline'" not in CSP and "script-src 'self'" in CSP


def test_ui_redirects_relatively_to_the_page(client):
    for path, location in (("/ui", "./"), ("/ui/", "../")):
        resp = client.simulate_get(path)
        assert resp.status_code == 302 and resp.headers["location"] == location


def test_unknown_file_is_404(client):
    assert client.simulate_get("/ui/secret.py").status_code == 404
    assert client.simulate_get("/ui/..%2Fapp.py").status_code == 404


def test_ui_false_turns_the_page_off(engine, tok):
    client = falcon.testing.TestClient(create_app(engine, tok, settings=frontend_settings(ui=False)))
    for path in ("/", "/ui/", "/ui/app.js"):
        assert client.simulate_get(path).status_code == 404, path
    assert client.simulate_get("/health").status_code == 200


def test_workers_take_the_setting_from_the_runtime_config():
    web = WebConfig(
        default_max_tokens=16,
        request_timeout_s=1.0,
        max_queued_requests=1,
        api_keys=(),
        cors_origins=(),
        ui=False,
        drain_flag=None,
        supervisor_pid=None,
    )
    assert wsgi_frontend_settings(web).ui is False
