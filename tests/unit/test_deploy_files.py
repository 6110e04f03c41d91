"""compose.yaml and the Procfile as shipped: no open gateway, no secret on a command line.
(Docker cannot run here; deploy/nginx.conf runs for real in tests/integration/test_nginx.py.)"""

from __future__ import annotations

import re
from typing import Any

import yaml

from tests.support import REPO

REQUIRED_SECRET = re.compile(r"^\$\{TOKENRELAY_AUTH_SECRET:\?(?P<message>[^}$]+)\}$")


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "compose.yaml").read_text())
    return data


def test_compose_refuses_to_start_without_the_secret_and_says_how_to_make_one() -> None:
    services = compose()["services"]
    gateways = {name: s for name, s in services.items() if name.startswith("gateway")}
    assert len(gateways) == 6, "3 on Redis, 3 on the cluster profile's Redis Cluster"
    for name, service in gateways.items():
        value = service["environment"]["TOKENRELAY_AUTH_SECRET"]
        required = REQUIRED_SECRET.match(value)
        assert required is not None, (name, value)
        assert "token_urlsafe(32)" in required["message"] and "32 bytes" in required["message"]
        assert "0.0.0.0" in service["command"], "they listen on the network: hence the secret"


def test_only_nginx_is_published_and_no_secret_is_on_a_command_line() -> None:
    services = compose()["services"]
    assert [name for name, s in services.items() if s.get("ports")] == ["nginx", "nginx-cluster"]
    for name, service in services.items():
        command = " ".join(service.get("command") or [])
        assert "--auth-secret" not in command and "--insecure" not in command, name
        environment = service.get("environment") or {}
        if not name.startswith("gateway"):
            assert "TOKENRELAY_AUTH_SECRET" not in environment, f"{name} needs no secret"
    for line in (REPO / "Procfile").read_text().splitlines():
        assert "--auth-secret" not in line and "--insecure" not in line, line
