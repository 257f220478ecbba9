"""Data layer: sources, transforms, the federated split pipeline and its loaders (all offline, all small)."""

from __future__ import annotations

from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from floral_lightning.data import (
    CIFAR10,
    CIFAR100,
    MNIST,
    ArraySplits,
    ClientEvalLoader,
    DataSource,
    FashionMNIST,
    FederatedDataModule,
    NpzArrays,
    RandomImages,
    RoundLoader,
    SyntheticLinear,
    SyntheticMLP,
    apply_flip_crop,
    flip_crop_params,
    label_shift,
    label_subset_mask,
    normalize,
    random_flip_crop,
    rotate,
)
from floral_lightning.models import MLP, VGG8, CifarCNN

TEST_ID_OFFSET = 100_000


class IdSource(DataSource):
    """Vectors whose single feature is the sample's id (test ids offset), labels id-independent but seeded."""

    def __init__(self, num_train: int = 400, num_test: int = 200, num_classes: int = 10) -> None:
        self.num_train, self.num_test, self.num_classes = num_train, num_test, num_classes

    def load(self) -> ArraySplits:
        g = torch.Generator().manual_seed(123)
        return ArraySplits(
            torch.arange(self.num_train, dtype=torch.float32)[:, None],
            torch.randint(0, self.num_classes, (self.num_train,), generator=g),
            torch.arange(self.num_test, dtype=torch.float32)[:, None] + TEST_ID_OFFSET,
            torch.randint(0, self.num_classes, (self.num_test,), generator=g),
        )


def ids(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0].long()


@pytest.fixture(scope="module")
def images() -> RandomImages:
    return RandomImages(num_train=400, num_test=120, shape=(3, 8, 8), num_classes=10, seed=3)


def build(source, **kw) -> FederatedDataModule:
    dm = FederatedDataModule(source, **kw)
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------------------------------------- models
def test_model_output_shapes() -> None:
    assert MLP(10, [20], 1)(torch.randn(5, 10)).shape == (5, 1)
    assert MLP(784, [200], 10)(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    assert MLP(4, [], 2)(torch.randn(3, 4)).shape == (3, 2)
    cnn = CifarCNN()
    assert cnn.features(torch.randn(2, 3, 32, 32)).shape == (2, 1024)
    assert cnn(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    vgg = VGG8()
    assert vgg.features(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    assert vgg(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in vgg.modules())
    assert sum(isinstance(m, torch.nn.Conv2d) for m in vgg.modules()) == 5
    assert CifarCNN(num_classes=7, in_channels=1)(torch.randn(1, 1, 32, 32)).shape == (1, 7)


# ---------------------------------------------------------------------------------------------- transforms
def test_rotate_quarter_turns_and_other_angles() -> None:
    x = torch.randint(0, 255, (4, 3, 9, 9), dtype=torch.uint8)
    for c in range(4):
        assert torch.equal(rotate(x, c, 4), torch.rot90(x, c, dims=(-2, -1)))
    assert torch.equal(rotate(x, 1, 2), torch.rot90(x, 2, dims=(-2, -1)))
    r = rotate(x, 1, 8)  # 45°: interpolated, same shape, different content
    assert r.shape == x.shape and r.dtype == torch.uint8 and not torch.equal(r, x)
    with pytest.raises(ValueError, match="cluster"):
        rotate(x, 4, 4)


def test_label_shift_and_subset_mask() -> None:
    y = torch.arange(10)
    assert label_shift(y, 3, 10).tolist() == [3, 4, 5, 6, 7, 8, 9, 0, 1, 2]
    assert torch.nonzero(label_subset_mask(torch.arange(100), 3, 10)).squeeze(1).tolist() == list(range(3, 100, 10))


def test_normalize() -> None:
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1)
    out = normalize(x, (0.0, 0.5, 0.2), (1.0, 0.5, 0.1))
    assert out.dtype == torch.float32
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)


def reference_flip_crop(x, flip, top, left, padding):
    out = []
    for i in range(len(x)):
        p = F.pad(x[i], (padding,) * 4)
        crop = p[:, top[i] : top[i] + x.shape[2], left[i] : left[i] + x.shape[3]]
        out.append(crop.flip(-1) if flip[i] else crop)
    return torch.stack(out)


def test_flip_crop_matches_per_sample_reference() -> None:
    x = torch.randn(16, 3, 6, 5)
    flip, top, left = flip_crop_params(16, 2, torch.Generator().manual_seed(0))
    assert flip.any() and (~flip).any()
    assert torch.equal(apply_flip_crop(x, flip, top, left, 2), reference_flip_crop(x, flip, top, left, 2))
    # random_flip_crop draws its parameters in flip_crop_params' order from the generator it is given
    out = random_flip_crop(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(out, reference_flip_crop(x, flip, top, left, 2))
    # without padding the crop is the whole image: every sample is itself or its mirror image
    for a, b in zip(random_flip_crop(x, 0, torch.Generator().manual_seed(1)), x):
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))


