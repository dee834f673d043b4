"""The benchmark model (CIFAR ResNet-20), its CIFAR-10 loader and its training script."""
import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)
import cifar  # noqa: E402
import resnet20 as rn  # noqa: E402


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_resnet20_parameter_count_and_layout():
    model = rn.resnet20()
    # 0.27 M (He et al. 2016, Table 6): option-A shortcuts add no parameters.
    assert _n_params(model) == 269_722
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(convs) + len(linears) == 20
    assert all(c.kernel_size == (3, 3) and c.bias is None for c in convs)
    assert sorted({c.out_channels for c in convs}) == [16, 32, 64]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == len(convs)


def test_resnet20_output_shape_and_batch_independence_in_eval():
    torch.manual_seed(0)
    model = rn.resnet20().eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        one = model(x[2:3])
    assert out.shape == (5, 10)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[2:3], one, rtol=1e-4, atol=1e-5)


def test_option_a_shortcut_pads_zero_channels_and_subsamples():
    block = rn.BasicBlock(16, 32, stride=2)
    x = torch.randn(2, 16, 8, 8)
    s = block.shortcut(x)
    assert s.shape == (2, 32, 4, 4)
    torch.testing.assert_close(s[:, 8:24], x[:, :, ::2, ::2])
    assert (s[:, :8] == 0).all() and (s[:, 24:] == 0).all()


@pytest.mark.skipif(not os.path.isfile(rn.WEIGHTS), reason="trained weights not committed")
def test_committed_weights_load_and_match_the_json():
    model = rn.load_pretrained()
    from safetensors.torch import load_file
    state = load_file(rn.WEIGHTS)
    assert all(v.dtype == torch.float32 for k, v in state.items()
               if not k.endswith("num_batches_tracked"))
    assert any(k.endswith("running_var") for k in state)
    with open(os.path.splitext(rn.WEIGHTS)[0] + ".json") as f:
        meta = json.load(f)
    assert meta["parameters"] == _n_params(model)
    assert 0.1 < meta["test_accuracy"] <= 1.0
    assert meta["epochs"] == len(meta["history"]) <= meta["settings"]["epochs"]
    assert meta["completed"] == (meta["epochs"] == meta["settings"]["epochs"])
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 32, 32))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_load_pretrained_missing_file_names_the_path(tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        rn.load_pretrained(missing)


def test_loader_fails_with_one_clear_line_when_the_tar_is_absent(tmp_path, monkeypatch):
    monkeypatch.setenv("OPQ_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("OPQ_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as e:
        cifar.load_cifar10()
    msg = str(e.value)
    assert "\n" not in msg
    assert cifar.TAR_NAME in msg and str(tmp_path / "data") in msg
    assert not (tmp_path / "cache").exists()


def test_default_paths(monkeypatch):
    monkeypatch.delenv("OPQ_DATA", raising=False)
    monkeypatch.delenv("OPQ_CACHE", raising=False)
    repo = os.path.dirname(BENCH)
    assert cifar.data_path() == os.path.normpath(
        os.path.join(repo, "..", "shared", "data", cifar.TAR_NAME))
    assert cifar.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "opq", "cifar10")


def _fake_tar(path, per_class):
    """A tar.gz like the real one: constant-colour JPEGs, members in a scrambled order."""
    from PIL import Image

    rng = np.random.default_rng(0)
    members = [(c, i) for c in range(10) for i in range(per_class)]
    rng.shuffle(members)
    with tarfile.open(path, "w:gz") as tf:
        for c, i in members:
            img = np.full((32, 32, 3), 0, np.uint8)
            img[..., 0] = 20 * c + 5     # class in red
            img[..., 1] = 40 * i + 10    # index within the class in green
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=95)
            info = tarfile.TarInfo(f"train/{cifar.CLASSES[c]}/{i:04d}.jpg")
            info.size = buf.tell()
            buf.seek(0)
            tf.addfile(info, buf)


def test_loader_holds_out_the_last_images_of_every_class_and_caches(tmp_path, monkeypatch):
    per_class, held = 5, 2
    (tmp_path / "data").mkdir()
    tar = tmp_path / "data" / cifar.TAR_NAME
    _fake_tar(str(tar), per_class)
    monkeypatch.setenv("OPQ_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("OPQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cifar, "TEST_PER_CLASS", held)
    x, y, xt, yt = cifar.load_cifar10()
    assert x.dtype == xt.dtype == np.uint8 and y.dtype == yt.dtype == np.int64
    assert x.shape == (10 * (per_class - held), 32, 32, 3) and xt.shape == (10 * held, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(y), [per_class - held] * 10)
    np.testing.assert_array_equal(np.bincount(yt), [held] * 10)
    # Labels follow the class order; the held-out images are the last ones by file name.
    red = lambda a: a[:, 16, 16, 0].astype(int)  # noqa: E731
    green = lambda a: a[:, 16, 16, 1].astype(int)  # noqa: E731
    assert np.abs(red(x) - (20 * y + 5)).max() <= 3
    assert np.abs(red(xt) - (20 * yt + 5)).max() <= 3
    idx_train = np.rint((green(x) - 10) / 40).astype(int)
    idx_test = np.rint((green(xt) - 10) / 40).astype(int)
    for c in range(10):
        assert sorted(idx_train[y == c]) == list(range(per_class - held))
        assert sorted(idx_test[yt == c]) == list(range(per_class - held, per_class))
    # Cached: a second call does not need the tar file.
    tar.unlink()
    again = cifar.load_cifar10()
    for a, b in zip((x, y, xt, yt), again):
        np.testing.assert_array_equal(a, b)


