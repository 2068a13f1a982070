"""RD4AD reverse distillation: contract, frozen teachers, teacher loading, learned behaviour."""

import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import ResNetFeatures

from volad.errors import VoladConfigError, VoladDataError
from volad.methods import Batch, ReverseDistillation
from volad.nn.distillation import FeatureStandardizer, cosine_distance, standardized_distance
from volad.nn.pretrained import build_teacher
from volad.nn.teachers import ResNetTeacher
from volad.types import AnomalyOutput


def _batch(spatial_dims, n=2, size=16, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, channels, *([size] * spatial_dims))
    return Batch(image=torch.rand(shape, generator=g), mask=torch.ones((n, 1, *shape[2:])))


def _rd(spatial_dims, **kw):
    kw.setdefault("teacher", "random")
    return ReverseDistillation(spatial_dims=spatial_dims, teacher_arch="resnet10", **kw)


def test_cosine_distance_matches_definition():
    t, s = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    d = cosine_distance(t, s)
    expected = 1 - (t * s).sum(1) / (t.norm(dim=1) * s.norm(dim=1))
    assert d.shape == (2, 1, 3, 4)
    assert torch.allclose(d[:, 0], expected, atol=1e-5)
    assert torch.allclose(cosine_distance(t, 3 * t), torch.zeros(2, 1, 3, 4), atol=1e-5)


