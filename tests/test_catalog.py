"""Model catalogue: checkpoints load without code execution, pulls verify sha256."""

import functools
import hashlib
import http.server
import os
import pickle
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from meshseg.cli import main
from meshseg.errors import WeightsError
from meshseg.models import catalog
from meshseg.models.meshnet import MeshNet, MeshNetConfig
from meshseg.models.weights import (
    load_network,
    save_checkpoint,
    save_network,
    sha256_file,
)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHSEG_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def fake_remote(tmp_path, monkeypatch):
    """A downloadable catalogue entry served from a local folder."""
    source = tmp_path / "mirror"
    source.mkdir()
    files = {"a.bin": b"alpha" * 100, "b.json": b'{"x": 1}'}
    for name, content in files.items():
        (source / name).write_bytes(content)
    entry = catalog.CatalogEntry(
        name="fake", description="test", architecture="MeshNet-2", channels=2, parameters=1,
        fmt="meshseg", entry_file="a.bin", license="MIT", source=source.as_uri() + "/",
        files={n: hashlib.sha256(c).hexdigest() for n, c in files.items()})
    monkeypatch.setattr(catalog, "REMOTE", (entry,))
    return entry, source


def test_checkpoint_round_trip(tmp_path):
    model = MeshNet(MeshNetConfig(channels=3, activation="elu"))
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, {"note": "test"})
    loaded = load_network(path)
    assert loaded.architecture == "meshnet" and loaded.options == model.config.to_dict()
    assert loaded.meta == {"note": "test"} and loaded.model.config == model.config
    assert loaded.window is None and not loaded.model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key])


def test_network_checkpoint_round_trip(tmp_path):
    """Any architecture: weights, name, build options and training window come back."""
    from meshseg import archs

    network = archs.build("umamba-enc", size=32)
    path = tmp_path / "enc.safetensors"
    save_network(path, network, "umamba-enc", {"size": 32}, 32, {"val_dice": 0.5})
    loaded = load_network(path)
    assert (loaded.architecture, loaded.options, loaded.window) == ("umamba-enc", {"size": 32}, 32)
    assert loaded.meta == {"val_dice": 0.5} and not loaded.model.training
    for key, value in network.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key]), key
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(1)}, str(foreign), metadata={"format": "other/1"})
    with pytest.raises(WeightsError, match="not a meshseg checkpoint .format 'other/1'"):
        load_network(foreign)


def test_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (marker.touch, ())

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(WeightsError, match="evil.safetensors"):
        load_network(path)
    assert not marker.exists()


def test_pull_verifies_and_caches(home, fake_remote):
    entry, _ = fake_remote
    folder = catalog.pull("fake")
    assert folder == home / "models" / "fake"
    assert entry.is_local()


def test_pull_refuses_checksum_mismatch(home, fake_remote):
    entry, source = fake_remote
    (source / "a.bin").write_bytes(b"tampered")
    with pytest.raises(WeightsError, match="checksum mismatch.*refused"):
        catalog.pull("fake")
    folder = home / "models" / "fake"
    assert not (folder / "a.bin").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp files left
    assert not entry.is_local()


def test_pull_over_http_on_loopback(home, fake_remote):
    entry, source = fake_remote
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(source))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        catalog.pull("fake", mirror=url)
        assert entry.is_local()
        # an HTTP error is an OSError too: it must not read as a file that cannot be written
        with pytest.raises(WeightsError, match=r"missing.bin: download failed \(File not found\)$"):
            catalog.download(url + "missing.bin", home / "x.bin", "0" * 64)
    finally:
        server.shutdown()


def test_unknown_model_and_unpulled_model(home):
    with pytest.raises(WeightsError, match="no such model.*brainchop-t2-lesion"):
        catalog.load("nonexistent")
    with pytest.raises(WeightsError, match="meshseg models pull brainchop-t2-lesion"):
        catalog.load("brainchop-t2-lesion")


def test_brainchop_entry_matches_shared_files(home, shared_model):
    """The pinned checksums are those of the shared copy; pulling from it as a mirror works."""
    catalog.pull("brainchop-t2-lesion", mirror=shared_model.parent.as_uri())
    model = catalog.load("brainchop-t2-lesion")
    assert model.parameters == 26556 and model.postprocess == "largest"