def test_channel_stats_and_to_tensor():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    mean, std = cifar.channel_stats(x)
    np.testing.assert_allclose(mean, (x / 255.0).mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(std, (x / 255.0).std(axis=(0, 1, 2)), rtol=1e-5)
    t = cifar.to_tensor(x, mean, std)
    assert t.shape == (6, 3, 32, 32) and t.dtype == torch.float32
    np.testing.assert_allclose(t.mean(dim=(0, 2, 3)).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(t.std(dim=(0, 2, 3), unbiased=False).numpy(), 1.0, rtol=1e-4)
    with pytest.raises(ValueError, match="uint8 NHWC"):
        cifar.to_tensor(x.astype(np.float32), mean, std)


def test_augment_is_a_padded_crop_with_optional_flip():
    x = torch.randn(64, 3, 32, 32)
    out = cifar.augment(x, torch.Generator().manual_seed(3))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flips = 0
    for i in range(len(x)):
        found = None
        for dy in range(9):
            for dx in range(9):
                crop = padded[i, :, dy:dy + 32, dx:dx + 32]
                if torch.equal(crop, out[i]):
                    found = "plain"
                elif torch.equal(crop.flip(-1), out[i]):
                    found = "flip"
                if found:
                    break
            if found:
                break
        assert found is not None, f"image {i} is not a crop of the padded input"
        flips += found == "flip"
    assert 0 < flips < len(x)
    again = cifar.augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)


def _tiny_data(n_train=96, n_test=20):
    rng = np.random.default_rng(2)
    return (rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, n_train).astype(np.int64),
            rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, n_test).astype(np.int64))


def test_training_resumes_from_its_checkpoint_to_the_same_weights(tmp_path, monkeypatch):
    import train_resnet20 as tr
    from safetensors.torch import load_file

    data = _tiny_data()
    monkeypatch.setattr(tr.cifar, "load_cifar10", lambda: data)
    threads = torch.get_num_threads()
    common = ["--epochs", "2", "--batch", "16"]
    try:
        whole = tr.main(common + ["--ckpt", str(tmp_path / "a.pt"),
                                  "--out", str(tmp_path / "a.safetensors")])
        assert tr.main(common + ["--ckpt", str(tmp_path / "b.pt"), "--stop-after", "1",
                                 "--out", str(tmp_path / "b.safetensors")]) is None
        assert not (tmp_path / "b.safetensors").exists()
        partial = tr.main(common + ["--ckpt", str(tmp_path / "b.pt"), "--export-now",
                                    "--out", str(tmp_path / "p.safetensors")])
        assert partial["epochs"] == 1 and partial["completed"] is False
        assert (tmp_path / "p.json").exists()
        with pytest.raises(SystemExit, match="needs a checkpoint"):
            tr.main(common + ["--ckpt", str(tmp_path / "none.pt"), "--export-now",
                              "--out", str(tmp_path / "q.safetensors")])
        resumed = tr.main(common + ["--ckpt", str(tmp_path / "b.pt"),
                                    "--out", str(tmp_path / "b.safetensors")])
        with pytest.raises(SystemExit, match="other settings"):
            tr.main(["--epochs", "3", "--batch", "16", "--ckpt", str(tmp_path / "b.pt"),
                     "--out", str(tmp_path / "c.safetensors")])
    finally:
        torch.set_num_threads(threads)
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert whole["epochs"] == resumed["epochs"] == 2
    assert whole["completed"] and resumed["completed"]
    assert whole["test_accuracy"] == resumed["test_accuracy"]
    with open(tmp_path / "b.json") as f:
        meta = json.load(f)
    assert meta["steps_per_epoch"] == 6 and len(meta["history"]) == 2
    model = rn.load_pretrained(str(tmp_path / "b.safetensors"))
    assert _n_params(model) == 269_722


def _have_cifar():
    try:
        return os.path.isfile(cifar.data_path()) or \
            os.path.isfile(os.path.join(cifar.cache_dir(), "x_test.npy"))
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(rn.WEIGHTS), reason="trained weights not committed")
@pytest.mark.skipif(not _have_cifar(), reason="CIFAR-10 tar file and cache absent")
def test_committed_weights_reach_the_recorded_held_out_accuracy():
    import train_resnet20 as tr

    x_train, _, x_test, y_test = cifar.load_cifar10()
    with open(os.path.splitext(rn.WEIGHTS)[0] + ".json") as f:
        meta = json.load(f)
    mean, std = cifar.channel_stats(x_train)
    np.testing.assert_allclose(mean, meta["normalization"]["mean"], rtol=1e-6)
    np.testing.assert_allclose(std, meta["normalization"]["std"], rtol=1e-6)
    model = rn.load_pretrained()
    acc = tr.evaluate(model, cifar.to_tensor(x_test, mean, std), torch.from_numpy(y_test),
                      channels_last=False)
    # Same weights, same images; only the memory layout may differ from the training run.
    assert abs(acc - meta["test_accuracy"]) <= 0.002
