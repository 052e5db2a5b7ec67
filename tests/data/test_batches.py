import pytest
import torch

from difflab.data import (
    DATASETS,
    ImageData,
    batch_indices,
    iterate_batches,
    load_dataset,
    steps_per_epoch,
)


def test_batch_indices_reproducible_and_epochs_are_permutations():
    n, bs = 103, 10
    for drop_last in (True, False):
        spe = steps_per_epoch(n, bs, drop_last)
        assert spe == (10 if drop_last else 11)
        for epoch in range(3):
            idx = torch.cat([batch_indices(n, bs, 7, epoch * spe + j, drop_last) for j in range(spe)])
            if drop_last:
                assert len(idx) == 100 and len(set(idx.tolist())) == 100
            else:
                assert torch.equal(idx.sort().values, torch.arange(n))
    assert torch.equal(batch_indices(n, bs, 7, 25), batch_indices(n, bs, 7, 25))
    assert not torch.equal(batch_indices(n, bs, 7, 0), batch_indices(n, bs, 7, 10))  # new epoch
    assert not torch.equal(batch_indices(n, bs, 7, 0), batch_indices(n, bs, 8, 0))
    # neighbouring seeds do not share epochs (the epoch seed is a hash, not seed + epoch)
    assert not torch.equal(batch_indices(n, bs, 7, 10), batch_indices(n, bs, 8, 0))


def test_iterator_matches_batch_indices_and_resumes():
    x = torch.arange(50, dtype=torch.float32).reshape(50, 1, 1, 1)
    it = iterate_batches(x, 8, 3)
    first = [next(it) for _ in range(20)]  # crosses three epochs
    for s, b in enumerate(first):
        assert torch.equal(b.flatten().long(), batch_indices(50, 8, 3, s))
    resumed = iterate_batches(x, 8, 3, start_step=13)
    for s in range(13, 20):
        assert torch.equal(next(resumed), first[s])
    # a torch.Generator gives one seed, deterministically
    a = [next(iterate_batches(x, 8, torch.Generator().manual_seed(0))) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    assert len(list(iterate_batches(x, 8, 3, epochs=2))) == 12
    assert len(list(iterate_batches(x, 8, 3, drop_last=False, epochs=1))) == 7


def test_iterate_image_data_and_flip():
    data = load_dataset("digits", "test")
    batches = list(iterate_batches(data, 32, 0, epochs=1))
    assert all(isinstance(b, ImageData) and len(b) == 32 for b in batches)
    assert torch.equal(batches[0].labels, data.labels[batch_indices(len(data), 32, 0, 0)])
    f1 = next(iterate_batches(data, 32, 0, flip=True))
    f2 = next(iterate_batches(data, 32, 0, flip=True))
    assert torch.equal(f1.images, f2.images)
    plain = batches[0].images
    flipped = (f1.images == plain.flip(-1)).flatten(1).all(1)
    same = (f1.images == plain).flatten(1).all(1)
    assert (flipped | same).all() and flipped.sum() > 5 and (~flipped).sum() > 5
    shapes = load_dataset("shapes", n=64)
    with pytest.raises(ValueError, match="positional"):
        iterate_batches(shapes, 8, 0, flip=True)


def test_load_dataset_names_and_fields(tmp_path):
    with pytest.raises(ValueError) as e:
        load_dataset("cifar10")
    assert all(k in str(e.value) for k in DATASETS)
    d = load_dataset("digits")
    assert d.name == "digits" and d.channels == 1 and d.size == 16 and len(d.class_names) == 10
    assert d.captions is None and d.masks is None
    s = load_dataset("shapes", n=100, size=24)
    st = load_dataset("shapes", "test", n=100, size=24)
    assert s.channels == 3 and s.size == 24 and len(s.captions) == 100 and s.masks.shape == (100, 1, 24, 24)
    assert torch.equal(s.labels, s.attributes["shape"]) and s.class_names[0] == "circle"
    assert not torch.equal(s.images, st.images)
    sub = s.subset(torch.tensor([3, 1]))
    assert sub.captions == [s.captions[3], s.captions[1]]
    assert torch.equal(sub.attributes["color"], s.attributes["color"][[3, 1]])
    with pytest.raises(ValueError, match="size="):
        load_dataset(f"folder:{tmp_path}")
    with pytest.raises(ValueError, match="2 labels for 3"):
        ImageData(torch.zeros(3, 1, 4, 4), torch.zeros(2, dtype=torch.long))
