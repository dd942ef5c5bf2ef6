"""BatchLoader: the epoch order is a function of (seed, epoch), shards match DistributedSampler, and the
CLI's data commands print plainly."""

import pytest
import torch
from torch.utils.data import DistributedSampler

from vitlab.cli import main
from vitlab.data import ArrayDataset, BatchLoader
from vitlab.errors import DataError


def _dataset(n=10):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return ArrayDataset(images, torch.arange(n) % 3, ["a", "b", "c"])


def _epoch(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_batches_are_uint8_cut_by_index_in_order():
    loader = BatchLoader(_dataset(10), batch_size=4, shuffle=False, drop_last=False)
    batches = _epoch(loader)
    assert len(loader) == 3 and [len(y) for _, y in batches] == [4, 4, 2]
    x, y = batches[0]
    assert x.dtype == torch.uint8 and x.shape == (4, 1, 2, 2) and y.dtype == torch.int64
    assert x[:, 0, 0, 0].tolist() == [0, 1, 2, 3] and y.tolist() == [0, 1, 2, 0]
    dropped = BatchLoader(_dataset(10), batch_size=4, shuffle=False, drop_last=True)
    assert len(dropped) == 2 and len(_epoch(dropped)) == 2


def test_order_is_a_function_of_seed_and_epoch():
    ds = _dataset(50)
    a = BatchLoader(ds, batch_size=8, shuffle=True, seed=3, drop_last=False)
    b = BatchLoader(ds, batch_size=8, shuffle=True, seed=3, drop_last=False)
    a.set_epoch(2)
    _epoch(b)  # iterating another epoch first changes nothing: no hidden state
    b.set_epoch(2)
    ea, eb = _epoch(a), _epoch(b)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(ea, eb))
    a.set_epoch(3)
    assert not torch.equal(_epoch(a)[0][0], ea[0][0])
    order = torch.cat([x[:, 0, 0, 0] for x, _ in ea]).long()  # image i holds the value i
    assert sorted(order.tolist()) == list(range(50)) and order.tolist() != list(range(50))


@pytest.mark.parametrize("n,world", [(10, 3), (12, 4), (7, 2)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_shards_equal_distributed_sampler(n, world, shuffle):
    ds = _dataset(n)
    seen = []
    for rank in range(world):
        loader = BatchLoader(ds, batch_size=2, shuffle=shuffle, seed=5, drop_last=False, rank=rank,
                             world_size=world)
        loader.set_epoch(4)
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=5)
        sampler.set_epoch(4)
        assert loader.indices().tolist() == list(sampler)
        seen += loader.indices().tolist()
    # every image is seen; only the padding repeats, and every rank has the same number
    assert set(seen) == set(range(n)) and len(seen) == world * -(-n // world)


def test_bad_loader_arguments():
    with pytest.raises(DataError, match="rank=2"):
        BatchLoader(_dataset(), batch_size=2, shuffle=False, drop_last=False, rank=2, world_size=2)
    with pytest.raises(DataError, match="batch_size=0"):
        BatchLoader(_dataset(), batch_size=0, shuffle=False, drop_last=False)


def test_cli_data_info(capsys):
    assert main(["data", "info", "digits"]) == 0
    out = capsys.readouterr().out
    assert "train 1,438, test 359" in out and "8x8, 1 channel" in out and "classes   10: 0 (142)" in out


def test_cli_data_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "info", "nonsense:x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitlab: error: data spec 'nonsense:x': unknown kind") and err.count("\n") == 1
    assert main(["data", "info", f"folder:{tmp_path / 'nope'}"]) == 2
    err = capsys.readouterr().err
    assert err == f"vitlab: error: {tmp_path / 'nope'}: folder not found\n"


def test_reprs_are_short():
    from vitlab.data import load_data

    d = load_data("digits")
    assert repr(d) == "DatasetSplits('digits': train=1438, test=359; 1x8x8; 10 classes)"
    assert repr(d.train) == "ArrayDataset(1438 images, 1x8x8 uint8, 10 classes)"
