"""Pretrained weights by URL and by timm name (segcli/download.py), all offline: URLs are served by
a local HTTP server on 127.0.0.1 (with Range support), timm names come from a model-hub cache
prepared in the hub's documented layout."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from conftest import REPO

from segcli import api
from segcli.download import Transfer, fetch_url, hash_prefix, timm_weights, url_cache_path
from segcli.errors import SegcliError
from segcli.models.backbones.vit import ViTBackbone, ViTConfig
from segcli.models.backbones.weights import cached_weights, load_state_dict_file, resolve_weights
from segcli.workflows.train import fetch_pretrained

FIXTURES = REPO / "tests" / "fixtures"


class Server:
    """Files of ``root`` over HTTP; honours ``Range: bytes=N-``; records each request's path and Range;
    ``cut[name] = n`` sends the full Content-Length but closes after n bytes (a dropped connection)."""

    def __init__(self, root: Path):
        self.root, self.requests, self.cut = root, [], {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                path = server.root / self.path.lstrip("/")
                server.requests.append((self.path, self.headers.get("Range")))
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = 0
                if self.headers.get("Range", "").startswith("bytes="):
                    start = int(self.headers["Range"][len("bytes="):].split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: server.cut.pop(path.name, len(body))])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    srv = Server(root)
    yield srv
    srv.close()


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGCLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "cache"


def _serve(server: Server, source: Path, stem: str) -> tuple[str, bytes]:
    """``source`` served as ``<stem>-<sha256 prefix>.pth`` (MMSegmentation's naming); its URL and bytes."""
    data = source.read_bytes()
    name = f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    shutil.copyfile(source, server.root / name)
    return f"{server.url}/{name}", data


def test_hash_in_the_name():
    assert hash_prefix("vit_large_p16_384_20220308-d4efb41d.pth") == "d4efb41d"
    assert hash_prefix("resnet50_v1c-2cccc1ad.pth") == "2cccc1ad"
    assert hash_prefix("vit_large_p16_384_20220308.pth") is None  # a date is no hash
    assert hash_prefix("model-abc.pth") is None  # fewer than 8 hex digits


def test_a_url_downloads_once_with_progress_then_reads_offline(server, cache, monkeypatch):
    url, data = _serve(server, FIXTURES / "official" / "mmseg-vit.pth", "vit_small_p16")
    reports: list[Transfer] = []
    path = fetch_url(url, progress=reports.append)
    assert path == cache / "weights" / url.rsplit("/", 1)[1] and path.read_bytes() == data
    assert not path.with_name(path.name + ".part").exists()
    first, last = reports[0], reports[-1]
    assert (first.what, first.source, first.dest, first.size, first.done) == (path.name, url, path, len(data), 0)
    assert last.finished and last.done == len(data) and not any(r.finished for r in reports[:-1])
    # afterwards: no request at all, also with the server gone and HF_HUB_OFFLINE set
    server.close()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again: list[Transfer] = []
    assert fetch_url(url, progress=again.append) == path and again == []
    assert len(server.requests) == 1


def test_an_interrupted_download_resumes_with_a_range_request(server, cache):
    url, data = _serve(server, FIXTURES / "official" / "mmseg-vit.pth", "vit_small_p16")
    name = url.rsplit("/", 1)[1]
    server.cut[name] = len(data) // 3  # the connection drops a third of the way
    with pytest.raises(SegcliError) as err:
        fetch_url(url)
    part = url_cache_path(url).with_name(name + ".part")
    assert "stopped after" in str(err.value) and "resume" in str(err.value) and "\n" not in str(err.value)
    assert part.stat().st_size == len(data) // 3 and not url_cache_path(url).exists()
    reports: list[Transfer] = []
    path = fetch_url(url, progress=reports.append)
    assert server.requests[-1] == (f"/{name}", f"bytes={len(data) // 3}-")  # only the rest was asked for
    assert reports[0].done == len(data) // 3 and reports[0].size == len(data)
    assert path.read_bytes() == data and not part.exists()


def test_a_hash_mismatch_is_refused_and_the_file_removed(server, cache):
    (server.root / "vit_small_p16-0123abcd.pth").write_bytes(b"not the file its name promises")
    url = f"{server.url}/vit_small_p16-0123abcd.pth"
    with pytest.raises(SegcliError) as err:
        fetch_url(url)
    text = str(err.value)
    assert "\n" not in text and "0123abcd" in text and "removed" in text
    assert list((cache / "weights").iterdir()) == []  # neither the file nor its .part


def test_no_network_names_the_file_to_place_by_hand(server, cache, monkeypatch):
    url = f"{server.url}/vit_large_p16_384_20220308-d4efb41d.pth"
    server.close()  # nothing listens there any more
    dest = cache / "weights" / "vit_large_p16_384_20220308-d4efb41d.pth"
    with pytest.raises(SegcliError) as err:
        fetch_url(url)
    text = str(err.value)
    assert "\n" not in text and "no network" in text and f"place it at {dest}" in text
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SegcliError, match=f"HF_HUB_OFFLINE.*place it at {dest}"):
        fetch_url(url)
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(FIXTURES / "official" / "mmseg-vit.pth", dest)  # placed by hand, as the line says
    assert fetch_url(url) == dest


