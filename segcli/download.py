"""Weights by name or URL: downloaded once into a cache, read offline afterwards.

Three sources, each with its own cache:

* an ``http(s)://`` URL (MMSegmentation's pretrained ViTs, MMCV's ResNets): :func:`fetch_url`
  writes ``$SEGCLI_CACHE/weights/<file name>``. The transfer goes to ``<file>.part`` and is resumed
  with an HTTP ``Range`` request when a run was interrupted; a file name that carries a hash
  (torch.hub's and MMSegmentation's convention: ``name-<8+ hex digits>.ext``, the prefix of the
  file's SHA-256) is checked before the atomic rename, and a mismatch is refused and removed.
* a model-hub file (the released SegViT checkpoints, ``Akide/SegViTv1``): :func:`fetch_hub_file`,
  through ``huggingface_hub`` (its cache, resume, etag checks; ``HF_HUB_OFFLINE``).
* ``timm:NAME``: :func:`timm_weights` looks the name up in timm's pretrained configs and fetches
  the file its hub repo (or URL) holds; timm itself never runs a download.

Decisions: nothing here downloads unless it is asked for a name or URL; a file already in a cache
is returned without touching the network (released files do not change under their names).
``HF_HUB_OFFLINE=1`` means offline for URLs too. Without network every source fails in one line
that names the file to place by hand and where. Progress reaches the caller as :class:`Transfer`
values through a callback; this module never prints.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from http.client import HTTPException
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import Request, urlopen

from .errors import SegcliError, did_you_mean
from .version import __version__

PRETRAINED_KEY = "model.backbone.pretrained"
CHUNK = 1 << 20
# torch.hub's HASH_REGEX, at least 8 hex digits: ``vit_large_p16_384_20220308-d4efb41d.pth``
HASHED_NAME = re.compile(r"-([0-9a-f]{8,})\.[^-]+$")


@dataclass(frozen=True)
class Transfer:
    """One report of a download: what, from where, to where, its size (None: not told) and bytes so far."""

    what: str
    source: str
    dest: Path
    size: int | None
    done: int
    finished: bool = False


Progress = Callable[[Transfer], None]


def _ignore(_: Transfer) -> None:
    return None


def cache_dir() -> Path:
    """segcli's cache: ``$SEGCLI_CACHE``, default ``~/.cache/segcli``."""
    return Path(os.environ.get("SEGCLI_CACHE", "~/.cache/segcli")).expanduser()


def offline() -> bool:
    """``HF_HUB_OFFLINE`` set to a true value (read at each call, so a test or script can set it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> Path | None:
    """The model hub's cache as its environment says (``HF_HUB_CACHE``, ``HF_HOME/hub``), read at each
    call; None leaves huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return None


def is_url(ref: str) -> bool:
    return ref.startswith(("http://", "https://"))


def file_name(url: str) -> str:
    return Path(urlsplit(url).path).name


def hash_prefix(name: str) -> str | None:
    """The SHA-256 prefix a file name carries (``-d4efb41d.pth``), or None."""
    match = HASHED_NAME.search(name)
    return match.group(1) if match else None


def url_cache_path(url: str, cache: Path | None = None) -> Path:
    """Where :func:`fetch_url` keeps ``url``: ``<cache>/weights/<file name>``."""
    name = file_name(url)
    if not name:
        raise SegcliError(f"the URL names no file: {url}", PRETRAINED_KEY, "give the URL of a weights file")
    return (cache or cache_dir()) / "weights" / name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _by_hand(dest: Path) -> str:
    return f"download it where there is a network and place it at {dest}"


def _total(response, start: int) -> int | None:
    """The whole file's size from a 200 (Content-Length) or 206 (Content-Range: bytes a-b/total) reply."""
    content_range = response.headers.get("Content-Range", "")
    if "/" in content_range and content_range.rsplit("/", 1)[1].isdigit():
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    return int(length) + start if length and length.isdigit() else None