def test_bundled_cards_match_their_checkpoints():
    cards = catalog.bundled()
    assert sum(card.default for card in cards) == 1, "exactly one bundled default model"
    for card in cards:
        path = card.folder / card.entry_file
        assert sha256_file(path) == card.files[card.entry_file]
        loaded = load_network(path)
        meta = loaded.meta
        assert loaded.model.config.channels == card.channels
        assert sum(p.numel() for p in loaded.model.parameters()) == card.parameters
        # a bundled model records the run that made it (`meshseg train`) or the files it was
        # converted from (`meshseg export safetensors`), whose license ships beside it
        assert {"config", "val_dice", "epoch"} <= set(meta) or "converted_from" in meta, meta
        if "converted_from" in meta:
            assert (card.folder / f"{card.name}.LICENSE").is_file()
        assert (card.folder / "README.md").is_file(), "every bundled model has a model card"


def test_the_default_is_the_arc_trained_model_converted_exactly(shared_model):
    """The bundled default is brainchop's ARC-trained MeshNet: the same layers, bit for bit, as
    meshseg's TF.js import of the original files (whose sha256 it records), run the way
    brainchop runs it (crop to the voxels > 0, largest lesion)."""
    default = catalog.default_entry()
    bundled, original = catalog.load(None), catalog.load(str(shared_model))
    assert default.name == bundled.name == "arc-t2-lesion"
    assert (bundled.crop, bundled.postprocess) == (original.crop, original.postprocess)
    assert (bundled.crop, bundled.postprocess) == ("nonzero", "largest")
    assert bundled.parameters == original.parameters == 26556
    assert len(bundled.layers) == len(original.layers) == 10
    for ours, theirs in zip(bundled.layers, original.layers):
        assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
        assert (ours.dilation, ours.activation) == (theirs.dilation, theirs.activation)
    meta = load_network(default.folder / default.entry_file).meta
    assert meta["converted_from"] == {
        "model.json": sha256_file(shared_model), "model.bin": sha256_file(
            shared_model.parent / "model.bin")}


def test_conversion_is_reproducible(tmp_path, shared_model):
    """`meshseg export safetensors` of the shared files rebuilds the bundled checkpoint's
    tensors and header exactly (safetensors orders its header keys at random, so the bytes
    may differ), so anyone can check the shipped file against its source."""
    out = tmp_path / "arc.safetensors"
    result = CliRunner().invoke(main, ["export", "safetensors", str(shared_model), "-o", str(out)])
    assert result.exit_code == 0, result.output
    default = catalog.default_entry()
    with safe_open(str(out), "pt") as ours, \
            safe_open(str(default.folder / default.entry_file), "pt") as shipped:
        assert ours.metadata() == shipped.metadata()
        assert sorted(ours.keys()) == sorted(shipped.keys())
        for key in ours.keys():
            assert torch.equal(ours.get_tensor(key), shipped.get_tensor(key)), key


def test_checkpoint_meta_settings_are_checked(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, MeshNet(MeshNetConfig(channels=2)), {"crop": "everything"})
    with pytest.raises(WeightsError, match="checkpoint crop 'everything' is not one of"):
        catalog.load(str(path))


def test_load_by_path(tmp_path, shared_model):
    copy = tmp_path / "bc"
    shutil.copytree(shared_model.parent, copy)
    assert catalog.load(str(copy / "model.json")).parameters == 26556


def test_pull_has_a_deadline_an_offline_hint_and_cleans_killed_parts(home, fake_remote,
                                                                      monkeypatch):
    """Issue 20 item 16/10: a server sending a byte at a time is cut at the deadline (it
    never ended), with no temporary file left; a DNS failure says how to pull offline; a
    killed pull's 0-byte .part in the cache is removed by the next pull."""
    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    target = home / "slow.bin"
    target.parent.mkdir(parents=True)
    try:
        start = time.monotonic()
        with pytest.raises(WeightsError, match="download too slow"):
            catalog.download(f"http://127.0.0.1:{server.server_address[1]}/x", target,
                             "0" * 64, deadline_s=1.0)
        assert time.monotonic() - start < 10
    finally:
        server.shutdown()
    assert list(home.iterdir()) == []

    def offline(url, timeout):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    with monkeypatch.context() as patch, pytest.raises(WeightsError, match="--from URL"):
        patch.setattr(urllib.request, "urlopen", offline)
        catalog.download("https://example.org/a.bin", target, "0" * 64)

    entry, _ = fake_remote
    entry.folder.mkdir(parents=True)
    killed = entry.folder / ".a.bin.abcd1234.part"
    killed.write_bytes(b"")
    os.utime(killed, (time.time() - 3600,) * 2)
    catalog.pull("fake")
    assert entry.is_local() and not killed.exists()
