"""deploy/nginx.conf in front of real gateway processes, where nginx is installed (Debian's
`apt-get install nginx`; compose runs nginx 1.27). The file is used as shipped except for
what only Docker provides: the gateways' names (with 1.27's `resolve`) become local ports,
and Docker's DNS resolver line goes."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import openai
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from store.embedded import free_port
from tests.support import REPO, Client, ProcessCluster, http_ok, t, wait_until

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
pytestmark = pytest.mark.skipif(not Path(NGINX).exists(), reason="needs nginx (apt-get install nginx)")


def render(gateway_ports: list[int], port: int, http_ports: list[int] | None = None) -> str:
    conf = (REPO / "deploy" / "nginx.conf").read_text()
    for upstream_port, local_ports in (("8000", gateway_ports), ("8001", http_ports or gateway_ports)):
        servers = re.findall(rf"server gateway-\d+:{upstream_port} resolve ", conf)
        assert len(servers) == 3
        for server, gw in zip(servers, local_ports * 3):
            conf = conf.replace(server, f"server 127.0.0.1:{gw} ", 1)
    conf = re.sub(r"\n\s*resolver [^\n]*;", "", conf)
    assert "listen 8080;" in conf
    return conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")


def test_the_shipped_file_passes_nginx_t(tmp_path: Path) -> None:
    conf = tmp_path / "nginx.conf"
    conf.write_text(render([8000], 8080))
    done = subprocess.run([NGINX, "-t", "-c", str(conf), "-p", str(tmp_path), "-g",
                           f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;"],
                          capture_output=True, text=True, timeout=t(30))
    assert done.returncode == 0, done.stderr


async def start_nginx(tmp_path: Path, conf_text: str, port: int) -> asyncio.subprocess.Process:
    conf = tmp_path / "nginx.conf"
    conf.write_text(conf_text)
    nginx = await asyncio.create_subprocess_exec(
        NGINX, "-c", str(conf), "-p", str(tmp_path), "-g",
        f"daemon off; pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    await wait_until(lambda: http_ok(port, "/healthz"), timeout=20)
    return nginx


async def test_through_nginx_v1_streams_unbuffered_and_a_closed_stream_stops_the_worker(
    process_cluster: ProcessCluster, tmp_path: Path,
) -> None:
    http_ports = [free_port(), free_port()]
    gateways = [process_cluster.add_gateway("--http-port", str(p)).port or 0 for p in http_ports]
    process_cluster.add_worker("--engine", "synthetic", "--synthetic-rate", "20")
    await process_cluster.wait_healthy()
    port = free_port()
    nginx = await start_nginx(tmp_path, render(gateways, port, http_ports), port)
    try:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="dev", max_retries=0)
        async with client:
            assert [m.id for m in (await client.models.list()).data] == ["synthetic"]
            stream = await client.chat.completions.create(
                model="synthetic", messages=[{"role": "user", "content": "hi"}], max_tokens=2000, stream=True)
            chunks = []
            async for chunk in stream:  # of an answer that takes 100 s: they come as they are made
                chunks.append(chunk)
                if len(chunks) == 3:
                    break
            await stream.close()
            mid = chunks[0].id.removeprefix("chatcmpl-")

            def finished() -> list[dict[str, Any]]:
                lines = (line for w in process_cluster.workers for line in w.log_path.read_text().splitlines())
                return [r for r in map(json.loads, (line for line in lines if line.startswith("{")))
                        if r.get("event") == "job_finished" and r.get("message_id") == mid]

            await wait_until(lambda: bool(finished()), timeout=10)
            # the gateway's push (nginx closed its connection), not the orphan check 15 s later
            assert [(r["outcome"], r["cancel_source"]) for r in finished()] == [("cancelled", "push")]
    finally:
        nginx.terminate()
        await nginx.wait()


async def test_through_nginx_the_page_origin_is_allowed_and_a_handshake_flood_gets_429(
    process_cluster: ProcessCluster, tmp_path: Path,
) -> None:
    gateways = [process_cluster.add_gateway().port or 0 for _ in range(2)]
    await process_cluster.wait_healthy()
    port = free_port()
    nginx = await start_nginx(tmp_path, render(gateways, port), port)
    try:
        own = f"http://127.0.0.1:{port}"  # the demo page as nginx serves it
        c = Client(await connect(f"ws://127.0.0.1:{port}/ws", origin=own))  # type: ignore[arg-type]
        assert (await c.request(type="heartbeat", ts=1))["type"] == "heartbeat_ack"
        await c.close()
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"ws://127.0.0.1:{port}/ws", origin="http://evil.example")  # type: ignore[arg-type]
        assert refused.value.response.status_code == 403

        async def handshake() -> int:
            try:
                ws = await connect(f"ws://127.0.0.1:{port}/ws")
            except InvalidStatus as exc:
                return exc.response.status_code
            await ws.close()
            return 101

        started = asyncio.get_running_loop().time()
        statuses = await asyncio.gather(*(handshake() for _ in range(80)))
        elapsed = asyncio.get_running_loop().time() - started
        assert set(statuses) == {101, 429}, statuses  # burst 40 (2 taken above), then 10 a second
        assert 30 <= statuses.count(101) <= 41 + 10 * elapsed, (statuses.count(101), elapsed)
    finally:
        nginx.terminate()
        await nginx.wait()
