"""The model store: immutable, verified model bundles, alias pointers and a history.

    STORE/NAME/v1/               a bundle: the Hugging Face model directory (weights, config
                                 with id2label, tokenizer, distilray.json with max_length, no
                                 optimizer state) + eval.json, eval.md, lineage.json and
                                 manifest.json (sha256 and size of every other file)
    STORE/NAME/aliases/NAME.json {"version": "v1", ...}: `production`, `staging`, any name
    STORE/NAME/history.jsonl     one line per promotion and rollback

STORE is a local or NFS directory or an s3:// / gs:// URI (pyarrow filesystems). A version
exists once its manifest.json does: locally the bundle is built under a temp name and renamed
into place; on object stores the manifest is uploaded last. Readers verify the manifest, so a
tampered or half-copied bundle is refused, never loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distilray.checkpoints import NOT_SERVED
from distilray.errors import BundleError, ConfigError
from distilray.files import is_uri, publish_dir_atomic, sha256_file

MANIFEST = "manifest.json"
EVAL_FILE = "eval.json"
LINEAGE_FILE = "lineage.json"
HISTORY_FILE = "history.jsonl"
ALIASES_DIR = "aliases"
BUNDLE_FORMAT = "distilray-bundle/1"
SKIPPED = NOT_SERVED | {"eval.json", "eval.md", MANIFEST}
"""Checkpoint files a bundle never copies (it writes its own eval and manifest)."""
STORE_ENV = "DISTILRAY_MODEL_STORE"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
VERSION_RE = re.compile(r"^v([1-9][0-9]*)$")
ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,49}$")


@dataclass(frozen=True)
class ModelRef:
    """`STORE/NAME@REF`: REF is a version (`v3`), an alias (`production`) or None."""

    store: str
    name: str
    ref: str | None = None

    def __str__(self) -> str:
        return f"{self.store.rstrip('/')}/{self.name}" + (f"@{self.ref}" if self.ref else "")


def parse_model_ref(text: str, store: str | None = None) -> ModelRef:
    """`STORE/NAME@REF`, or `NAME@REF` with `store` (default: $DISTILRAY_MODEL_STORE)."""
    body, _, ref = text.partition("@")
    if "@" in text and not ref:
        raise ConfigError(f"model {text!r}: nothing after '@'; write NAME@production or NAME@v3")
    head, sep, name = body.rstrip("/").rpartition("/")
    root = head if sep else (store or os.environ.get(STORE_ENV))
    if not root:
        raise ConfigError(f"model {text!r} names no store: write STORE/NAME@ALIAS (a directory "
                          f"or s3:// / gs:// URI), pass --store, or set ${STORE_ENV}")
    check_name(name)
    if ref:
        check_ref(ref)
    return ModelRef(root, name, ref or None)


def check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise ConfigError(f"model name {name!r}: use letters, digits, '.', '_' or '-' "
                          "(starting with a letter or digit)")


def check_ref(ref: str) -> None:
    if not (VERSION_RE.match(ref) or ALIAS_RE.match(ref)):
        raise ConfigError(f"{ref!r} is neither a version (v1, v2, ...) nor an alias name "
                          "(lower-case letters, digits, '_' or '-', e.g. production)")


def check_alias(alias: str) -> None:
    if VERSION_RE.match(alias) or not ALIAS_RE.match(alias):
        raise ConfigError(f"alias {alias!r}: use lower-case letters, digits, '_' or '-' (not a "
                          "version like v2), e.g. production or staging")


# --------------------------------------------------------------------------- bundles


def write_bundle(checkpoint: Path, dest: Path, documents: dict[str, Any]) -> dict[str, Any]:
    """Copy the servable files of `checkpoint` into `dest`, add `documents` (file name →
    JSON data, or str for text) and, last, the manifest of every file."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(checkpoint.iterdir()):
        if f.is_file() and f.name not in SKIPPED and not f.name.startswith("."):
            shutil.copy2(f, dest / f.name)
    for name, data in documents.items():
        text = data if isinstance(data, str) else json.dumps(data, indent=2, default=str)
        (dest / name).write_text(text)
    manifest = {"format": BUNDLE_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": {f.name: {"sha256": sha256_file(f), "size": f.stat().st_size}
                          for f in sorted(dest.iterdir()) if f.is_file()}}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no files listed")
    except FileNotFoundError:
        raise BundleError(f"{path}: no {MANIFEST}; not a model bundle (or a half-written one)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{path / MANIFEST}: unreadable manifest ({exc})") from None
    return manifest


