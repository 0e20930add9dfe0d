"""Named models (``--model NAME``, ``segcli zoo list``), offline: the released file comes from a
model-hub cache prepared in the hub's documented layout, holding a tiny official-format SegViT
(tests/fixtures/official/segvit-v1.pth), and a tiny zoo table is passed in place of the real one."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import REPO
from test_download import _hub_cache

from segcli import api
from segcli.errors import SegcliError
from segcli.workflows.released import fetch_models, list_models, resolve_model
from segcli.zoo import HUB_REPO, ZOO, Released, ZooEntry, recipe_path

OFFICIAL = REPO / "tests" / "fixtures" / "official" / "segvit-v1.pth"
SMALL_RECIPE = REPO / "tests" / "fixtures" / "recipes" / "segvit_v1_small.yaml"
TINY = {"tiny": ZooEntry("tiny", "tiny.pt", str(SMALL_RECIPE), "a reduced SegViT v1",
                         Released("tiny_segvit.pth", str(SMALL_RECIPE)))}


@pytest.fixture()
def env(tmp_path, monkeypatch):
    """An empty segcli cache and hub cache, offline."""
    monkeypatch.setenv("SEGCLI_CACHE", str(tmp_path / "segcli"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_released_model_is_converted_from_the_hub_cache_once(env):
    _hub_cache(env / "hub", HUB_REPO, "tiny_segvit.pth", OFFICIAL.read_bytes())
    said = []
    path = resolve_model("tiny", zoo=TINY, notify=said.append)
    assert path == env / "segcli" / "tiny.pt"
    assert len(said) == 1 and "converted tiny_segvit.pth" in said[0] and str(path) in said[0]
    expected = api.convert(OFFICIAL, recipe=SMALL_RECIPE, out=env / "by_hand.pt")  # what `segcli convert` writes
    loaded, by_hand = api.load_checkpoint(path), api.load_checkpoint(expected.path)
    assert _states_equal(loaded.model.state_dict(), by_hand.model.state_dict())
    assert loaded.meta["converted_from"]["format"] == "segvit-v1" and loaded.meta["num_classes"] == 6
    # the converted file is read from then on: the hub's cache is not needed any more
    shutil.rmtree(env / "hub")
    stamp = path.stat().st_mtime_ns
    assert resolve_model("tiny", zoo=TINY, notify=said.append) == path and path.stat().st_mtime_ns == stamp
    assert len(said) == 1  # nothing converted, nothing said


def test_a_file_in_the_cache_wins_and_needs_no_network(env):
    """The real table: a checkpoint placed at $SEGCLI_CACHE/segvit.pt is `--model segvit`, offline,
    with nothing in the hub's cache."""
    placed = env / "segcli" / "segvit.pt"
    api.convert(OFFICIAL, recipe=SMALL_RECIPE, out=placed)
    assert resolve_model("segvit") == placed


def test_offline_without_the_file_says_what_to_place_where(env):
    with pytest.raises(SegcliError) as err:
        resolve_model("segvit")
    text = str(err.value)
    assert "\n" not in text and text.startswith("--model: ade_51.3.pth of Akide/SegViTv1 is not cached")
    assert "https://huggingface.co/Akide/SegViTv1/resolve/main/ade_51.3.pth" in text
    assert f"--recipe {recipe_path('recipes/released/segvit_vit_b_ade20k.yaml')} --out {env / 'segcli' / 'segvit.pt'}" in text
    assert not (env / "segcli" / "segvit.pt").exists()


def test_a_released_file_that_does_not_fit_its_recipe_writes_nothing(env):
    """The real segvit entry (ViT-B recipe) given the reduced file: convert's one-line refusal, no cache file."""
    _hub_cache(env / "hub", HUB_REPO, "ade_51.3.pth", OFFICIAL.read_bytes())
    with pytest.raises(SegcliError, match="does not fit"):
        resolve_model("segvit")
    assert not (env / "segcli" / "segvit.pt").exists()


