"""The built-in GGUF model is deterministic, real llama architecture, and cached atomically."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from worker.model import BUILTIN_VERSION, CHAT_TEMPLATE, builder


def _field(reader: gguf.GGUFReader, key: str) -> object:
    field = reader.get_field(key)
    assert field is not None, key
    return field.contents()


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    builder.write_model(first, seed=0)
    builder.write_model(second, seed=0)
    assert first.read_bytes() == second.read_bytes()


def test_different_seed_gives_different_bytes(tmp_path: Path) -> None:
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    builder.write_model(first, seed=0)
    builder.write_model(second, seed=1)
    assert first.read_bytes() != second.read_bytes()


def test_file_is_a_small_llama_model_with_chat_template(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    builder.write_model(path, seed=0)
    assert path.stat().st_size < 5_000_000
    reader = gguf.GGUFReader(path)
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE
    assert _field(reader, "llama.block_count") == 2

    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert isinstance(tokens, list) and isinstance(types, list)
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert tokens[3] == "<0x00>" and tokens[258] == "<0xFF>"
    assert types.count(int(gguf.TokenType.BYTE)) == 256
    words = [t for t in tokens if t.startswith("\u2581") and len(t) > 1]
    assert len(words) > 2000
    assert all(t[1:].isalpha() for t in words)

    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output.weight", "blk.1.ffn_down.weight"} <= names
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert int(np.prod(embd.shape)) == len(tokens) * 64


def test_every_word_prefix_is_in_the_vocab() -> None:
    """llama.cpp's SPM tokenizer reaches a word only through pieces that exist."""
    vocab = builder.build_vocab(np.random.default_rng(0), builder.ModelSpec())
    words = {t for t in vocab.tokens if t.startswith("\u2581") and len(t) > 1}
    for word in words:
        for end in range(3, len(word), 2):
            assert word[:end] in words, word


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TOKENRELAY_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert builder.cache_dir() == tmp_path / "xdg" / "tokenrelay"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert builder.cache_dir() == tmp_path / "home" / ".cache" / "tokenrelay"
    monkeypatch.setenv("TOKENRELAY_CACHE", str(tmp_path / "explicit"))
    assert builder.cache_dir() == tmp_path / "explicit"


def test_ensure_builtin_model_builds_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOKENRELAY_CACHE", str(tmp_path / "cache"))
    path = builder.ensure_builtin_model(seed=3)
    assert path == tmp_path / "cache" / f"tokenrelay-builtin-v{BUILTIN_VERSION}-s3.gguf"
    assert path.is_file()
    mtime = path.stat().st_mtime_ns
    assert builder.ensure_builtin_model(seed=3) == path
    assert path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files left

    reference = tmp_path / "ref.gguf"
    builder.write_model(reference, seed=3)
    assert path.read_bytes() == reference.read_bytes()