def verify_bundle(path: str | Path) -> dict[str, Any]:
    """The manifest of a bundle whose every file matches it; else BundleError naming the file
    and both hashes (a tampered, truncated or half-copied bundle is never loaded)."""
    path = Path(path)
    manifest = read_manifest(path)
    listed = manifest["files"]
    for name, entry in listed.items():
        f = path / name
        if not f.is_file():
            raise BundleError(f"{f}: missing; the manifest lists it (sha256 {entry['sha256']})")
        actual = sha256_file(f)
        if actual != entry["sha256"]:
            raise BundleError(f"{f}: sha256 {actual} does not match the manifest's "
                              f"{entry['sha256']}; the bundle was modified or half-copied "
                              "(restore it or promote the model again)")
    extra = sorted(f.name for f in path.iterdir() if f.name != MANIFEST and f.name not in listed
                   and not f.name.startswith("."))
    if extra:
        raise BundleError(f"{path}: files the manifest does not list: {', '.join(extra)}")
    return manifest


def weights_sha256(manifest: dict[str, Any]) -> str | None:
    files = manifest.get("files", {})
    entry = files.get("model.safetensors") or files.get("pytorch_model.bin")
    return entry["sha256"] if entry else None


# --------------------------------------------------------------------------- the store


class ModelStore:
    """One store root (a directory or an s3:// / gs:// URI) holding named models."""

    def __init__(self, root: str):
        self.root = root.rstrip("/") or root
        self.remote = is_uri(root)
        if self.remote:
            import pyarrow.fs as pafs

            try:
                self._fs, self._base = pafs.FileSystem.from_uri(self.root)
            except Exception as exc:  # pyarrow raises ArrowInvalid / OSError per scheme
                raise ConfigError(f"model store {root!r}: {exc}") from None
        else:
            self._fs, self._base = None, str(Path(root).expanduser().resolve())

    @classmethod
    def from_filesystem(cls, fs: Any, base: str, label: str) -> ModelStore:
        """A store on an already open pyarrow filesystem (tests use pyarrow's mock one)."""
        store = cls.__new__(cls)
        store.root, store.remote, store._fs, store._base = label, True, fs, base.rstrip("/")
        return store

    # ---- paths and bytes (local: pathlib and renames; remote: pyarrow)

    def _path(self, *parts: str) -> str:
        return "/".join([self._base, *parts])

    def uri(self, name: str, version: str) -> str:
        return f"{self.root}/{name}/{version}"

    def _read(self, *parts: str) -> bytes | None:
        path = self._path(*parts)
        try:
            if not self.remote:
                return Path(path).read_bytes()
            with self._fs.open_input_stream(path) as fh:
                return fh.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            if self.remote and "not exist" in str(exc).lower():
                return None
            raise BundleError(f"{self.root}: cannot read {'/'.join(parts)} ({exc})") from None

    def _write(self, data: bytes, *parts: str) -> None:
        """Whole-file write a reader sees all or nothing of (rename locally, one PUT remotely)."""
        path = self._path(*parts)
        if not self.remote:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, target)
            finally:
                Path(tmp).unlink(missing_ok=True)
            return
        self._fs.create_dir(path.rpartition("/")[0], recursive=True)
        with self._fs.open_output_stream(path) as fh:
            fh.write(data)

    def _children(self, *parts: str) -> list[str]:
        path = self._path(*parts)
        if not self.remote:
            p = Path(path)
            return sorted(c.name for c in p.iterdir()) if p.is_dir() else []
        import pyarrow.fs as pafs

        infos = self._fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return sorted(i.base_name for i in infos)

    def read_json(self, *parts: str) -> dict[str, Any] | None:
        data = self._read(*parts)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError as exc:
            raise BundleError(f"{self.root}/{'/'.join(parts)}: not valid JSON ({exc})") from None

    # ---- versions

    def names(self) -> list[str]:
        return [n for n in self._children() if NAME_RE.match(n) and self.versions(n)]

    def versions(self, name: str) -> list[str]:
        """Published versions (manifest present), oldest first."""
        found = [c for c in self._children(name) if VERSION_RE.match(c)]
        found = [v for v in found if self._read(name, v, MANIFEST) is not None]
        return sorted(found, key=lambda v: int(v[1:]))

    def resolve(self, name: str, ref: str | None) -> str:
        """The immutable version `ref` (a version or alias; None: `production`) points at."""
        ref = ref or "production"
        if VERSION_RE.match(ref):
            if ref not in self.versions(name):
                known = ", ".join(self.versions(name)) or "none"
                raise BundleError(f"{self.root}/{name}@{ref}: no such version (versions: {known})")
            return ref
        pointer = self.read_json(name, ALIASES_DIR, f"{ref}.json")
        if pointer is None:
            known = ", ".join(self.aliases(name)) or "none"
            raise BundleError(f"{self.root}/{name}@{ref}: no such alias (aliases: {known}); "
                              f"promote a version first (`distilray promote --to {self.root} "
                              f"--name {name}`)")
        return str(pointer["version"])

    def aliases(self, name: str) -> dict[str, str]:
        out = {}
        for child in self._children(name, ALIASES_DIR):
            if child.endswith(".json") and ALIAS_RE.match(child[:-5]):
                pointer = self.read_json(name, ALIASES_DIR, child) or {}
                if "version" in pointer:
                    out[child[:-5]] = str(pointer["version"])
        return out

    def manifest(self, name: str, version: str) -> dict[str, Any]:
        manifest = self.read_json(name, version, MANIFEST)
        if manifest is None:
            raise BundleError(f"{self.uri(name, version)}: no {MANIFEST}")
        return manifest

    def find_weights(self, name: str, sha256: str) -> str | None:
        """The version already holding these weights, so promoting a model twice stores it once."""
        for version in self.versions(name):
            if weights_sha256(self.manifest(name, version)) == sha256:
                return version
        return None

    def publish(self, name: str, build: Callable[[Path], Any]) -> str:
        """Build a bundle with `build(dir)` and publish it as the next version; returns it."""
        check_name(name)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-incoming-",
                                        dir=None if self.remote else self._ensure_dir(name)))
        try:
            build(staging)
            read_manifest(staging)
            for _ in range(100):  # another writer may take a number first: take the next
                existing = [int(c[1:]) for c in self._children(name) if VERSION_RE.match(c)]
                version = f"v{max(existing, default=0) + 1}"
                if self._place(staging, name, version):
                    return version
            raise BundleError(f"{self.root}/{name}: could not pick a free version number")
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _ensure_dir(self, name: str) -> str:
        path = Path(self._path(name))
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BundleError(f"model store {self.root}: cannot create {path} ({exc.strerror})") from None
        return str(path)

    def _place(self, staging: Path, name: str, version: str) -> bool:
        target = self._path(name, version)
        if not self.remote:
            try:
                os.rename(staging, target)  # atomic; fails if another writer took the number
            except OSError:
                if Path(target).exists():
                    return False
                raise
            return True
        if self._children(name, version):
            return False
        files = sorted(f for f in staging.iterdir() if f.name != MANIFEST)
        for f in [*files, staging / MANIFEST]:  # the manifest last: it publishes the version
            self._write(f.read_bytes(), name, version, f.name)
        return True

    # ---- aliases and history

    def set_alias(self, name: str, alias: str, version: str, action: str,
                  detail: dict[str, Any] | None = None) -> str | None:
        """Point `alias` at `version` (atomically); append the move to the history; return the
        version it pointed at before."""
        check_alias(alias)
        if version not in self.versions(name):
            raise BundleError(f"{self.root}/{name}@{version}: no such version")
        previous = self.aliases(name).get(alias)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        pointer = {"version": version, "previous": previous, "set_at": now, "action": action}
        self._write(json.dumps(pointer, indent=2).encode(), name, ALIASES_DIR, f"{alias}.json")
        self.append_history(name, {"at": now, "action": action, "alias": alias, "version": version,
                                   "previous": previous, **(detail or {})})
        return previous

    def history(self, name: str) -> list[dict[str, Any]]:
        data = self._read(name, HISTORY_FILE) or b""
        rows = []
        for line in data.decode().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line torn by a killed writer
        return rows

    def append_history(self, name: str, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str) + "\n"
        if not self.remote:
            Path(self._ensure_dir(name), HISTORY_FILE).open("a").write(line)
            return
        self._write((self._read(name, HISTORY_FILE) or b"") + line.encode(), name, HISTORY_FILE)

    # ---- reading a bundle

    def local_bundle(self, name: str, version: str, cache_dir: str | Path | None = None) -> Path:
        """A verified local directory of the bundle: the store's own (local) or a downloaded copy."""
        if not self.remote:
            path = Path(self._path(name, version))
            if not path.is_dir():
                raise BundleError(f"{self.uri(name, version)}: no such bundle")
            verify_bundle(path)
            return path
        cache = Path(cache_dir or os.environ.get("DISTILRAY_CACHE", "~/.cache/distilray")).expanduser()
        key = re.sub(r"[^A-Za-z0-9._-]+", "_", self.root)
        target = cache / "bundles" / key / name / version

        def download(tmp: Path) -> None:
            for child in self._children(name, version):
                data = self._read(name, version, child)
                if data is not None:
                    (tmp / child).write_bytes(data)

        if (target / MANIFEST).exists():
            try:
                verify_bundle(target)
                return target
            except BundleError:
                shutil.rmtree(target, ignore_errors=True)  # a corrupt cache: download again
        publish_dir_atomic(download, target, marker=MANIFEST)
        verify_bundle(target)
        return target

    def describe(self, name: str, version: str) -> dict[str, Any]:
        """What `distilray models show` prints: manifest, eval and lineage of one version."""
        manifest = self.manifest(name, version)
        return {"model": name, "version": version, "uri": self.uri(name, version),
                "aliases": sorted(a for a, v in self.aliases(name).items() if v == version),
                "created": manifest.get("created"),
                "files": {k: v["size"] for k, v in manifest["files"].items()},
                "eval": self.read_json(name, version, EVAL_FILE) or {},
                "lineage": self.read_json(name, version, LINEAGE_FILE) or {}}


