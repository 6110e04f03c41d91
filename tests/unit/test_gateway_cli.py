"""`python -m gateway` flags that map onto `GatewayConfig`."""

from __future__ import annotations

from gateway.__main__ import config_of, serve_parser


def test_client_send_buffer_is_autotuned_unless_given() -> None:
    assert config_of(serve_parser().parse_args([])).send_buffer_bytes is None
    assert config_of(serve_parser().parse_args(["--client-send-buffer", "16384"])).send_buffer_bytes == 16384