def test_unknown_names_and_models_that_are_trained(env):
    with pytest.raises(SegcliError, match="did you mean 'segvit-l'"):
        resolve_model("segvit-L")
    with pytest.raises(SegcliError, match="segcli train recipes/setr_vit_b_ade20k.yaml"):
        resolve_model("setr")


def test_every_released_entry_names_a_released_recipe_of_its_file():
    """Each hub file of the table is converted with the released recipe whose published: block
    cites that file (recipes/released/, zbwxp/SegVit README)."""
    released = [entry for entry in ZOO.values() if entry.released]
    assert len(released) == 7 and len({e.released.file for e in released}) == 7
    for entry in released:
        published = api.load_recipe(recipe_path(entry.released.recipe)).published
        assert entry.released.file in published.source, entry.name


def test_zoo_list_shows_published_figures_and_what_is_cached(env):
    rows = {row.name: row for row in list_models(TINY)}
    assert not rows["tiny"].cached and rows["tiny"].released_cached is False
    _hub_cache(env / "hub", HUB_REPO, "tiny_segvit.pth", OFFICIAL.read_bytes())
    assert list_models(TINY)[0].released_cached is True
    resolve_model("tiny", zoo=TINY)
    assert list_models(TINY)[0].cached
    segvit = {row.name: row for row in list_models()}["segvit"]
    assert segvit.numbers == api.load_recipe(recipe_path("recipes/released/segvit_vit_b_ade20k.yaml")).published.numbers
    assert segvit.source == "https://huggingface.co/Akide/SegViTv1/resolve/main/ade_51.3.pth"


def test_zoo_list_cli(cli, env):
    res = cli("zoo", "list", "--json")
    assert res.exit_code == 0, res.output
    rows = {row["name"]: row for row in json.loads(res.stdout)}
    assert set(ZOO) == set(rows) and rows["segvit-l"]["cached"] is False
    assert rows["segvit-l"]["numbers"]["GFLOPs"] == api.load_recipe(
        recipe_path(ZOO["segvit-l"].recipe)).published.numbers["GFLOPs"]
    res = cli("zoo", "list")
    assert res.exit_code == 0 and "segvit-l-shrunk-pc59" in res.output


def test_model_option_cli(cli, env, synth_root, tmp_path):
    api.convert(OFFICIAL, recipe=SMALL_RECIPE, out=env / "segcli" / "segvit.pt")
    image = next((synth_root / "images" / "val").iterdir())
    res = cli("predict", image, "--model", "segvit", "--out", tmp_path / "pred", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "pred" / f"{image.stem}.png").is_file()
    for command in (["predict", image], ["eval"], ["export"], ["prune"], ["benchmark"]):
        res = cli(*command)
        assert res.exit_code == 2 and "give a checkpoint or --model NAME" in res.output, command
    res = cli("eval", env / "segcli" / "segvit.pt", "--model", "segvit")
    assert res.exit_code == 2 and "not both" in res.output


def test_outputs_of_a_named_model_go_where_the_user_is(cli, env, tmp_path, monkeypatch):
    """export/prune write beside their input by default; a named model's input is in the cache, so
    their output goes to the current folder instead (nothing is added to the cache)."""
    api.convert(OFFICIAL, recipe=SMALL_RECIPE, out=env / "segcli" / "segvit.pt")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    res = cli("export", "--model", "segvit", "--format", "torchscript", "--shape", "64", "64")
    assert res.exit_code == 0, res.output
    assert (work / "segvit.torchscript.pt").is_file()
    assert sorted(p.name for p in (env / "segcli").iterdir()) == ["segvit.pt"]
    res = cli("export", "--model", "segvit", "--format", "torchscript", "--shape", "64", "64")
    assert res.exit_code == 2 and "--overwrite" in res.output  # the output rule holds for the new default