# ---------------------------------------------------------------------------------------------- sources
def test_random_images_have_learnable_class_signal(images: RandomImages) -> None:
    data = images.load()
    assert data.x_train.shape == (400, 3, 8, 8) and data.x_train.dtype == torch.uint8
    assert torch.equal(data.x_train, images.load().x_train)  # seeded
    xf, xt = data.x_train.float().flatten(1), data.x_test.float().flatten(1)
    centroids = torch.stack([xf[data.y_train == c].mean(0) for c in range(10)])
    acc = (torch.cdist(xt, centroids).argmin(1) == data.y_test).float().mean()
    assert acc > 0.9
    mean, std = torch.tensor(images.mean), torch.tensor(images.std)
    assert torch.allclose(xf.mean() / 255, mean.mean(), atol=0.02)
    assert torch.allclose(xf.std() / 255, std.mean(), atol=0.02)


def test_npz_arrays_layouts_and_inference(tmp_path) -> None:
    g = np.random.default_rng(0)
    hw = g.integers(0, 256, (6, 4, 5), dtype=np.uint8)
    hwc = g.integers(0, 256, (6, 4, 5, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 3, 4, 1])
    np.savez(tmp_path / "gray.npz", x_train=hw, y_train=y, x_test=hw[:2], y_test=y[:2])
    np.savez(tmp_path / "rgb.npz", x_train=hwc, y_train=y, x_test=hwc[:2], y_test=y[:2])
    gray = NpzArrays(str(tmp_path / "gray.npz"))
    d = gray.load()
    assert d.x_train.shape == (6, 1, 4, 5) and d.y_train.dtype == torch.int64
    assert gray.num_classes == 5
    assert gray.mean[0] == pytest.approx(hw.mean() / 255, rel=1e-6)
    assert gray.std[0] == pytest.approx(hw.std() / 255, rel=1e-5)
    d = NpzArrays(str(tmp_path / "rgb.npz"), num_classes=10, mean=(0.5,) * 3, std=(0.2,) * 3).load()
    assert torch.equal(d.x_train, torch.from_numpy(hwc).permute(0, 3, 1, 2))
    # float features and regression targets
    np.savez(
        tmp_path / "reg.npz",
        x_train=g.normal(size=(5, 3)),
        y_train=g.normal(size=5),
        x_test=g.normal(size=(2, 3)),
        y_test=g.normal(size=2),
    )
    reg = NpzArrays(str(tmp_path / "reg.npz"))
    d = reg.load()
    assert d.x_train.dtype == torch.float32 and d.y_train.shape == (5, 1) and reg.num_classes is None
    np.savez(tmp_path / "bad.npz", x_train=hw, y_train=y)
    with pytest.raises(KeyError, match="x_test.*y_test"):
        NpzArrays(str(tmp_path / "bad.npz")).load()
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        NpzArrays(str(tmp_path / "nope.npz")).load()


