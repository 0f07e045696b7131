"""A local Hugging Face Hub cache, laid out exactly as `huggingface_hub` downloads into it, for offline tests.

`add_to_hub_cache(cache, "org/name", directory)` stores the files of `directory` as one commit of the model repo
`org/name`, the way `hf_hub_download` leaves them (see `huggingface_hub.file_download.hf_hub_download`):

    <cache>/models--org--name/
        blobs/<etag>                            file contents; the etag is the sha256 of an LFS file (weights), the
                                                git blob sha1 of any other file
        snapshots/<commit>/<path in the repo>   relative symlinks to ../../blobs/<etag> (deeper for subfolders)
        refs/main                               the commit hash, no newline

Point `HF_HUB_CACHE` at `<cache>` and set `HF_HUB_OFFLINE=1`, and every loader resolves `"org/name"` from there.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from huggingface_hub import scan_cache_dir

# Suffixes the Hub's default .gitattributes stores with git LFS: their etag (and blob name) is the sha256.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".pkl")


def _etag(path: Path) -> str:
    content = path.read_bytes()
    if path.suffix in LFS_SUFFIXES:
        return hashlib.sha256(content).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def add_to_hub_cache(cache: Path, repo_id: str, directory: Path, revision: str = "main") -> str:
    """Store every file under `directory` as the commit `revision` of model repo `repo_id` in the Hub cache
    `cache`; returns the commit hash. Checks the result with `huggingface_hub.scan_cache_dir`."""
    files = sorted(path for path in Path(directory).rglob("*") if path.is_file())
    etags = {path.relative_to(directory).as_posix(): _etag(path) for path in files}
    commit = hashlib.sha1("".join(f"{name} {etag}\n" for name, etag in etags.items()).encode()).hexdigest()
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    for path, (name, etag) in zip(files, etags.items()):
        blob = repo / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(path.read_bytes())
        pointer = repo / "snapshots" / commit / name
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    report = scan_cache_dir(cache)
    assert not report.warnings, report.warnings
    cached = {info.repo_id: info for info in report.repos}[repo_id]
    assert {ref for revision_info in cached.revisions for ref in revision_info.refs} >= {revision}
    return commit
