"""The admin API's bearer token (`admin_token`): every endpoint but the health checks
and metrics needs it; the command line reads it from RINGWAY_ADMIN_TOKEN; and a gateway
whose admin API would listen beyond loopback without one refuses to start."""

import json
import signal

from harness import free_port, http_request, run_cli

TOKEN = "admin-token-0123456789abcdef"


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def test_the_admin_api_needs_its_token_except_health_and_metrics(gateway):
    gw = gateway(env={"RINGWAY_ADMIN_TOKEN": TOKEN})
    body = json.dumps({"topic": "t", "data": 1})
    for headers in ({}, auth("wrong-token-0123456789abcdef"), {"Authorization": TOKEN}):
        r = http_request(gw.admin_port, "POST", "/v1/publish", body, headers)
        assert r.status == 401, (headers, r.status)
        assert r.json()["error"] == "unauthorized"
        assert r.headers.get("www-authenticate", "").startswith("Bearer"), r.headers
    for path in ("/v1/nodes", "/v1/history?topic=t"):
        assert http_request(gw.admin_port, "GET", path).status == 401, path
    r = http_request(gw.admin_port, "POST", "/v1/publish", body, auth())
    assert r.status == 200 and r.json()["id"]
    assert http_request(gw.admin_port, "GET", "/v1/nodes", headers=auth()).status == 200
    for path in ("/healthz", "/readyz", "/metrics"):
        assert http_request(gw.admin_port, "GET", path).status == 200, path


def test_the_command_line_sends_the_token_from_the_environment(gateway):
    gw = gateway(env={"RINGWAY_ADMIN_TOKEN": TOKEN})
    ok = run_cli("publish", "--admin", gw.admin_addr, "--topic", "t", "1",
                 env={"RINGWAY_ADMIN_TOKEN": TOKEN})
    assert ok.returncode == 0, ok.stderr
    refused = run_cli("publish", "--admin", gw.admin_addr, "--topic", "t", "1")
    assert refused.returncode == 1 and "401" in refused.stderr, refused.stderr


def test_an_admin_api_beyond_loopback_without_a_token_refuses_to_start():
    port = free_port()
    out = run_cli("serve", "--listen", f"127.0.0.1:{free_port()}", "--admin", f"0.0.0.0:{port}",
                  timeout=10)
    assert out.returncode == 64, (out.returncode, out.stderr)
    assert "admin_token" in out.stderr and "loopback" in out.stderr, out.stderr
    short = run_cli("serve", "--listen", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{port}",
                    env={"RINGWAY_ADMIN_TOKEN": "short"}, timeout=10)
    assert short.returncode == 64 and "at least 16 bytes" in short.stderr, short.stderr


def test_a_reload_takes_a_new_token(gateway, tmp_path):
    conf = tmp_path / "ringway.toml"
    conf.write_text(f'admin_token = "{TOKEN}"\n')
    gw = gateway(config=str(conf))
    body = json.dumps({"topic": "t", "data": 1})
    assert http_request(gw.admin_port, "POST", "/v1/publish", body, auth()).status == 200
    new = "another-token-0123456789abcdef"
    conf.write_text(f'admin_token = "{new}"\n')
    gw.proc.send_signal(signal.SIGHUP)
    from harness import wait_until
    wait_until(lambda: http_request(gw.admin_port, "POST", "/v1/publish", body, auth(new)).status == 200,
               5, what="the new token to be taken")
    assert http_request(gw.admin_port, "POST", "/v1/publish", body, auth()).status == 401