def fetch_url(url: str, cache: Path | None = None, progress: Progress | None = None, where: str = PRETRAINED_KEY,
              timeout: float = 30.0) -> Path:
    """The local copy of ``url``, downloaded first if it is not cached (module docstring)."""
    report = progress or _ignore
    dest = url_cache_path(url, cache)
    if dest.is_file():
        return dest
    if offline():
        raise SegcliError(f"{dest.name} is not cached and HF_HUB_OFFLINE is set", where, _by_hand(dest))
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    start = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": f"segcli/{__version__}"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        response = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as err:
        if err.code == 416 and start:  # nothing after the .part's end: the transfer had finished
            response = None
        else:
            raise SegcliError(f"cannot download {dest.name}: HTTP {err.code} {err.reason} from {url}", where,
                              f"check the URL, or {_by_hand(dest)}") from None
    except (URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise SegcliError(f"cannot download {dest.name} from {url} (no network? {reason})", where,
                          _by_hand(dest)) from None
    if response is not None:
        with response:
            if start and response.status != 206:  # the server ignored Range: start again
                start = 0
            size = _total(response, start)
            done = start
            report(Transfer(dest.name, url, dest, size, done))
            try:
                with open(part, "ab" if start else "wb") as handle:
                    while chunk := response.read(CHUNK):
                        handle.write(chunk)
                        done += len(chunk)
                        report(Transfer(dest.name, url, dest, size, done))
            except (OSError, HTTPException) as err:  # connection lost, or closed before Content-Length
                raise SegcliError(f"the download of {dest.name} stopped after {done} bytes ({err!r})", where,
                                  f"run again to resume it from {part}") from None
        if size is not None and done != size:
            raise SegcliError(f"the download of {dest.name} stopped after {done} of {size} bytes", where,
                              f"run again to resume it from {part}")
    expected = hash_prefix(dest.name)
    if expected is not None:
        actual = _sha256(part)
        if not actual.startswith(expected):
            part.unlink()
            raise SegcliError(f"{dest.name} from {url} has SHA-256 {actual[:len(expected)]}..., not the {expected} "
                              "its name carries; the file was removed", where,
                              "run again to download it anew; if it fails again the server holds another file")
    os.replace(part, dest)  # atomic: a reader sees no file or the whole, checked file
    report(Transfer(dest.name, url, dest, dest.stat().st_size, dest.stat().st_size, finished=True))
    return dest


def _reporting_tqdm(report: Progress, what: str, source: str, dest: Path):
    """A tqdm class for huggingface_hub's ``tqdm_class``: it counts bytes into ``report`` and draws nothing."""
    from tqdm.std import tqdm

    class Reporting(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs["file"] = io.StringIO()  # drawn by whoever receives the reports, not here
            super().__init__(*args, **kwargs)
            report(Transfer(what, source, dest, self.total, self.n))

        def update(self, n=1):
            shown = super().update(n)
            report(Transfer(what, source, dest, self.total, self.n))
            return shown

    return Reporting


def hub_endpoint() -> str:
    """The model hub's address (``HF_ENDPOINT``: a mirror), read at each call."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_url(repo: str, filename: str, revision: str | None = None) -> str:
    return f"{hub_endpoint()}/{repo}/resolve/{revision or 'main'}/{filename}"


def _unreachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """Why a TCP connection to ``endpoint`` fails (name lookup, refused, timeout), or None when it opens."""
    import socket

    parts = urlsplit(endpoint)
    try:
        socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError as err:
        return str(err) or err.__class__.__name__
    return None


def cached_hub_file(repo: str, filename: str, revision: str | None = None) -> Path | None:
    """The hub file if it is in the hub's cache (no network), else None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=hub_cache_dir(), revision=revision)
    return Path(found) if isinstance(found, str) else None


def fetch_hub_file(repo: str, filename: str, revision: str | None = None, progress: Progress | None = None,
                   where: str = "--model", by_hand: str | None = None) -> Path:
    """A file of a model-hub repo, from the hub's cache or downloaded into it. ``by_hand`` is what
    to tell a user without network (default: where the hub's cache would keep it)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    cached = cached_hub_file(repo, filename, revision)
    if cached is not None:
        return cached
    url = hub_url(repo, filename, revision)
    cache = hub_cache_dir() or Path("~/.cache/huggingface/hub").expanduser()
    dest = cache / f"models--{repo.replace('/', '--')}"
    manual = by_hand or f"download {url} where there is a network and copy the hub cache {dest}"
    if offline():
        raise SegcliError(f"{filename} of {repo} is not cached and HF_HUB_OFFLINE is set", where, manual)
    reason = _unreachable(hub_endpoint())
    if reason:  # fail at once: huggingface_hub would retry for half a minute, logging each try
        raise SegcliError(f"cannot download {filename} from {url} (no network? {reason})", where, manual)
    try:
        path = hf_hub_download(repo, filename, revision=revision, cache_dir=hub_cache_dir(), endpoint=hub_endpoint(),
                               tqdm_class=_reporting_tqdm(progress or _ignore, filename, url, dest))
    except LocalEntryNotFoundError:  # no connection and not cached
        raise SegcliError(f"cannot download {filename} from {url} (no network?)", where, manual) from None
    except (EntryNotFoundError, RepositoryNotFoundError) as err:
        raise SegcliError(f"{repo} has no {filename} ({err.__class__.__name__})", where,
                          "the hub repo changed: report it, or convert the file yourself") from None
    except (HfHubHTTPError, OSError) as err:
        raise SegcliError(f"cannot download {filename} from {url} ({str(err).splitlines()[0][:160]})", where,
                          manual) from None
    path = Path(path)
    (progress or _ignore)(Transfer(filename, url, path, path.stat().st_size, path.stat().st_size, finished=True))
    return path


# the files a timm hub repo holds weights in, preferred first (timm/models/_hub.py)
TIMM_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def _timm_cfg(name: str, where: str):
    import timm
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:  # an unknown architecture or tag
        cfg = None
    if cfg is None:
        tagged = timm.list_pretrained(name.split(".")[0] + "*")
        raise SegcliError(f"timm has no pretrained weights named '{name}'", where,
                          did_you_mean(name, tagged) if tagged else "see timm.list_pretrained() for the names")
    return cfg


def _timm_hub_files(cfg) -> tuple[str, str | None, tuple[str, ...]]:
    repo, _, revision = cfg.hf_hub_id.partition("@")
    return repo, revision or None, (cfg.hf_hub_filename,) if cfg.hf_hub_filename else TIMM_HUB_FILES


def cached_timm_weights(name: str) -> Path | None:
    """timm's pretrained weights ``name`` if a cache holds them (no network), else None."""
    try:
        cfg = _timm_cfg(name, PRETRAINED_KEY)
    except SegcliError:
        return None
    if cfg.hf_hub_id:
        repo, revision, files = _timm_hub_files(cfg)
        for filename in files:
            if (cached := cached_hub_file(repo, filename, revision)) is not None:
                return cached
    if cfg.url and (path := url_cache_path(cfg.url)).is_file():
        return path
    return None


def timm_weights(name: str, progress: Progress | None = None, where: str = PRETRAINED_KEY) -> Path:
    """The local file of timm's pretrained weights ``name`` (``vit_base_patch16_384.augreg_in21k_ft_in1k``):
    from its hub repo (the model hub's cache), else its URL (segcli's cache)."""
    cached = cached_timm_weights(name)
    if cached is not None:
        return cached
    cfg = _timm_cfg(name, where)
    if cfg.hf_hub_id:
        repo, revision, files = _timm_hub_files(cfg)
        for index, filename in enumerate(files):
            try:
                return fetch_hub_file(repo, filename, revision, progress, where)
            except SegcliError as err:  # the repo holds the next file of the list instead
                if index == len(files) - 1 or f"has no {filename}" not in err.message:
                    raise
    if cfg.url:
        return fetch_url(cfg.url, progress=progress, where=where)
    raise SegcliError(f"timm's '{name}' names no file to download", where, "give a local file or a URL")