def test_a_url_is_a_pretrained_backbone(server, cache):
    """The official ViT configs' form: model.backbone.pretrained is the URL of an MMSegmentation ViT."""
    url, _ = _serve(server, FIXTURES / "official" / "mmseg-vit.pth", "vit_small_p16")
    recipe = FIXTURES / "recipes" / "segvit_v1_small.yaml"
    fit = ["model.backbone.out_indices=[1, 3]", "model.decode_head.in_index=[1, 0]"]
    local = api.build_model(api.load_recipe(recipe, [f"model.backbone.pretrained={FIXTURES / 'official' / 'mmseg-vit.pth'}",
                                                     *fit]), num_classes=6)
    remote = api.build_model(api.load_recipe(recipe, [f"model.backbone.pretrained={url}", *fit]), num_classes=6)
    ours, theirs = remote.backbone.state_dict(), local.backbone.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert cached_weights(url) == url_cache_path(url)


def test_train_fetches_the_pretrained_file_first_and_reports_it(server, cache):
    url, data = _serve(server, FIXTURES / "official" / "mmseg-vit.pth", "vit_small_p16")
    recipe = api.load_recipe(FIXTURES / "recipes" / "segvit_v1_small.yaml", [f"model.backbone.pretrained={url}"])
    events = []
    fetch_pretrained(recipe, lambda event, info: events.append((event, info)))
    assert {event for event, _ in events} == {"download"}
    assert Transfer(**events[-1][1]).finished and events[-1][1]["size"] == len(data)
    assert url_cache_path(url).read_bytes() == data


# ----------------------------------------------------------------------------- timm: names


def _hub_cache(root: Path, repo: str, filename: str, payload: bytes, revision: str = "a" * 40) -> Path:
    """A model-hub cache entry in the hub's documented layout:
    models--{org}--{name}/{blobs/<sha256>, refs/main, snapshots/<revision>/<file> -> blob}."""
    folder = root / f"models--{repo.replace('/', '--')}"
    blob = folder / "blobs" / hashlib.sha256(payload).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(payload)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    snapshot = folder / "snapshots" / revision / filename
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return snapshot


def test_a_timm_name_loads_from_the_hub_cache(tmp_path, monkeypatch, cache):
    import timm
    from safetensors.torch import save

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, num_classes=0)
    hub = tmp_path / "hub"
    _hub_cache(hub, "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", "model.safetensors",
               save({k: v.contiguous() for k, v in model.state_dict().items()}))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    path = resolve_weights(name)
    assert path.name == "model.safetensors" and set(load_state_dict_file(path)) == set(model.state_dict())
    backbone = ViTBackbone(ViTConfig(name="vit_tiny_patch16_224", depth=2, img_size=224, out_indices=(0, 1),
                                     pretrained=name))
    assert torch.equal(backbone.vit.blocks[1].attn.qkv.weight, model.blocks[1].attn.qkv.weight)
    assert cached_weights(name) == path