def test_mnist_subset_smoke(mnist_npz: Path) -> None:
    src = NpzArrays(str(mnist_npz))
    d = src.load()
    assert d.x_train.shape == (17435, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert src.num_classes == 10 and src.mean[0] == pytest.approx(0.1307, abs=0.01)
    dm = build(src, num_clients=30, num_clusters=4, cluster_transform="rotate", train_fraction=0.05)
    x, y, k = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32 and k == 0
    assert MLP(784, [200], 10)(x).shape == (len(x), 10)


@pytest.mark.parametrize("cls", [CIFAR10, CIFAR100, MNIST, FashionMNIST])
def test_torchvision_sources_without_files_raise_clearly(cls, tmp_path) -> None:
    src = cls(root=str(tmp_path), download=False)
    assert src.num_classes in (10, 100) and len(src.mean) == len(src.std)
    with pytest.raises(FileNotFoundError, match=r"download=False.*root|root.*download"):
        src.load()


def test_synthetic_linear_clusters_share_weights() -> None:
    src = SyntheticLinear()
    clusters = torch.arange(10) % 2
    clients = src.make_clients(10, clusters, seed=5)
    assert len(clients) == 10
    assert clients[0].x_train.shape == (6, 10) and clients[0].y_train.shape == (6, 3)
    assert clients[0].x_test.shape == (2, 10) and clients[0].y_test.shape == (2, 3)
    params = src.parameters(2, seed=5)

    def fit(members):  # exact least squares with bias on the pooled data of these clients
        x = torch.cat([torch.cat([clients[k].x_train, clients[k].x_test]) for k in members]).double()
        y = torch.cat([torch.cat([clients[k].y_train, clients[k].y_test]) for k in members]).double()
        xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        sol = torch.linalg.lstsq(xb, y).solution
        return sol, (xb @ sol - y).abs().max()

    for c in range(2):
        sol, resid = fit(range(c, 10, 2))  # 40 samples, 11 unknowns per output: only exact if W_c is shared
        assert resid < 1e-4
        expected = src.cluster_weight(params, c)[:, :3]
        assert torch.allclose(sol[:10].float(), expected, atol=1e-4)
        assert torch.allclose(sol[10].float(), params["b"][:3], atol=1e-4)
    assert fit(range(10))[1] > 1e-2  # the two clusters differ
    assert not torch.equal(src.make_clients(10, clusters, 6)[0].x_train, clients[0].x_train)


def test_synthetic_mlp_follows_generator() -> None:
    src = SyntheticMLP()
    clients = src.make_clients(8, torch.arange(8) % 4, seed=1)
    assert clients[0].x_train.shape == (96, 10) and clients[0].y_test.shape == (24, 1)
    params = src.parameters(4, seed=1)
    assert params["W"].shape == (10, 10) and params["W_out"].shape == (10, 1)  # teacher width d, as the reference
    for k, data in enumerate(clients):
        w = params["W"] + 2 * torch.outer(params["u"][k % 4], params["v"][k % 4])
        assert torch.allclose(data.y_train, torch.relu(data.x_train @ w + params["b"]) @ params["W_out"])


# ---------------------------------------------------------------------------------------------- splits
def all_ids(dm: FederatedDataModule, split: str) -> torch.Tensor:
    return ids(dm.split(split).x)


def test_splits_deterministic_per_seed(images) -> None:
    kw = dict(num_clients=6, num_clusters=2, cluster_transform="rotate", train_fraction=0.5, min_train_size=3)
    a, b, c = build(images, seed=1, **kw), build(images, seed=1, **kw), build(images, seed=2, **kw)
    for split in ("train", "test"):
        assert torch.equal(a.split(split).x, b.split(split).x) and torch.equal(a.split(split).y, b.split(split).y)
        assert not torch.equal(a.split(split).x, c.split(split).x)


def test_partitions_disjoint_cover_pool_and_test_from_test_pool() -> None:
    dm = build(IdSource(400, 200), num_clients=7)
    train, test = all_ids(dm, "train"), all_ids(dm, "test")
    assert torch.equal(train.sort().values, torch.arange(400))
    assert torch.equal(test.sort().values, torch.arange(200) + TEST_ID_OFFSET)
    for k in range(7):
        assert (ids(dm.client_split(k, "test")[0]) >= TEST_ID_OFFSET).all()
    # train and test have their own partitions: client shards differ in position, not just in pool
    assert dm.train_sizes.tolist() == [58, 57, 57, 57, 57, 57, 57]
    assert dm.sizes("test").sum() == 200 and dm.clusters.tolist() == [0] * 7


def test_rotate_and_label_shift_per_cluster(images) -> None:
    base = build(images, num_clients=8, num_clusters=4)
    rot = build(images, num_clients=8, num_clusters=4, cluster_transform="rotate")
    shift = build(images, num_clients=8, num_clusters=4, cluster_transform="label_shift")
    for k in range(8):
        for split in ("train", "test"):
            x0, y0 = base.client_split(k, split)
            assert torch.equal(rot.client_split(k, split)[0], torch.rot90(x0, k % 4, dims=(-2, -1)))
            assert torch.equal(rot.client_split(k, split)[1], y0)
            assert torch.equal(shift.client_split(k, split)[1], (y0 + k % 4) % 10)
            assert torch.equal(shift.client_split(k, split)[0], x0)


def test_label_subsets_only_cluster_labels() -> None:
    dm = build(IdSource(400, 200), num_clients=6, num_clusters=3, cluster_transform="label_subsets")
    for k in range(6):
        for split in ("train", "test"):
            assert (dm.client_split(k, split)[1] % 3 == k % 3).all()
    # every sample is used exactly once (each cluster has clients)
    assert torch.equal(all_ids(dm, "train").sort().values, torch.arange(400))
    assert torch.equal(all_ids(dm, "test").sort().values, torch.arange(200) + TEST_ID_OFFSET)


def test_reduced_fraction_sizes_and_min_size() -> None:
    full = build(IdSource(400, 200), num_clients=4)
    red = build(IdSource(400, 200), num_clients=4, train_fraction=0.05)
    tiny = build(IdSource(400, 200), num_clients=20, train_fraction=0.05)
    assert red.train_sizes.tolist() == [10] * 4  # round(0.05 * 100) = 5 < min_train_size
    assert tiny.train_sizes.tolist() == [10] * 20  # shards of 20 → min 10
    big = build(IdSource(4000, 200), num_clients=4, train_fraction=0.05)
    assert big.train_sizes.tolist() == [50] * 4
    capped = build(IdSource(40, 200), num_clients=8, train_fraction=0.05)
    assert capped.train_sizes.tolist() == [5] * 8  # min size capped at the shard size
    assert torch.equal(red.sizes("test"), full.sizes("test"))
    for k in range(4):  # a subset of the client's own shard
        assert set(ids(red.client_split(k)[0]).tolist()) <= set(ids(full.client_split(k)[0]).tolist())


def test_val_fraction_carves_from_train() -> None:
    full = build(IdSource(400, 200), num_clients=4)
    dm = build(IdSource(400, 200), num_clients=4, val_fraction=0.25)
    for k in range(4):
        tr, va = set(ids(dm.client_split(k)[0]).tolist()), set(ids(dm.client_split(k, "val")[0]).tolist())
        assert len(va) == 25 and not tr & va and tr | va == set(ids(full.client_split(k)[0]).tolist())
    assert full.val_dataloader().data is full.split("test")


def test_dirichlet_skews_labels_and_covers_pool() -> None:
    src = IdSource(2000, 500)
    iid = build(src, num_clients=10)
    skew = build(src, num_clients=10, dirichlet_alpha=0.1)

    def top_share(dm, split):
        return np.mean(
            [
                torch.bincount(dm.client_split(k, split)[1], minlength=10).max().item()
                / len(dm.client_split(k, split)[1])
                for k in range(10)
            ]
        )

    assert top_share(iid, "train") < 0.25 and top_share(skew, "train") > 0.5
    assert torch.equal(all_ids(skew, "train").sort().values, torch.arange(2000))
    assert torch.equal(all_ids(skew, "test").sort().values, torch.arange(500) + TEST_ID_OFFSET)
    assert skew.train_sizes.min() > 0 and skew.train_sizes.float().std() > iid.train_sizes.float().std()
    # a client's test labels follow its own training mix
    k = int(skew.train_sizes.argmax())
    tr = torch.bincount(skew.client_split(k)[1], minlength=10).float()
    te = torch.bincount(skew.client_split(k, "test")[1], minlength=10).float()
    assert torch.dot(tr / tr.norm(), te / te.norm()) > 0.9
    assert torch.equal(build(src, num_clients=10, dirichlet_alpha=0.1).split("train").x, skew.split("train").x)


# ---------------------------------------------------------------------------------------------- loaders
def collect(loader):
    return [(x.clone(), y.clone(), k) for x, y, k in loader]


def test_round_loader_batches_and_order() -> None:
    dm = build(IdSource(400, 200), num_clients=5, batch_size=16)
    loader = dm.train_dataloader()
    assert isinstance(loader, RoundLoader) and dm.train_dataloader() is loader
    loader.set_round(3, [4, 1, 2])
    assert loader.clients == [4, 1, 2]
    batches = collect(loader)
    assert len(batches) == len(loader) == 3 * 5  # 80 samples per client → 5 batches of 16
    assert [b[2] for b in batches] == [4] * 5 + [1] * 5 + [2] * 5
    assert all(type(b[2]) is int for b in batches)
    for k in (4, 1, 2):
        got = torch.cat([ids(x) for x, _, kk in batches if kk == k])
        assert torch.equal(got.sort().values, ids(dm.client_split(k)[0]).sort().values)
    # the same round replays exactly; another round shuffles differently
    again = collect(loader)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    loader.set_round(4, [4, 1, 2])
    other = collect(loader)
    assert not torch.equal(torch.cat([b[0] for b in other]), torch.cat([b[0] for b in batches]))
    # a client's batches do not depend on which clients precede it
    loader.set_round(3, [1])
    assert torch.equal(torch.cat([b[0] for b in collect(loader)]), torch.cat([b[0] for b in batches[5:10]]))
    # partial last batch kept; local epochs repeat the client's data
    odd = build(IdSource(103, 20), num_clients=1, batch_size=10)
    ol = odd.train_dataloader()
    ol.local_epochs = 2
    sizes = [len(y) for _, y, _ in ol]
    assert len(sizes) == len(ol) == ol.num_batches(0) == 22 and sizes[10] == 3 and sum(sizes) == 206
    with pytest.raises(ValueError, match="out of range"):
        loader.set_round(0, [5])


def test_round_loader_images_normalised_and_augmented(images) -> None:
    plain = build(images, num_clients=4, batch_size=8)
    aug = build(images, num_clients=4, batch_size=8, augment="flip_crop")
    x, _, _ = next(iter(plain.train_dataloader()))
    xa, _, _ = next(iter(aug.train_dataloader()))
    assert x.dtype == torch.float32 and abs(x.mean().item()) < 0.2 and abs(x.std().item() - 1) < 0.2
    assert x.shape == xa.shape and not torch.equal(x, xa)
    xb, _, _ = next(iter(aug.train_dataloader()))
    assert torch.equal(xa, xb)  # augmentation seeded by the round generator
    # eval batches are never augmented
    assert torch.equal(next(iter(aug.test_dataloader()))[0], next(iter(plain.test_dataloader()))[0])


def test_client_eval_loader_covers_each_sample_once() -> None:
    dm = build(IdSource(400, 203), num_clients=6, eval_batch_size=50)
    loader = dm.test_dataloader()
    assert isinstance(loader, ClientEvalLoader)
    batches = list(loader)
    assert len(batches) == len(loader) == 5 and len(batches[-1][1]) == 3
    xs = torch.cat([ids(b[0]) for b in batches])
    cids = torch.cat([b[2] for b in batches])
    assert cids.dtype == torch.int64 and torch.equal(cids, cids.sort().values)
    assert torch.equal(xs.sort().values, torch.arange(203) + TEST_ID_OFFSET)
    for k in range(6):
        assert torch.equal(xs[cids == k], ids(dm.client_split(k, "test")[0]))


class _CountingModule(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(1, 10)
        self.train_clients: list[int] = []
        self.val_seen = 0

    def training_step(self, batch, batch_idx):
        x, y, k = batch
        self.train_clients.append(k)
        return F.cross_entropy(self.net(x / 400), y)

    def validation_step(self, batch, batch_idx):
        x, y, client_ids = batch
        self.val_seen += len(client_ids)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_loaders_work_with_lightning(tmp_path) -> None:
    dm = FederatedDataModule(IdSource(400, 100), num_clients=4, batch_size=32)
    model = _CountingModule()
    trainer = lightning.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert model.train_clients == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert model.val_seen == 100


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_clients": 0}, "num_clients=0"),
        ({"num_clusters": 0}, "num_clusters=0"),
        ({"cluster_transform": "flip"}, "cluster_transform='flip'.*label_subsets"),
        ({"augment": "mixup"}, "augment='mixup'.*flip_crop"),
        ({"train_fraction": 0.0}, "train_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"dirichlet_alpha": -1.0}, "dirichlet_alpha"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_argument_validation(kwargs, match) -> None:
    args = {"num_clients": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        FederatedDataModule(IdSource(), **args)


def test_client_source_rules_and_idempotent_setup() -> None:
    with pytest.raises(ValueError, match="cluster_transform='rotate'.*SyntheticLinear"):
        FederatedDataModule(SyntheticLinear(), num_clients=4, cluster_transform="rotate")
    with pytest.raises(ValueError, match="augment='flip_crop' needs uint8 images"):
        build(IdSource(), num_clients=2, augment="flip_crop")
    with pytest.raises(RuntimeError, match="setup"):
        FederatedDataModule(IdSource(), num_clients=2).client_split(0)
    dm = build(SyntheticMLP(samples_per_client=10), num_clients=4, num_clusters=2, train_fraction=0.5, min_train_size=2)
    assert dm.train_sizes.tolist() == [4] * 4 and dm.sizes("test").tolist() == [2] * 4
    loader = dm.train_dataloader()
    dm.setup("validate")
    assert dm.train_dataloader() is loader and dm.num_classes is None
