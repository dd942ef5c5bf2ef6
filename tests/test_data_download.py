"""The downloader against a real HTTP server on 127.0.0.1 serving small fixture files (no network mock)."""

import gzip
import hashlib
import http.server
import socket
import struct
import threading

import numpy as np
import pytest

from vitlab.cli import main
from vitlab.data import load_data
from vitlab.data import download as dl
from vitlab.errors import DataError


def _idx(array):
    array = np.asarray(array, dtype=np.uint8)
    return gzip.compress(struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
                         + array.tobytes())


def _mnist_fixture():
    rng = np.random.default_rng(1)
    return {
        "train-images-idx3-ubyte.gz": _idx(rng.integers(0, 256, (20, 28, 28))),
        "train-labels-idx1-ubyte.gz": _idx(np.arange(20) % 10),
        "t10k-images-idx3-ubyte.gz": _idx(rng.integers(0, 256, (10, 28, 28))),
        "t10k-labels-idx1-ubyte.gz": _idx(np.arange(10) % 10),
    }


class _Server:
    """http.server in a thread: serves ``files``; names in ``drop`` are cut off after half the body."""

    def __init__(self, files, drop=()):
        self.files, self.drop, self.requests = files, set(drop), []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append(name)
                body = server.files.get(name)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in server.drop:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-body
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mirror/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def mnist_files(monkeypatch):
    """Point the mnist table at md5s of small fixture files (the official md5s are for the real files)."""
    files = _mnist_fixture()
    table = [dl.RemoteFile(n, "http://unused.invalid/", hashlib.md5(b).hexdigest()) for n, b in files.items()]
    monkeypatch.setitem(dl.DATASETS, "mnist", ("mnist", table))
    return files


def test_download_then_load_then_skip(tmp_path, mnist_files):
    with _Server(mnist_files) as srv:
        spec = dl.download_dataset("mnist", tmp_path, base_url=srv.url)
        assert spec == f"mnist:{tmp_path}"
        assert sorted(srv.requests) == sorted(mnist_files)
        for name, body in mnist_files.items():
            assert (tmp_path / "mnist" / name).read_bytes() == body
        d = load_data(spec)
        assert (len(d.train), len(d.test)) == (20, 10)
        # present and valid: nothing fetched again
        dl.download_dataset("mnist", tmp_path, base_url=srv.url)
        assert len(srv.requests) == 4
        # a corrupted local file is fetched again
        (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"junk")
        dl.download_dataset("mnist", tmp_path, base_url=srv.url)
        assert srv.requests[-1] == "t10k-labels-idx1-ubyte.gz" and len(srv.requests) == 5
    assert not list((tmp_path / "mnist").glob(".*"))  # no temporary files left


def test_wrong_checksum_saves_nothing(tmp_path, mnist_files):
    served = dict(mnist_files)
    served["train-labels-idx1-ubyte.gz"] = _idx(np.zeros(20))  # not the file whose md5 the table has
    with _Server(served) as srv:
        with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: wrong checksum after download"):
            dl.download_dataset("mnist", tmp_path, base_url=srv.url)
    folder = tmp_path / "mnist"
    assert sorted(p.name for p in folder.iterdir()) == ["train-images-idx3-ubyte.gz"]


def test_dropped_connection_leaves_no_partial_file(tmp_path, mnist_files):
    with _Server(mnist_files, drop={"train-images-idx3-ubyte.gz"}) as srv:
        with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: download from .* (failed|stopped after 78[0-9][0-9] of)"):
            dl.download_dataset("mnist", tmp_path, base_url=srv.url)
    assert list((tmp_path / "mnist").iterdir()) == []


def test_http_error_and_no_network_say_where_to_put_files(tmp_path, mnist_files):
    with _Server({}) as srv:
        with pytest.raises(DataError, match=r"answered HTTP 404.*put it at .*train-images-idx3-ubyte.gz"):
            dl.download_dataset("mnist", tmp_path, base_url=srv.url)
    # a port nobody listens on: connection refused, like being offline
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(DataError, match=r"cannot reach .*download it by hand and put it at .*mnist"):
        dl.download_dataset("mnist", tmp_path, base_url=f"http://127.0.0.1:{port}/")


def test_cli_download_with_mirror_env(tmp_path, mnist_files, monkeypatch, capsys):
    with _Server(mnist_files) as srv:
        monkeypatch.setenv("VITLAB_DATA_MIRROR", srv.url)
        assert main(["data", "download", "mnist", "--root", str(tmp_path)]) == 0
    assert f"--data mnist:{tmp_path}" in capsys.readouterr().out
    assert main(["data", "download", "mnist", "--root", str(tmp_path), "--base-url", "http://127.0.0.1:9/"]) == 0


def test_official_table_is_complete():
    assert set(dl.DATASETS) == {"cifar10", "cifar100", "mnist", "fashion-mnist"}
    for _, files in dl.DATASETS.values():
        for f in files:
            assert f.base_url.startswith(("http://", "https://")) and len(f.md5) == 32
    # that the MNIST md5s are the official ones is checked against the real files in test_data_shared.py