def test_feature_standardizer_matches_masked_statistics():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 4, 5, 6, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0]).view(1, 4, 1, 1) + 7
    w = (torch.rand(3, 1, 5, 6, generator=g) > 0.3).float()
    z = FeatureStandardizer(4)
    assert torch.equal(z(f), f)  # unfitted: identity
    z.update(f[:2], w[:2])
    z.update(f[2:], w[2:])
    sel = f.permute(1, 0, 2, 3)[:, w[:, 0] > 0]  # (C, N) positions inside the weight
    mean, std = sel.mean(1), sel.std(1, unbiased=False)
    assert torch.allclose(z(f), (f - mean.view(1, 4, 1, 1)) / std.view(1, 4, 1, 1), atol=1e-5)
    t, s = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert torch.allclose(standardized_distance(t, s)[:, 0], ((t - s) ** 2).mean(1))


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("teacher,distance,stride", [("random", "l2", 1), ("ssl", "l2", 2), ("random", "cosine", 2), ("random", "auto", 1)])
def test_contract_stages_and_state_dict_round_trip(spatial_dims, teacher, distance, stride):
    torch.manual_seed(0)
    m = _rd(spatial_dims, teacher=teacher, in_channels=2, distance=distance, bottleneck_stride=stride)
    if distance == "auto":  # the paper's cosine in slice mode, standardised L2 in 3D
        distance = "cosine" if spatial_dims == 2 else "l2"
    assert m.distance == distance
    assert m.bottleneck(m.teacher(torch.rand(2, 2, *[32] * spatial_dims))).shape[2:] == (2 // stride,) * spatial_dims
    assert m.stages == ("teacher",) * (teacher == "ssl") + ("feature_stats",) * (distance == "l2") + ("student",)
    b = _batch(spatial_dims, channels=2, size=32)
    for stage in m.stages:
        opt = m.configure_optimizers(stage)
        m.train()
        losses = m.optimization_step(b, stage, opt)
        assert (losses["positions"] if stage == "feature_stats" else losses["loss"]) > 0
    assert set(losses) == {"loss", "scale1", "scale2", "scale3"}
    assert abs(losses["loss"] - (losses["scale1"] + losses["scale2"] + losses["scale3"])) < 1e-5
    m.eval()
    mask = torch.zeros_like(b.mask)
    mask[(slice(None), slice(None), *[slice(4, 28)] * spatial_dims)] = 1
    out = m.predict(b.image, mask)
    assert isinstance(out, AnomalyOutput) and out.reconstruction is None
    assert out.anomaly_map.shape == (2, 1, *b.image.shape[2:])
    assert (out.anomaly_map >= 0).all() and (out.anomaly_map[mask == 0] == 0).all()
    assert out.anomaly_map[mask == 1].max() > 0
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    if distance == "l2":  # the fitted statistics are part of the state
        assert m.standardizers[0].count > 0
    m2 = ReverseDistillation.rebuild(m.hparams).eval()
    m2.load_state_dict(torch.load(buf))
    assert torch.allclose(m2.predict(b.image, mask).anomaly_map, out.anomaly_map)


def test_map_is_sum_of_upsampled_scales_then_smoothed():
    torch.manual_seed(0)
    m = _rd(2, smoothing_sigma=0).eval()
    x = torch.rand(1, 1, 32, 48)
    assert [tuple(f.shape[2:]) for f in m.teacher(x)] == [(8, 12), (4, 6), (2, 3)]
    dists = m.distances(x)
    expected = sum(F.interpolate(d, size=(32, 48), mode="bilinear", align_corners=False) for d in dists)
    assert torch.allclose(m.predict(x).anomaly_map, expected, atol=1e-6)
    smooth = _rd(2, smoothing_sigma=2.0)
    smooth.load_state_dict(m.state_dict())
    smoothed = smooth.eval().predict(x).anomaly_map
    assert smoothed.std() < expected.std()  # a low-pass filter, not a no-op
    assert torch.allclose(smoothed.mean(), expected.mean(), rtol=0.1)


def test_student_stage_leaves_the_teacher_untouched():
    torch.manual_seed(0)
    m = _rd(3)
    before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    opt = m.configure_optimizers("student")
    params = {id(p) for g in opt["main"].param_groups for p in g["params"]}
    assert not params & {id(p) for p in m.teacher.parameters()}
    for _ in range(2):
        m.train()
        m.optimization_step(_batch(3, size=32), "student", opt)
    assert not m.teacher.training  # batch-norm statistics stay fixed
    for k, v in m.teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("task", ["masked", "denoising"])
def test_ssl_stage_trains_the_teacher_then_freezes_it(task):
    torch.manual_seed(0)
    m = _rd(2, teacher="ssl", ssl_task=task)
    b = _batch(2, size=32)
    b.image = F.avg_pool2d(b.image, 5, 1, 2)
    b.mask[..., :4] = 0
    seen = m.pretext.corrupt(b.image, b.mask)
    if task == "denoising":  # coarse noise inside the brain only
        assert torch.equal(seen[..., :4], b.image[..., :4]) and not torch.allclose(seen[..., 4:], b.image[..., 4:])
    else:  # zeroed blocks
        assert (seen == 0).any() and not (b.image == 0).any()
    w0 = m.teacher.backbone.conv1.weight.clone()
    opt = m.configure_optimizers("teacher")
    m.train()
    assert m.teacher.training
    first = m.optimization_step(b, "teacher", opt)["loss"]
    for _ in range(40):
        last = m.optimization_step(b, "teacher", opt)["loss"]
    assert last < 0.6 * first
    assert not torch.equal(w0, m.teacher.backbone.conv1.weight)
    m.configure_optimizers("student")
    m.train()
    assert not m.teacher.training and not any(p.requires_grad for p in m.teacher.parameters())


def test_student_learns_healthy_features_and_flags_an_anomaly():
    """Trained on smooth images only, the student fails where a bright blob is inserted.

    64² images give a 2×2 embedding, so the blob (one quadrant) is compared with
    the opposite quadrant, which the embedding keeps apart.
    """
    torch.manual_seed(0)
    m = _rd(2, smoothing_sigma=1.0, lr=2e-3, student_noise_std=0.0, distance="l2")
    g = torch.Generator().manual_seed(3)
    healthy = F.avg_pool2d(torch.rand(4, 1, 64, 64, generator=g), 7, 1, 3)
    b = Batch(healthy, torch.ones_like(healthy))
    m.optimization_step(b, "feature_stats", m.configure_optimizers("feature_stats"))
    opt = m.configure_optimizers("student")
    first = m.optimization_step(b, "student", opt)["loss"]
    for _ in range(30):
        last = m.optimization_step(b, "student", opt)["loss"]
    assert last < 0.5 * first
    test = healthy[:1].clone()
    test[..., 8:20, 8:20] = 1.5
    amap = m.eval().predict(test).anomaly_map[0, 0]
    inside, far = amap[8:20, 8:20].mean(), amap[40:, 40:].mean()
    assert inside > 2 * far, (float(inside), float(far))


# -- teacher loading -------------------------------------------------------------------
def _medicalnet_file(tmp_path, arch="resnet10"):
    """A checkpoint in MedicalNet's own format: {'state_dict': {'module.<key>': tensor}}, with a seg head."""
    torch.manual_seed(7)
    net = ResNetFeatures(arch, pretrained=False, spatial_dims=3, in_channels=1)
    for mod in net.modules():  # non-default batch-norm statistics, to check they are loaded too
        if isinstance(mod, torch.nn.BatchNorm3d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.zeros(2, 512, 1, 1, 1)
    path = tmp_path / "resnet_10_23dataset.pth"
    torch.save({"state_dict": state}, path)
    return net.eval(), path


def test_medicalnet_teacher_loads_a_saved_state_dict(tmp_path):
    net, path = _medicalnet_file(tmp_path)
    teacher = build_teacher("medicalnet", arch="resnet10", spatial_dims=3, in_channels=1, weights=path).eval()
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        ref = net((x - teacher.input_mean) / teacher.input_std)[1:4]
        got = teacher(x)
    for r, t in zip(ref, got):
        assert torch.allclose(r, t, atol=1e-5)
    m = ReverseDistillation(spatial_dims=3, teacher="medicalnet", teacher_arch="resnet10", teacher_weights=str(path))
    assert m.stages == ("feature_stats", "student") and m.hparams["teacher_weights"] == str(path)
    assert torch.equal(m.teacher.backbone.conv1.weight, net.conv1.weight)


def test_medicalnet_weights_serve_several_contrasts(tmp_path):
    net, path = _medicalnet_file(tmp_path)
    teacher = build_teacher("medicalnet", arch="resnet10", spatial_dims=3, in_channels=3, weights=path).eval()
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():  # the same contrast three times gives the single-channel response
        ref = net((x - teacher.input_mean) / teacher.input_std)[1]
        assert torch.allclose(teacher(x.repeat(1, 3, 1, 1, 1))[0], ref, atol=1e-4)


def test_medicalnet_weights_come_through_monais_pretrained_path_when_no_file_is_given(tmp_path, monkeypatch, capsys):
    """Without teacher_weights MONAI's own download (Hugging Face hub cache) supplies them; offline, one clear error."""
    from huggingface_hub.errors import LocalEntryNotFoundError
    from monai.networks.nets import resnet

    net, path = _medicalnet_file(tmp_path)
    asked = []

    def hub(repo_id, filename, **kwargs):  # the Hugging Face hub, stubbed: the cached file
        asked.append((repo_id, filename))
        return str(path)

    monkeypatch.setattr(resnet, "hf_hub_download", hub)
    teacher = build_teacher("medicalnet", arch="resnet10", spatial_dims=3)
    assert asked == [("TencentMedicalNet/MedicalNet-Resnet10", "resnet_10_23dataset.pth")] and "Hugging Face hub cache" in capsys.readouterr().out
    assert torch.equal(teacher.backbone.layer1[0].conv1.weight, net.layer1[0].conv1.weight)

    def offline(repo_id, filename, **kwargs):
        raise LocalEntryNotFoundError("cannot reach huggingface.co and the file is not cached")

    monkeypatch.setattr(resnet, "hf_hub_download", offline)
    with pytest.raises(VoladDataError, match=r"resnet_10_23dataset\.pth for resnet10 are not cached and could not be fetched from "
                                             r"https://huggingface\.co/TencentMedicalNet/MedicalNet-Resnet10.*teacher_weights") as e:
        build_teacher("medicalnet", arch="resnet10", spatial_dims=3)
    assert "models--TencentMedicalNet--MedicalNet-Resnet10" in str(e.value)
    with pytest.raises(VoladConfigError, match="cannot serve slice mode"):
        build_teacher("medicalnet", arch="resnet10", spatial_dims=2)


def test_medicalnet_teacher_errors_are_clear(tmp_path):
    missing = tmp_path / "nope" / "resnet_18.pth"
    with pytest.raises(VoladDataError, match="not found.*MedicalNet.*teacher_weights") as e:
        build_teacher("medicalnet", weights=missing)
    assert str(missing) in str(e.value)
    _, path = _medicalnet_file(tmp_path)
    with pytest.raises(VoladDataError, match="slice mode") as e:
        build_teacher("medicalnet", arch="resnet10", spatial_dims=2, weights=path)
    assert str(path) in str(e.value)
    with pytest.raises(VoladDataError, match="does not fit"):
        build_teacher("medicalnet", arch="resnet18", weights=path)
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(VoladDataError, match="cannot read"):
        build_teacher("medicalnet", weights=junk)
    with pytest.raises(VoladConfigError, match="takes no teacher_weights"):
        build_teacher("random", weights=path)
    with pytest.raises(VoladConfigError, match="teacher must be 'medicalnet', 'imagenet', 'ssl', 'random' or 'run'"):
        build_teacher("dino")


def test_teacher_channels_follow_the_architecture():
    assert ResNetTeacher("resnet18", spatial_dims=2).channels == (64, 128, 256)
    assert ResNetTeacher("resnet50", spatial_dims=2).channels == (256, 512, 1024)
    with pytest.raises(VoladConfigError, match="resnet18"):
        ResNetTeacher("vgg16")


def test_traced_export_follows_its_input():
    """``ckpt_export --use_trace`` must give a network that computes, not one frozen on the trace input.

    MONAI's type-A shortcut (resnet18/34) uses ``.data``, which tracing records as a constant;
    the teacher swaps it for an equivalent trace-safe module.
    """
    torch.manual_seed(0)
    m = ReverseDistillation(spatial_dims=2, teacher="random", teacher_arch="resnet18").eval()
    x1, x2 = torch.rand(1, 1, 48, 48), torch.rand(1, 1, 48, 48)
    with torch.no_grad():
        traced = torch.jit.trace(m, x1, check_trace=False)
        assert torch.allclose(traced(x2), m(x2), atol=1e-5)
        assert torch.equal(m(x2), m.predict(x2).anomaly_map)


# -- ImageNet teachers (slice mode) ------------------------------------------------------------
def _torchvision_layout(arch: str, seed: int = 3) -> torch.nn.Module:
    """A whole ImageNet ResNet in torchvision's layout (layer4 and fc included), random but non-default."""
    from monai.networks.nets import ResNet

    from volad.nn.teachers import IMAGENET_ARCHITECTURES, WideBottleneck

    torch.manual_seed(seed)
    block, layers, _ = IMAGENET_ARCHITECTURES[arch]
    net = ResNet(block=WideBottleneck if block == "wide" else block, layers=layers, block_inplanes=[64, 128, 256, 512], spatial_dims=2,
                 n_input_channels=3, conv1_t_size=7, conv1_t_stride=2, shortcut_type="B", bias_downsample=False, num_classes=1000)
    for mod in net.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _published(folder: Path, arch: str = "resnet18", seed: int = 3) -> tuple[torch.nn.Module, str]:
    """A torchvision-layout file under the name torchvision would publish it (``<arch>-<first 8 hex digits of its SHA-256>.pth``)."""
    import hashlib

    net = _torchvision_layout(arch, seed)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "tmp.pth"
    torch.save(net.state_dict(), tmp)
    name = f"{arch}-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    tmp.rename(folder / name)
    return net, name


def _serve(monkeypatch, server: Path, arch: str, name: str) -> None:
    """torchvision's site is a local folder served by file URL; its published name for ``arch`` is ``name``."""
    from volad.nn import pretrained, teachers

    block, layers, _ = teachers.IMAGENET_ARCHITECTURES[arch]
    monkeypatch.setitem(teachers.IMAGENET_ARCHITECTURES, arch, (block, layers, (name,)))
    monkeypatch.setattr(pretrained, "TORCHVISION_URL", server.as_uri() + "/")


@pytest.mark.parametrize("arch,params,keys", [("resnet18", 11_689_512, 122), ("resnet50", 25_557_032, 320), ("wide_resnet50_2", 68_883_240, 320)])
def test_imagenet_architectures_have_torchvisions_parameters_and_keys(arch, params, keys):
    """torchvision's published parameter counts and state-dict sizes, so its weight files load key for key."""
    net = _torchvision_layout(arch)
    assert sum(p.numel() for p in net.parameters()) == params and len(net.state_dict()) == keys
    if arch == "wide_resnet50_2":  # the doubled inner width of the first bottleneck
        assert tuple(net.state_dict()["layer1.0.conv2.weight"].shape) == (128, 128, 3, 3)


def test_imagenet_teacher_reads_the_hub_cache_and_sees_grey_as_normalised_rgb(tmp_path, monkeypatch):
    from volad.nn.teachers import IMAGENET_MEAN, IMAGENET_STD

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    net, name = _published(cache)  # as torchvision names it: its hash prefix is checked before it loads
    _serve(monkeypatch, tmp_path / "site", "resnet18", name)
    teacher = build_teacher("imagenet", arch="resnet18", spatial_dims=2, in_channels=1).eval()
    assert torch.equal(teacher.backbone.layer3[1].conv2.weight, net.layer3[1].conv2.weight)
    assert torch.equal(teacher.backbone.bn1.running_var, net.bn1.running_var)
    grey = torch.rand(2, 1, 64, 48)
    rgb = (grey.repeat(1, 3, 1, 1) - torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
    with torch.no_grad():
        x = net.maxpool(net.act(net.bn1(net.conv1(rgb))))
        f1 = net.layer1(x)
        ref = [f1, net.layer2(f1), net.layer3(net.layer2(f1))]
        got = teacher(grey)
    assert [tuple(f.shape[2:]) for f in got] == [(16, 12), (8, 6), (4, 3)] and teacher.channels == (64, 128, 256)
    for r, t in zip(ref, got):
        torch.testing.assert_close(t, r)

    # A trained run is rebuilt from its checkpoint alone: the weights file may be gone.
    m = ReverseDistillation(spatial_dims=2, teacher="imagenet", teacher_arch="resnet18")
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    (cache / name).unlink()
    monkeypatch.setattr(torch.hub, "download_url_to_file", None)  # nor fetched
    again = ReverseDistillation.rebuild(m.hparams)
    buf.seek(0)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(again.teacher.backbone.conv1.weight, net.conv1.weight)


def test_imagenet_weights_are_downloaded_once_into_the_hub_cache_and_hash_checked(tmp_path, monkeypatch, capsys):
    """First use downloads torchvision's published file into the torch hub cache (hash prefix checked); a second run reads the cache."""
    from volad.nn import pretrained

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    net, name = _published(tmp_path / "site")
    _serve(monkeypatch, tmp_path / "site", "resnet18", name)
    teacher = build_teacher("imagenet", arch="resnet18", spatial_dims=2)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / name
    assert cached.is_file() and "downloading torchvision's ImageNet resnet18 weights" in capsys.readouterr().out
    assert torch.equal(teacher.backbone.layer2[0].conv1.weight, net.layer2[0].conv1.weight)
    assert not list(cached.parent.glob("*.partial"))

    def no_network(*args, **kwargs):
        raise AssertionError("the cache was there: nothing may be fetched")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    again = build_teacher("imagenet", arch="resnet18", spatial_dims=2)
    assert torch.equal(again.backbone.conv1.weight, net.conv1.weight) and "downloading" not in capsys.readouterr().out
    assert pretrained.published_hash_prefix(name) == name[len("resnet18-"):-len(".pth")]


def test_a_file_that_fails_its_hash_is_refused_and_removed_never_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _, name = _published(tmp_path / "site")
    wrong = name.replace(name[len("resnet18-"):-4], "00000000")
    (tmp_path / "site" / name).rename(tmp_path / "site" / wrong)  # the served bytes do not hash to the prefix in their name
    _serve(monkeypatch, tmp_path / "site", "resnet18", wrong)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    with pytest.raises(VoladDataError, match="failed its SHA-256 check.*nothing was kept") as e:
        build_teacher("imagenet", arch="resnet18", spatial_dims=2)
    assert str(cache / wrong) in str(e.value) and not any(cache.iterdir())
    # A corrupt file already in the cache (a truncated copy, another file under the name) is removed, not loaded.
    (tmp_path / "site" / wrong).rename(cache / wrong)
    with pytest.raises(VoladDataError, match="failed its SHA-256 check.*removed, never loaded"):
        build_teacher("imagenet", arch="resnet18", spatial_dims=2)
    assert not (cache / wrong).exists()


def test_imagenet_teacher_errors_say_where_the_weights_come_from(tmp_path, monkeypatch):
    from volad.nn import pretrained

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(pretrained, "TORCHVISION_URL", (tmp_path / "offline").as_uri() + "/")  # a site that does not answer
    with pytest.raises(VoladDataError, match=r"no ImageNet weights for wide_resnet50_2 in the local torch hub cache, and downloading them failed"
                                             r".*wide_resnet50_2-95faca4d\.pth.*on a machine with internet access and put it there") as e:
        build_teacher("imagenet", arch="wide_resnet50_2", spatial_dims=2)
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(VoladDataError, match="ImageNet teacher weights not found"):
        build_teacher("imagenet", arch="resnet18", spatial_dims=2, weights=tmp_path / "nope.pth")
    with pytest.raises(VoladConfigError, match="ImageNet teachers are 2D"):
        build_teacher("imagenet", arch="resnet18", spatial_dims=3)
    with pytest.raises(VoladConfigError, match="1 contrast .* or 3"):
        build_teacher("imagenet", arch="resnet18", spatial_dims=2, in_channels=2)
    with pytest.raises(VoladConfigError, match="must be one of resnet18, resnet34, resnet50, wide_resnet50_2"):
        build_teacher("imagenet", arch="resnet10", spatial_dims=2)
    path = tmp_path / "r34.pth"
    torch.save(_torchvision_layout("resnet18").state_dict(), path)  # the wrong network's file
    with pytest.raises(VoladDataError, match="does not fit.*resnet34-b627a593"):
        build_teacher("imagenet", arch="resnet34", spatial_dims=2, weights=path)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_feature_zoom_puts_the_teachers_cells_on_a_finer_grid(spatial_dims):
    torch.manual_seed(0)
    m = _rd(spatial_dims, feature_zoom=2).eval()
    size = (24,) * spatial_dims  # a multiple of 8, not of 16: the zoomed teacher still sees multiples of 16
    assert m.size_divisor == 8
    x = torch.rand(1, 1, *size)
    assert [tuple(f.shape[2:]) for f in m.teacher_features(x)] == [(12,) * spatial_dims, (6,) * spatial_dims, (3,) * spatial_dims]
    assert [tuple(f.shape[2:]) for f in _rd(spatial_dims).eval().teacher_features(torch.rand(1, 1, *[32] * spatial_dims))][0] == (8,) * spatial_dims
    out = m.predict(x, torch.ones(1, 1, *size))
    assert out.anomaly_map.shape == (1, 1, *size) and torch.isfinite(out.anomaly_map).all()
    with pytest.raises(VoladConfigError, match="feature_zoom must be 1, 2 or 4"):
        _rd(spatial_dims, feature_zoom=3)


# -- a teacher from a trained run ---------------------------------------------------------------
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_trained_networks_encoder_teaches_frozen_and_the_distillation_rebuilds_from_its_record(spatial_dims):
    """``teacher="run"``: the encoder of a trained network (pii3d's U-Net) gives the three feature scales with its weights;
    the distillation records the network's method and rebuilds from its own checkpoint without it."""
    from volad.methods import SyntheticAnomalyDetector

    torch.manual_seed(0)
    pii = SyntheticAnomalyDetector(spatial_dims=spatial_dims, channels=(8, 16, 32, 64)).eval()
    m = ReverseDistillation(spatial_dims=spatial_dims, teacher="run", teacher_run="runs/pii3d", teacher_network=pii).eval()
    assert m.hparams["teacher_method"] == pii.hparams and m.hparams["teacher_run"] == "runs/pii3d" and "teacher_network" not in m.hparams
    assert m.teacher.channels == (8, 16, 32) and m.size_divisor == 8
    assert m.stages == (("feature_stats", "student") if spatial_dims == 3 else ("student",))
    x = torch.rand(2, 1, *[16] * spatial_dims)
    with torch.no_grad():  # the U-Net's own down path: stage k is the k-th downsampling block
        ref1 = pii.net.model[0](x)
        ref2 = pii.net.model[1].submodule[0](ref1)
        got = m.teacher(x)
    assert torch.equal(got[0], ref1) and torch.equal(got[1], ref2)
    assert [tuple(f.shape[2:]) for f in got] == [(8,) * spatial_dims, (4,) * spatial_dims, (2,) * spatial_dims]
    m.configure_optimizers("student")
    assert not any(p.requires_grad for p in m.teacher.parameters())
    out = m.predict(x, torch.ones_like(x))
    assert out.anomaly_map.shape == x.shape and torch.isfinite(out.anomaly_map).all()
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    again = ReverseDistillation.rebuild(json.loads(json.dumps(m.hparams)))
    buf.seek(0)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(again.eval().predict(x, torch.ones_like(x)).anomaly_map, out.anomaly_map)


def test_the_bundle_loads_the_teacher_run_by_its_folder(tmp_path):
    """``--teacher run --teacher_run FOLDER``: the bundle hands the method the run's trained network (best checkpoint)."""
    from volad.bundle.config import bundle_config
    from volad.methods import SyntheticAnomalyDetector
    from volad.runs.checkpoint import save_checkpoint

    torch.manual_seed(1)
    pii = SyntheticAnomalyDetector(spatial_dims=3, channels=(8, 16, 32, 64))
    run = tmp_path / "pii3d"
    save_checkpoint(run / "checkpoints" / "best.pt", {"hparams": pii.hparams, "method": pii.state_dict(), "run": {}, "data": {}})
    config = bundle_config("rd4ad3d", "train", dataset="synthetic", teacher="run", teacher_run=str(run), output_dir=str(tmp_path / "rd"))
    m = config.get_parsed_content("method", instantiate=True)
    assert m.hparams["teacher_run"] == str(run) and m.hparams["teacher_method"] == pii.hparams
    assert torch.equal(m.teacher.stages[0].conv.unit0.conv.weight, pii.net.model[0].conv.unit0.conv.weight)


def test_a_run_teacher_that_cannot_teach_is_refused_clearly():
    from volad.methods import IntensityBaseline, SyntheticAnomalyDetector

    with pytest.raises(VoladConfigError, match="needs teacher_run"):
        ReverseDistillation(spatial_dims=3, teacher="run")
    two = SyntheticAnomalyDetector(spatial_dims=3, in_channels=2, channels=(8, 16, 32, 64))
    with pytest.raises(VoladConfigError, match="reads 2 input channel\\(s\\), the distillation 1"):
        ReverseDistillation(spatial_dims=3, teacher="run", teacher_network=two)
    with pytest.raises(VoladConfigError, match="IntensityBaseline has no U-Net or convolutional encoder"):
        ReverseDistillation(spatial_dims=3, teacher="run", teacher_network=IntensityBaseline(spatial_dims=3))
    with pytest.raises(VoladConfigError, match="takes no teacher_run"):
        ReverseDistillation(spatial_dims=3, teacher="random", teacher_run="runs/pii3d")


def test_slice_mode_trains_on_whole_slices_by_default_and_3d_on_48_cubes():
    """The bundle names no patch (``patch_size`` null), so the method's own choice holds: whole slices in 2D (48² patches
    scored worse than chance on an independent set), 48³ patches in 3D."""
    from volad.bundle.config import bundle_config

    assert bundle_config("rd4ad3d", "train").get("patch_size") is None
    assert ReverseDistillation(spatial_dims=2).training_patch_size is None
    assert ReverseDistillation(spatial_dims=3).training_patch_size == 48


def test_an_autoencoder_without_skips_teaches_through_its_encoder_stages():
    from volad.methods import AutoEncoder

    torch.manual_seed(0)
    ae = AutoEncoder(spatial_dims=3, skip_connections=False).eval()
    m = ReverseDistillation(spatial_dims=3, teacher="run", teacher_network=ae).eval()
    stages = list(ae.encoder.stages)
    assert m.teacher.channels == tuple(s[0].conv.out_channels for s in stages[:3])
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(m.teacher(x)[1], stages[1](stages[0](x)))