def test_timm_names_fail_in_one_line(tmp_path, monkeypatch, cache):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SegcliError, match="did you mean 'vit_tiny_patch16_224.augreg_in21k_ft_in1k'"):
        timm_weights("vit_tiny_patch16_224.augreg_in21k_ft_in1")
    with pytest.raises(SegcliError) as err:  # a real name, not cached, offline: what to place where
        timm_weights("vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    text = str(err.value)
    assert "\n" not in text and "model.safetensors" in text and "HF_HUB_OFFLINE" in text
    assert str(tmp_path / "empty-hub") in text
    assert cached_weights("timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k") is None


def test_download_reports_render_what_where_size_and_cache(tmp_path):
    """The CLI's renderer (train and --model): one line with what, from where, the size and the
    cache path, then the cached path when it is done; nothing for a cache hit."""
    from rich.console import Console

    from segcli.cli import _DownloadReporter

    out = io.StringIO()
    render = _DownloadReporter(Console(file=out, width=400))
    dest = tmp_path / "w.pth"
    start = Transfer("w.pth", "http://host/w.pth", dest, 3 * 2**20, 0)
    for done in (0, 2**20, 3 * 2**20):
        render(dataclasses.replace(start, done=done))
    render(dataclasses.replace(start, done=3 * 2**20, finished=True))
    render(Transfer("x.pth", "http://host/x.pth", tmp_path / "x.pth", 5, 5, finished=True))  # a cache hit
    lines = out.getvalue().splitlines()
    assert lines[0] == f"download w.pth from http://host/w.pth (3.0 MiB) -> {dest}"
    assert lines[-1] == f"cached {dest}" and "x.pth" not in out.getvalue()


def test_full_size_recipes_name_their_published_weights_by_url_or_timm_name():
    """`segcli train recipes/X.yaml` needs no manual step: every full-size recipe that starts from
    pretrained weights names them as a URL (hash-checked) or a timm: name, the ones its published run used."""
    from segcli.download import is_url
    from segcli.workflows.experiment import weights_name

    checked = 0
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        recipe = api.load_recipe(path)
        ref = getattr(recipe.model.backbone.cfg, "pretrained", None)
        if ref is None or recipe.train.init_from:  # fine-tuning recipes start from a whole checkpoint
            continue
        assert ref.startswith("timm:") or is_url(ref), f"{path.name}: {ref} is a local path"
        assert not is_url(ref) or hash_prefix(ref.rsplit("/", 1)[1]), f"{path.name}: {ref} carries no hash"
        if recipe.published is not None and recipe.published.pretrained:
            assert weights_name(ref) == weights_name(recipe.published.pretrained), path.name
        checked += 1
    assert checked >= 20


def test_a_named_file_not_downloaded_yet_is_no_difference_from_the_published_run(cache):
    """train fetches it before comparing; `recipe show` must not call it missing either."""
    from segcli.workflows.experiment import compare_to_published

    recipe = api.load_recipe(REPO / "recipes" / "segvit_vit_b_ade20k.yaml")
    assert download_is_pending(recipe.model.backbone.cfg.pretrained)
    lines = compare_to_published(recipe, world_size=8).differences
    assert not [line for line in lines if line.startswith("pretrained weights")], lines
    local = api.load_recipe(REPO / "recipes" / "segvit_vit_b_ade20k.yaml",
                            [f"model.backbone.pretrained={cache / 'vit_base_p16_384_20220308-96dfe169.pth'}"])
    assert any("does not exist" in line for line in compare_to_published(local, world_size=8).differences)


def download_is_pending(ref: str) -> bool:
    return cached_weights(ref) is None and ref.startswith("https://")