class _Hub:
    """A model hub on 127.0.0.1 serving one repo's files as the hub's resolve endpoint does (HEAD:
    X-Repo-Commit, ETag, Content-Length; GET: the bytes); records each request."""

    def __init__(self, files: dict[str, bytes], repo: str = HUB_REPO, commit: str = "b" * 40):
        import hashlib
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        hub = self
        self.requests = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _head(self):
                hub.requests.append((self.command, self.path))
                prefix = f"/{repo}/resolve/main/"
                name = self.path.split("?")[0][len(prefix):] if self.path.startswith(prefix) else None
                if name not in files:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                self.send_response(200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{hashlib.sha256(files[name]).hexdigest()}"')
                self.send_header("Content-Length", str(len(files[name])))
                self.end_headers()
                return files[name]

            def do_HEAD(self):
                self._head()

            def do_GET(self):
                data = self._head()
                if data is not None:
                    self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_released_model_downloads_from_the_hub_with_progress_once(env, monkeypatch):
    """First use online (a hub served on 127.0.0.1 through HF_ENDPOINT): the file lands in the
    hub's cache with progress reports, is converted, and later uses touch no network."""
    hub = _Hub({"tiny_segvit.pth": OFFICIAL.read_bytes()})
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    reports = []
    try:
        path = resolve_model("tiny", progress=reports.append, zoo=TINY)
    finally:
        hub.close()
    size = OFFICIAL.stat().st_size
    assert reports and reports[0].what == "tiny_segvit.pth" and reports[0].source.startswith(hub.url)
    assert reports[-1].finished and reports[-1].done == size and reports[-1].dest.read_bytes() == OFFICIAL.read_bytes()
    assert str(reports[-1].dest).startswith(str(env / "hub" / "models--Akide--SegViTv1"))
    assert api.load_checkpoint(path).meta["converted_from"]["format"] == "segvit-v1"
    path.unlink()  # the conversion is redone from the hub's cache, the hub being gone
    assert resolve_model("tiny", zoo=TINY) == path and path.is_file()


def test_fetch_checks_every_name_before_fetching_any(env):
    """``segcli zoo fetch``: the released model is fetched from the hub cache and converted; a typo or
    a model that is not released anywhere in the list stops it before anything is converted."""
    _hub_cache(env / "hub", HUB_REPO, "tiny_segvit.pth", OFFICIAL.read_bytes())
    zoo = {**TINY, "mine": ZooEntry("mine", "mine.pt", str(SMALL_RECIPE), "trained by the user")}
    for names, message in ((["tiny", "tinny"], "unknown model 'tinny'"), (["tiny", "mine"], "not released"), ([], "no model")):
        with pytest.raises(SegcliError, match=message):
            fetch_models(names, zoo=zoo)
        assert not (env / "segcli" / "tiny.pt").exists()
    assert fetch_models(["tiny", "tiny"], zoo=zoo) == {"tiny": env / "segcli" / "tiny.pt"}
    assert api.load_checkpoint(env / "segcli" / "tiny.pt").meta["converted_from"]["format"] == "segvit-v1"


def test_zoo_fetch_cli(cli, env):
    api.convert(OFFICIAL, recipe=SMALL_RECIPE, out=env / "segcli" / "segvit.pt")  # cached: nothing to do
    res = cli("zoo", "fetch", "segvit", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"segvit": str(env / "segcli" / "segvit.pt")}
    for args, message in ((["segvitt"], "did you mean"), (["setr"], "not released"),
                          (["segvit", "segvit-l"], "segcli convert")):  # offline, not in the hub cache
        res = cli("zoo", "fetch", *args)
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, (args, res.output)


def test_options_are_checked_before_a_named_model_is_fetched(cli, env):
    """A bad option is refused before --model fetches anything (a released file is gigabytes): offline
    and with nothing cached, the error is the option's, not the download's."""
    for args, flag in ((["export", "--model", "segvit", "--format", "onxx"], "--format"),
                       (["export", "--model", "segvit", "--batch", "0"], "--batch"),
                       (["prune", "--model", "segvit", "--p0", "2"], "--p0"),
                       (["prune", "--model", "segvit", "--exit-layers", "five"], "--exit-layers")):
        res = cli(*args)
        assert res.exit_code == 2 and flag in res.output and "download" not in res.output, (args, res.output)
    assert not (env / "segcli").exists() or not any((env / "segcli").iterdir())
