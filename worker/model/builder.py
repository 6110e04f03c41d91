"""Deterministic builder for the tiny built-in `llama` GGUF model.

The model is real llama architecture with random (seeded) weights, so llama.cpp runs it
exactly like a downloaded model, but it loads in milliseconds and decodes thousands of
tokens per second on a laptop CPU. Its output is nonsense that still reads as words:

- the vocabulary is SentencePiece-style ("llama" tokenizer): <unk>, <s>, </s>, 256 byte
  tokens, single characters, consonant-vowel syllables and pseudo-words such as "▁banoki".
  Every ▁-word's syllable prefixes are in the vocabulary too, because llama.cpp's SPM
  tokenizer only reaches a piece through merges whose intermediate pieces exist;
- channel 0 of the residual stream is a constant (the embeddings set it, no layer writes
  to it), so column 0 of the output matrix acts as a per-token logit bias. It makes
  words likely, loose syllables and characters rare, and EOS rare but possible.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt

BUILTIN_VERSION = 1
DEFAULT_SEED = 0

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}\n"
    "{% else %}{{ message['content'] }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

_CONSONANTS = "bdfghklmnprstvz"
_VOWELS = "aeiou"
_CHARS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    ".,!?;:'\"-()/"
)
_SPACE = "\u2581"

# Logit biases (before scaling by the constant channel) per token kind.
_BIAS_WORD = 0.0
_BIAS_SYLLABLE = -1.0
_BIAS_CHAR = -2.0
_BIAS_SPECIAL = -8.0
# EOS: with top-k 40, top-p 0.95, min-p 0.05, temp 0.8 about 1 reply in 8 stops within 200
# tokens (llama.cpp's sampler cuts a rare token off entirely, so this sits near a cliff).
_BIAS_EOS = 1.7
_BIAS_CHANNEL = 4.0  # value of residual channel 0 for every token


@dataclass(frozen=True, slots=True)
class ModelSpec:
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_ff: int = 128
    n_ctx: int = 2048
    two_syllable_words: int = 2000
    three_syllable_words: int = 2500
    rms_eps: float = 1e-5
    eos_bias: float = _BIAS_EOS
    """-1000 or so: EOS's logit falls thousands below every other, its probability is exactly 0
    in float32, and an answer ends only at its length limit (for tests that must stop a
    generation before it ends)."""


@dataclass(frozen=True, slots=True)
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    biases: npt.NDArray[np.float32]
    """Logit bias per token, written into output-matrix column 0."""


UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


def build_vocab(rng: np.random.Generator, spec: ModelSpec) -> Vocab:
    """Specials, bytes, characters, syllables, then ▁-words closed under syllable prefixes."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    biases = [_BIAS_SPECIAL, _BIAS_SPECIAL, spec.eos_bias]
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>")
        types.append(gguf.TokenType.BYTE)
        biases.append(_BIAS_SPECIAL)

    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    pieces: list[tuple[str, float]] = [(_SPACE, _BIAS_CHAR)]
    pieces += [(ch, _BIAS_CHAR) for ch in _CHARS]
    pieces += [(s, _BIAS_SYLLABLE) for s in syllables if s not in _CHARS]

    words: dict[str, None] = {}  # insertion-ordered set
    for s in syllables:
        words[s] = None
    n_syl = len(syllables)
    for count, length in ((spec.two_syllable_words, 2), (spec.three_syllable_words, 3)):
        picks = rng.integers(0, n_syl, size=(count, length))
        for row in picks:
            parts = [syllables[int(i)] for i in row]
            for end in range(1, length + 1):
                words["".join(parts[:end])] = None
    pieces += [(_SPACE + w, _BIAS_WORD) for w in words]

    for text, bias in pieces:
        tokens.append(text)
        types.append(gguf.TokenType.NORMAL)
        biases.append(bias)
    # SPM merge priority: a higher score merges first; the chains are unambiguous, so
    # any strictly decreasing order works.
    scores = [0.0] * (3 + 256) + [-float(i) / 100.0 for i in range(len(pieces))]
    return Vocab(tokens, scores, [int(t) for t in types], np.asarray(biases, np.float32))


