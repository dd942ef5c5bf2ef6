"""Every data source loads from small fixtures written here in the real formats; every bad input names itself."""

import gzip
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.data import load_data, parse_data_spec
from vitlab.data.cache import cache_files
from vitlab.data.sources import folder as folder_source
from vitlab.errors import DataError

RNG = np.random.default_rng(0)


# ----- fixture writers in the real formats --------------------------------------------------------------------

def write_idx(path, array, gz=True, magic=None):
    array = np.asarray(array, dtype=np.uint8)
    magic = magic if magic is not None else 0x0800 | array.ndim
    data = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def write_mnist(folder, n_train=30, n_test=10, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        write_idx(folder / f"{split}-images-idx3-ubyte{sfx}", images, gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte{sfx}", labels, gz)
        arrays[split] = (images, labels)
    return arrays


def cifar_batch(n, labels_key="labels", num_classes=10):
    data = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(i % num_classes) for i in range(n)]
    return {b"batch_label": b"fixture", labels_key.encode(): labels, b"data": data,
            b"filenames": [f"{i}.png".encode() for i in range(n)]}


def write_cifar10(root, per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = cifar_batch(per_batch)
        (folder / name).write_bytes(pickle.dumps(batches[name], protocol=2))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    meta = {b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder, batches


def make_tar(folder, archive):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)


def write_image_folder(root, classes=("cat", "dog"), per_class=5, size=(12, 10), mode="RGB", ext="png"):
    files = []
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = RNG.integers(0, 256, (*size, 3), dtype=np.uint8)
            img = Image.fromarray(a).convert(mode)
            p = root / c / f"{i:03d}.{ext}"
            img.save(p)
            files.append(p)
    return files


# ----- specs ---------------------------------------------------------------------------------------------------

def test_parse_data_spec(tmp_path):
    assert parse_data_spec("digits") == ("digits", None)
    assert parse_data_spec(f"cifar10:{tmp_path}") == ("cifar10", tmp_path)
    kind, path = parse_data_spec("mnist:~/data")
    assert kind == "mnist" and str(path) == os.path.expanduser("~/data")
    with pytest.raises(DataError, match="unknown kind 'imagenet'"):
        parse_data_spec("imagenet:/x")
    with pytest.raises(DataError, match="needs a path"):
        load_data("folder:")
    with pytest.raises(DataError, match=f"use folder:{tmp_path}"):
        parse_data_spec(str(tmp_path))


# ----- built-in digits -----------------------------------------------------------------------------------------

def test_digits_builtin():
    d = load_data("digits")
    assert (len(d.train), len(d.test)) == (1438, 359) and d.val is None
    assert d.train.images.shape[1:] == (1, 8, 8) and d.train.images.dtype == torch.uint8
    assert d.classes == [str(i) for i in range(10)]
    assert int(d.train.images.max()) == 255 and int(d.train.images.min()) == 0
    # values were 0..16, scaled: every pixel is round(k * 255 / 16)
    allowed = {round(k * 255 / 16) for k in range(17)}
    assert set(torch.unique(d.train.images).tolist()) <= allowed
    # stratified: every class has 35..37 test images; fixed: independent of the run's seed
    assert min(d.test.class_counts()) >= 35 and max(d.test.class_counts()) <= 37
    again = load_data("digits", seed=5)
    assert torch.equal(again.test.images, d.test.images)
    # no image is in both splits
    tr = {r.tobytes() for r in torch.cat([d.train.images.flatten(1), d.train.labels[:, None].byte()], 1).numpy()}
    te = [r.tobytes() for r in torch.cat([d.test.images.flatten(1), d.test.labels[:, None].byte()], 1).numpy()]
    assert sum(t in tr for t in te) <= 5  # the UCI set holds a few exact duplicates, nothing more


def test_digits_resized_to_rgb():
    d = load_data("digits", image_size=(16, 16), channels=3)
    assert d.train.images.shape[1:] == (3, 16, 16)
    assert torch.equal(d.train.images[:, 0], d.train.images[:, 2])
    assert len(d.mean) == 3


# ----- IDX -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    d = load_data(f"mnist:{tmp_path}")
    assert (len(d.train), len(d.test)) == (30, 10)
    np.testing.assert_array_equal(d.train.images[:, 0].numpy(), arrays["train"][0])
    np.testing.assert_array_equal(d.test.labels.numpy(), arrays["t10k"][1])
    assert d.mean == (0.1307,) and d.std == (0.3081,)  # the known MNIST statistics


def test_fashion_mnist_names_and_torchvision_layout(tmp_path):
    write_mnist(tmp_path / "FashionMNIST" / "raw")
    d = load_data(f"fashion-mnist:{tmp_path}", image_size=32)
    assert d.classes[0] == "T-shirt/top" and d.classes[9] == "Ankle boot"
    assert d.train.images.shape[1:] == (1, 32, 32)


def test_generic_idx_computes_statistics(tmp_path):
    arrays = write_mnist(tmp_path)
    d = load_data(f"idx:{tmp_path}")
    assert d.classes == [str(i) for i in range(10)]
    x = arrays["train"][0].astype(np.float64) / 255
    assert d.mean[0] == pytest.approx(x.mean(), abs=1e-5)
    assert d.std[0] == pytest.approx(x.std(), abs=1e-5)


def test_idx_wrong_magic(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", RNG.integers(0, 256, (30, 28, 28)), magic=0x0000_0903)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: wrong magic number 0x00000903"):
        load_data(f"mnist:{tmp_path}")


def test_idx_counts_disagree(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(9))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: 10 images but t10k-labels-idx1-ubyte.gz has 9"):
        load_data(f"mnist:{tmp_path}")


def test_idx_truncated_and_missing(tmp_path):
    write_mnist(tmp_path, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte: holds .* truncated"):
        load_data(f"mnist:{tmp_path}")
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="missing test-labels"):
        load_data(f"mnist:{tmp_path}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no IDX files"):
        load_data(f"mnist:{empty}")


# ----- CIFAR ---------------------------------------------------------------------------------------------------

def _expected_cifar(batches, names):
    data = np.concatenate([batches[n][b"data"] for n in names]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([batches[n][b"labels"] for n in names])
    return data, labels


@pytest.mark.parametrize("form", ["folder", "parent", "tar", "parent-of-tar"])
def test_cifar10_folder_and_tar(tmp_path, form):
    folder, batches = write_cifar10(tmp_path / "src")
    if form == "folder":
        spec = f"cifar10:{folder}"
    elif form == "parent":
        spec = f"cifar10:{tmp_path / 'src'}"
    else:
        (tmp_path / "dl").mkdir()
        make_tar(folder, tmp_path / "dl" / "cifar-10-python.tar.gz")
        spec = f"cifar10:{tmp_path / 'dl'}" + ("/cifar-10-python.tar.gz" if form == "tar" else "")
    d = load_data(spec)
    assert d.classes[:3] == ["airplane", "automobile", "bird"] and len(d.classes) == 10
    x, y = _expected_cifar(batches, [f"data_batch_{i}" for i in range(1, 6)])
    np.testing.assert_array_equal(d.train.images.numpy(), x)
    np.testing.assert_array_equal(d.train.labels.numpy(), y)
    xt, _ = _expected_cifar(batches, ["test_batch"])
    np.testing.assert_array_equal(d.test.images.numpy(), xt)
    assert d.mean == (0.4914, 0.4822, 0.4465)


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train, test = cifar_batch(6, "fine_labels", 100), cifar_batch(3, "fine_labels", 100)
    (folder / "train").write_bytes(pickle.dumps(train, protocol=2))
    (folder / "test").write_bytes(pickle.dumps(test, protocol=2))
    meta = {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    d = load_data(f"cifar100:{tmp_path}")
    assert len(d.classes) == 100 and d.classes[7] == "c7"
    assert d.train.labels.tolist() == train[b"fine_labels"]


def test_cifar_truncated_pickle(tmp_path):
    folder, _ = write_cifar10(tmp_path)
    p = folder / "data_batch_3"
    p.write_bytes(p.read_bytes()[:500])
    with pytest.raises(DataError, match="data_batch_3: not a readable CIFAR batch"):
        load_data(f"cifar10:{tmp_path}")


def test_cifar_refuses_arbitrary_pickles(tmp_path):
    folder, _ = write_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(DataError, match="data_batch_1: not a readable CIFAR batch .*refusing to load"):
        load_data(f"cifar10:{tmp_path}")


def test_cifar_truncated_archive_and_missing(tmp_path):
    folder, _ = write_cifar10(tmp_path / "src")
    make_tar(folder, tmp_path / "c.tar.gz")
    data = (tmp_path / "c.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.tar.gz"):
        load_data(f"cifar10:{tmp_path / 'cut.tar.gz'}")
    with pytest.raises(DataError, match="vitlab data download cifar10"):
        load_data(f"cifar10:{tmp_path / 'nowhere'}")


# ----- image folders -------------------------------------------------------------------------------------------

def test_folder_with_split_folders_any_case(tmp_path):
    write_image_folder(tmp_path / "Train", per_class=4)
    write_image_folder(tmp_path / "VALID", per_class=2)
    write_image_folder(tmp_path / "test", classes=("dog",), per_class=3)
    d = load_data(f"folder:{tmp_path}", image_size=(8, 8), cache_dir=tmp_path / "cache")
    assert d.classes == ["cat", "dog"]
    assert (len(d.train), len(d.val), len(d.test)) == (8, 4, 3)
    assert d.test.labels.tolist() == [1, 1, 1]
    assert d.train.images.shape == (8, 3, 8, 8)
    assert d.train.files[0].endswith(os.path.join("Train", "cat", "000.png"))
    np.testing.assert_allclose(d.mean, [d.train.images[:, c].double().mean() / 255 for c in range(3)], atol=1e-5)


def test_folder_native_size_grayscale_and_stratified_split(tmp_path):
    write_image_folder(tmp_path / "ds", classes=("a", "b", "c"), per_class=10, mode="L", size=(9, 7))
    spec = f"folder:{tmp_path / 'ds'}"
    d = load_data(spec, val_fraction=0.2, seed=3, cache_dir=tmp_path / "cache")
    assert d.train.images.shape[1:] == (1, 9, 7)  # native size and channels
    assert d.val.class_counts() == [2, 2, 2] and d.train.class_counts() == [8, 8, 8]
    assert d.test is d.val
    assert not set(d.train.files) & set(d.val.files)
    same = load_data(spec, val_fraction=0.2, seed=3, cache_dir=tmp_path / "cache")
    other = load_data(spec, val_fraction=0.2, seed=4, cache_dir=tmp_path / "cache")
    assert same.val.files == d.val.files and other.val.files != d.val.files
    # pixels equal PIL's own decoding
    first = np.asarray(Image.open(d.train.files[0]))
    np.testing.assert_array_equal(d.train.images[0, 0].numpy(), first)


def test_folder_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    files = write_image_folder(tmp_path / "data", per_class=3)
    cache = tmp_path / "cache"
    first = load_data(f"folder:{tmp_path / 'data'}", image_size=8, cache_dir=cache)
    assert len(list((cache / "images").glob("*.npy"))) == 1

    def no_decoding(*a, **k):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(folder_source, "_decode_chunk", no_decoding)
    second = load_data(f"folder:{tmp_path / 'data'}", image_size=8, cache_dir=cache)
    assert torch.equal(first.train.images, second.train.images)
    # a changed file (new mtime) is a new key: decoded again
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(files[0])
    os.utime(files[0], ns=(1, 10**18))
    with pytest.raises(AssertionError, match="decoded although cached"):
        load_data(f"folder:{tmp_path / 'data'}", image_size=8, cache_dir=cache)
    # another target size is another key too
    with pytest.raises(AssertionError, match="decoded although cached"):
        load_data(f"folder:{tmp_path / 'data'}", image_size=9, cache_dir=cache)


def test_folder_env_cache_location(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "data", per_class=2)
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "envcache"))
    load_data(f"folder:{tmp_path / 'data'}", image_size=8)
    assert len(list((tmp_path / "envcache" / "images").glob("*.npy"))) == 1


def test_folder_decodes_in_worker_processes(tmp_path):
    write_image_folder(tmp_path / "data", classes=("a", "b"), per_class=300, size=(6, 6))
    d = load_data(f"folder:{tmp_path / 'data'}", image_size=4, cache_dir=tmp_path / "cache", workers=2)
    single = load_data(f"folder:{tmp_path / 'data'}", image_size=4, cache_dir=tmp_path / "cache2", workers=1)
    assert len(d.train) + len(d.val) == 600
    assert torch.equal(d.train.images, single.train.images)


def test_folder_bad_image_error_and_skip(tmp_path):
    root = tmp_path / "ds"
    write_image_folder(root, per_class=3)
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (root / "dog" / "readme.txt").write_text("not an image, ignored by extension")
    with pytest.raises(DataError, match=r"broken.png: not a readable image.*skip_bad_files"):
        load_data(f"folder:{root}", image_size=8, cache_dir=tmp_path / "c")
    d = load_data(f"folder:{root}", image_size=8, cache_dir=tmp_path / "c", skip_bad_files=True,
                  val_fraction=0.34)
    assert len(d.train) + len(d.val) == 6
    assert len(d.skipped_files) == 1 and "broken.png" in d.skipped_files[0]
    # the cache remembers the bad file: the error comes back without skip_bad_files
    with pytest.raises(DataError, match="broken.png"):
        load_data(f"folder:{root}", image_size=8, cache_dir=tmp_path / "c")


def test_folder_structural_errors(tmp_path):
    with pytest.raises(DataError, match="missing: folder not found"):
        load_data(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: empty image folder"):
        load_data(f"folder:{tmp_path / 'empty'}")
    write_image_folder(tmp_path / "ds", per_class=2)
    (tmp_path / "ds" / "bird").mkdir()
    (tmp_path / "ds" / "bird" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"bird: class folder has no images"):
        load_data(f"folder:{tmp_path / 'ds'}")
    write_image_folder(tmp_path / "sp" / "train", per_class=2)
    write_image_folder(tmp_path / "sp" / "val", classes=("cow",), per_class=2)
    with pytest.raises(DataError, match="cow are not in"):
        load_data(f"folder:{tmp_path / 'sp'}")
    write_image_folder(tmp_path / "onlytest" / "test", per_class=2)
    with pytest.raises(DataError, match="no train/ folder"):
        load_data(f"folder:{tmp_path / 'onlytest'}")


def _symlink_dir(link, target):
    try:
        os.symlink(target, link, target_is_directory=True)
    except (OSError, NotImplementedError) as e:  # Windows without the privilege
        pytest.skip(f"cannot make symlinks here: {e}")


def test_list_image_files_follows_symlinked_folders_skips_hidden_and_loops(tmp_path):
    from vitlab.data import list_image_files

    elsewhere = tmp_path / "elsewhere"
    write_image_folder(elsewhere, classes=("extra",), per_class=2)
    root = tmp_path / "cat"
    write_image_folder(tmp_path, classes=("cat",), per_class=2)
    _symlink_dir(root / "linked", elsewhere / "extra")
    _symlink_dir(root / "linked_back", root)  # a loop: not followed
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.png").write_bytes(b"")
    (root / ".y.png").write_bytes(b"")
    (root / "notes.txt").write_text("no image")
    images, ignored = list_image_files(root)
    rel = [os.path.relpath(f, root).replace(os.sep, "/") for f in images]
    assert rel == ["000.png", "001.png", "linked/000.png", "linked/001.png"]
    assert [os.path.basename(f) for f in ignored] == ["notes.txt"]


def test_folder_source_and_predict_listing_agree_on_symlinked_subfolder(tmp_path):
    from vitlab.explain.inputs import list_images

    root = tmp_path / "ds"
    write_image_folder(root, per_class=3)
    write_image_folder(tmp_path / "more", classes=("dog",), per_class=2)
    _symlink_dir(root / "dog" / "more", tmp_path / "more" / "dog")
    d = load_data(f"folder:{root}", image_size=8, cache_dir=tmp_path / "cache", val_fraction=0.25)
    dataset_files = sorted(d.train.files + d.val.files)
    assert len(dataset_files) == 8 and sum("more" in f for f in dataset_files) == 2
    listed = sorted(str(f) for f in list_images([root]))
    assert listed == dataset_files


def test_data_cache_lists_and_clears_the_decoded_folders(tmp_path, capsys):
    from vitlab.cli import main

    write_image_folder(tmp_path / "photos")
    cache = tmp_path / "cache"
    load_data(f"folder:{tmp_path / 'photos'}", image_size=8, cache_dir=cache)
    load_data(f"folder:{tmp_path / 'photos'}", image_size=16, cache_dir=cache)  # another size: another file
    files = cache_files(cache)
    assert len(files) == 2 and all(p.suffix == ".npy" and size == p.stat().st_size for p, size in files)
    assert main(["data", "cache", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert str(files[0][0]) in out and "2 cache files" in out
    assert main(["data", "cache", "--cache-dir", str(cache), "--clear"]) == 0
    assert "removed 2 cache files" in capsys.readouterr().out
    assert cache_files(cache) == [] and (tmp_path / "photos").is_dir()
    again = load_data(f"folder:{tmp_path / 'photos'}", image_size=8, cache_dir=cache)  # decoded again
    assert len(again.train) + len(again.test) == 10 and len(cache_files(cache)) == 1


def test_idx_label_out_of_range_names_the_labels_file(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([3, 12] + [0] * 8))  # MNIST has 10 classes
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: label 12 but mnist has 10 classes"):
        load_data(f"mnist:{tmp_path}")


@pytest.mark.parametrize("layout", ["flat", "split"])
def test_a_folder_with_one_class_is_refused(tmp_path, layout):
    root = tmp_path / "photos"
    write_image_folder(root / "train" if layout == "split" else root, classes=("apple",))
    with pytest.raises(DataError, match=r"only one class folder \(apple/\); a classifier needs at least two class "
                                        "folders"):
        load_data(f"folder:{root}")
