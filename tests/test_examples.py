"""Example data sets and models: shapes, splits, determinism, evaluation."""
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from opq_torch.demo import examples as ex  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return ex.load_digits()


def test_digits_split(digits):
    assert digits.x_train.shape[1:] == (1, 8, 8)
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert len(digits.y_train) + len(digits.y_test) == 1797
    assert len(digits.y_test) == round(0.3 * 1797) or abs(len(digits.y_test) - 0.3 * 1797) < 1
    # standardized with the training statistics
    assert abs(float(digits.x_train.mean())) < 1e-4
    assert abs(float(digits.x_train.std()) - 1.0) < 1e-3
    # stratified: every class has the same share in train and test (within one sample)
    tr = np.bincount(digits.y_train.numpy(), minlength=10)
    te = np.bincount(digits.y_test.numpy(), minlength=10)
    total = tr + te
    expected = total * len(digits.y_test) / 1797
    assert np.all(np.abs(te - expected) <= 1.0)
    assert "digits" in repr(digits)


def test_digits_split_is_seeded():
    a, b, c = ex.load_digits(seed=3), ex.load_digits(seed=3), ex.load_digits(seed=4)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_test, c.y_test)


def test_mnist1d_defaults_and_rng_restored():
    pytest.importorskip("mnist1d")
    # generating the data must leave the global random streams alone
    np.random.seed(123)
    random.seed(123)
    expect_np, expect_py = np.random.random(), random.random()
    np.random.seed(123)
    random.seed(123)
    mnist1d = ex.load_mnist1d()
    assert np.random.random() == expect_np and random.random() == expect_py
    assert mnist1d.x_train.shape == (4000, 1, 40)
    assert mnist1d.x_test.shape == (1000, 1, 40)
    assert set(mnist1d.y_train.unique().tolist()) == set(range(10))
    assert abs(float(mnist1d.x_train.mean())) < 0.1


def test_load_data_rejects_unknown_name():
    with pytest.raises(ValueError, match="name.*'cifar'"):
        ex.load_data("cifar")
    with pytest.raises(ValueError, match="test_size"):
        ex.load_digits(test_size=1.5)


@pytest.mark.parametrize("name", sorted(ex.MODELS))
def test_models_forward_and_weight_share(name):
    spec = ex.MODELS[name]
    shape = (1, 8, 8) if spec.dataset == "digits" else (1, 40)
    m = ex.make_model(name, seed=0)
    with torch.no_grad():
        out = m.eval()(torch.zeros((3,) + shape))
    assert out.shape == (3, 10)
    params = dict(m.named_parameters())
    compressible = sum(p.numel() for p in params.values() if p.ndim >= 2)
    total = sum(p.numel() for p in params.values())
    assert compressible / total > 0.95
    # the big layers hold a few thousand weights or more
    assert max(p.numel() for p in params.values() if p.ndim >= 2) >= 3000
    # seeded initialization, torch's global stream untouched
    torch.manual_seed(7)
    expect = torch.rand(1)
    torch.manual_seed(7)
    m2 = ex.make_model(name, seed=0)
    assert torch.rand(1) == expect
    for k, v in m2.state_dict().items():
        assert torch.equal(v, m.state_dict()[k])


def test_make_model_rejects_unknown_name():
    with pytest.raises(ValueError, match="'vgg'"):
        ex.make_model("vgg")


def test_loaders_are_seeded(digits):
    def first_labels(seed):
        tr, _ = ex.loaders(digits, batch_size=32, seed=seed)
        return next(iter(tr))[1]

    assert torch.equal(first_labels(1), first_labels(1))
    assert not torch.equal(first_labels(1), first_labels(2))
    with pytest.raises(ValueError, match="batch_size"):
        ex.loaders(digits, batch_size=0)


def _subset(data, n):
    return ex.Data(data.name, data.x_train[:n], data.y_train[:n], data.x_test[:n],
                   data.y_test[:n], data.num_classes)


def test_train_dense_is_deterministic_and_learns(digits):
    small = digits

    def run():
        m = ex.make_model("digits_cnn", seed=1)
        tr, te = ex.loaders(small, batch_size=64, seed=1)
        with ex.limit_threads(1):
            h = ex.train_dense(m, tr, te, epochs=2, lr=3e-3, seed=1)
        return m, h

    m1, h1 = run()
    m2, h2 = run()
    assert h1.loss == h2.loss and h1.accuracy == h2.accuracy
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])
    assert len(h1.loss) == 2 and len(h1.accuracy) == 2
    assert h1.loss[-1] < h1.loss[0]
    assert h1.final_accuracy > 0.5          # far above chance (0.1) after 2 epochs
    assert "DenseHistory(epochs=2" in repr(h1)
    assert not torch.are_deterministic_algorithms_enabled()


def test_train_dense_rejects_bad_arguments(digits):
    m = ex.make_model("digits_cnn")
    tr, te = ex.loaders(digits)
    with pytest.raises(ValueError, match="epochs"):
        ex.train_dense(m, tr, te, epochs=0)
    with pytest.raises(ValueError, match="lr"):
        ex.train_dense(m, tr, te, epochs=1, lr=-1.0)


def test_evaluate_counts_and_restores_mode(digits):
    m = ex.make_model("digits_resnet", seed=0)
    _, te = ex.loaders(digits)
    m.train()
    acc = ex.evaluate(m, te)
    assert m.training
    with torch.no_grad():
        m.eval()
        pred = m(digits.x_test).argmax(1)
    assert acc == float((pred == digits.y_test).sum()) / len(digits.y_test)
    with pytest.raises(ValueError, match="loader"):
        ex.evaluate(m, [])


def test_limit_threads_restores():
    before = torch.get_num_threads()
    with ex.limit_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="n must"):
        with ex.limit_threads(0):
            pass
