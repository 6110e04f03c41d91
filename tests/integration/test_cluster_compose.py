"""compose.yaml's `cluster` profile, read as Docker Compose reads it (Docker cannot run here):
six Redis 7 cluster nodes formed by an init service, and gateways and workers on it."""

from __future__ import annotations

from typing import Any

import yaml

from tests.support import REPO


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((REPO / "compose.yaml").read_text())
    return document


def test_six_cluster_nodes_formed_with_a_replica_each() -> None:
    services = compose()["services"]
    nodes = [name for name, s in services.items() if "--cluster-enabled" in (s.get("command") or [])]
    assert len(nodes) == 6
    for name in nodes:
        node = services[name]
        assert node["image"].startswith("redis:7") and node["profiles"] == ["cluster"]
        assert node["command"][node["command"].index("--cluster-announce-hostname") + 1] == node["hostname"] == name
        assert "healthcheck" in node
    init = services["redis-cluster-init"]
    script = init["command"][0]
    assert "--cluster-replicas 1 --cluster-yes" in script
    assert all(f"{name}:6379" in script for name in nodes)
    assert {dep: c["condition"] for dep, c in init["depends_on"].items()} == dict.fromkeys(nodes, "service_healthy")


def test_gateways_and_workers_of_the_profile_run_on_the_cluster() -> None:
    document = compose()
    services = document["services"]
    apps = {n: s for n, s in services.items() if "cluster" in s.get("profiles", []) and s.get("command", [""])[0] == "python"}
    assert sorted(apps) == ["gateway-cluster-1", "gateway-cluster-2", "gateway-cluster-3", "worker-cluster"]
    for name, app in apps.items():
        command = app["command"]
        assert "--redis-cluster" in command, name
        assert command[command.index("--redis-url") + 1].startswith("redis://redis-node-"), name
        assert app["depends_on"] == {"redis-cluster-init": {"condition": "service_completed_successfully"}}, name
    aliases = sorted(a for n in apps if n.startswith("gateway") for a in services[n]["networks"]["cluster"]["aliases"])
    assert aliases == ["gateway-1", "gateway-2", "gateway-3"], "nginx.conf's upstream names, on the cluster network"
    assert services["nginx-cluster"]["networks"] == ["cluster"]


def test_every_dependency_and_volume_exists_in_the_same_profile() -> None:
    document = compose()
    services = document["services"]
    for name, service in services.items():
        for dependency in service.get("depends_on") or {}:
            assert dependency in services, (name, dependency)
            needed = set(services[dependency].get("profiles", []))
            assert not needed or needed & set(service.get("profiles", [])), (name, dependency)
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0]
            assert source.startswith((".", "/")) or source in document["volumes"], (name, source)
