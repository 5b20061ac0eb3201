"""Fuzz the API from its own OpenAPI spec: no generated request may produce a 500.

The one 5xx a good server gives is a 502/504 for an ``image_url`` whose server failed:
here no name resolves (the test never leaves the machine), so those are 502s.
"""

from __future__ import annotations

import socket
from dataclasses import replace

import schemathesis
from hypothesis import HealthCheck, given, settings

from visualsearch.service import VisualSearch
from web import create_app


def test_no_generated_request_makes_a_server_error(tiny_settings, small_catalogue, monkeypatch):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "no names resolve in this test")

    monkeypatch.setattr("visualsearch.remote_images.socket.getaddrinfo", no_dns)
    configured = replace(tiny_settings, api_key="fuzz-key")
    VisualSearch(configured).index(small_catalogue)
    app = create_app({"TESTING": True}, settings=configured)
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6
    statuses = set()
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def no_server_error(case):
            case.headers = {**(case.headers or {}), "Authorization": "Bearer fuzz-key"}
            response = case.call()
            statuses.add(response.status_code)
            upstream = response.status_code == 502 and response.json()["error"]["code"] == "remote_unreachable"
            assert response.status_code < 500 or upstream, (case.method, case.formatted_path, response.text[:300])
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"code", "message"}

        no_server_error()
    assert 200 in statuses and 400 in statuses