def _normal(
    rng: np.random.Generator, shape: tuple[int, ...], std: float
) -> npt.NDArray[np.float32]:
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)


def build_tensors(
    rng: np.random.Generator, spec: ModelSpec, vocab: Vocab
) -> dict[str, npt.NDArray[np.float32] | npt.NDArray[np.float16]]:
    """Random llama weights (numpy shapes are ggml's dims reversed)."""
    n_vocab, d, ff = len(vocab.tokens), spec.n_embd, spec.n_ff
    tensors: dict[str, npt.NDArray[np.float32] | npt.NDArray[np.float16]] = {}

    embd = _normal(rng, (n_vocab, d), 1.0)
    embd[:, 0] = _BIAS_CHANNEL
    tensors["token_embd.weight"] = embd.astype(np.float16)

    for layer in range(spec.n_layer):
        p = f"blk.{layer}."
        tensors[p + "attn_norm.weight"] = np.ones(d, np.float32)
        tensors[p + "attn_q.weight"] = _normal(rng, (d, d), 1.0 / np.sqrt(d))
        tensors[p + "attn_k.weight"] = _normal(rng, (d, d), 1.0 / np.sqrt(d))
        tensors[p + "attn_v.weight"] = _normal(rng, (d, d), 1.0 / np.sqrt(d))
        attn_out = _normal(rng, (d, d), 0.5 / np.sqrt(d))
        attn_out[0, :] = 0.0  # keep the bias channel constant
        tensors[p + "attn_output.weight"] = attn_out
        tensors[p + "ffn_norm.weight"] = np.ones(d, np.float32)
        tensors[p + "ffn_gate.weight"] = _normal(rng, (ff, d), 1.0 / np.sqrt(d))
        tensors[p + "ffn_up.weight"] = _normal(rng, (ff, d), 1.0 / np.sqrt(d))
        ffn_down = _normal(rng, (d, ff), 0.5 / np.sqrt(ff))
        ffn_down[0, :] = 0.0
        tensors[p + "ffn_down.weight"] = ffn_down

    tensors["output_norm.weight"] = np.ones(d, np.float32)
    out = _normal(rng, (n_vocab, d), 0.35)
    out[:, 0] = vocab.biases
    out[EOS_ID, 1:] = 0.0  # EOS depends on the bias channel only: a steady small rate
    tensors["output.weight"] = out.astype(np.float16)
    return tensors


def write_model(path: Path, seed: int = DEFAULT_SEED, spec: ModelSpec = ModelSpec()) -> None:
    """Write the model to `path` (not atomically; see `ensure_builtin_model`)."""
    rng = np.random.default_rng(seed)
    vocab = build_vocab(rng, spec)
    tensors = build_tensors(rng, spec, vocab)

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(f"tokenrelay-builtin-v{BUILTIN_VERSION}-s{seed}")
    writer.add_description("Random-weight llama model generated by tokenrelay for tests.")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(spec.n_ctx)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head)
    writer.add_layer_norm_rms_eps(spec.rms_eps)
    writer.add_rope_dimension_count(spec.n_embd // spec.n_head)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(vocab.tokens))

    writer.add_tokenizer_model("llama")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    writer.add_chat_template(CHAT_TEMPLATE)

    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def cache_dir() -> Path:
    """`$TOKENRELAY_CACHE`, else `$XDG_CACHE_HOME/tokenrelay`, else `~/.cache/tokenrelay`."""
    explicit = os.environ.get("TOKENRELAY_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "tokenrelay"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def builtin_model_path(seed: int = DEFAULT_SEED) -> Path:
    return cache_dir() / f"tokenrelay-builtin-v{BUILTIN_VERSION}-s{seed}.gguf"


def ensure_builtin_model(seed: int = DEFAULT_SEED) -> Path:
    """Return the cached model, building it first if missing.

    Safe when several processes start at once: each writes its own temp file in the
    cache folder and renames it into place; the files are identical, so the last
    rename wins harmlessly.
    """
    path = builtin_model_path(seed)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_model(tmp, seed)
        tmp.chmod(0o644)  # mkstemp creates 0600; the cache may be shared
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
