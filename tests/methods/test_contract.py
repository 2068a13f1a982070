"""Every method, as its bundle builds it, keeps the method contract in 2D and 3D.

The methods come from the registry (every concrete :class:`AnomalyMethod`
subclass) and the bundles from ``bundles/*/train.json``; a method no bundle
builds fails the test. Each bundle is built with the tiny-test overrides of its
own ``test_overrides.json``.
"""

from __future__ import annotations

import io
import json
import warnings

import pytest
import torch

import volad.methods  # noqa: F401  (imports every method module, so the registry is complete)
from volad.bundle.config import bundle_config, bundle_dir, combines_runs, discover_bundles
from volad.methods.base import AnomalyMethod
from volad.methods.baselines import BASELINES  # built by baseline3d
from volad.methods.diffusion.base import DiffusionMethod
from volad.methods.registry import method_classes
from volad.types import AnomalyOutput, Batch
from volad.utils.cli_format import cli_value


def _concrete_methods() -> set[type]:
    """Every method a bundle builds from its own settings; a fusion is built from trained runs
    (``bundles/fusion3d``) and keeps the contract in ``tests/methods/test_fusion.py``."""
    from volad.methods.fusion import Fusion

    return set(method_classes().values()) - {Fusion}


def _builds() -> list[tuple[str, int, dict]]:
    out = []
    for name in discover_bundles():
        if combines_runs(name):
            continue
        spec = json.loads((bundle_dir() / name / "test_overrides.json").read_text())
        for dims in (3, 2):
            extra = {k: cli_value(v) for k, v in spec[f"{dims}d"].items()}
            if name == "baseline3d":
                out += [(b, dims, {k: v for k, v in extra.items() if k != "baseline"}) for b in BASELINES]
            else:
                out.append((name, dims, extra))
    return out


def _build(name: str, dims: int, extra: dict) -> AnomalyMethod:
    torch.manual_seed(0)
    return bundle_config(name, "train", dataset="synthetic", spatial_dims=dims, **extra).get_parsed_content("method", instantiate=True)


def test_every_method_is_built_by_a_bundle():
    built = {type(_build(n, d, e)) for n, d, e in _builds() if d == 3}
    assert _concrete_methods() <= built, f"methods no bundle builds: {sorted(c.__name__ for c in _concrete_methods() - built)}"


@pytest.mark.parametrize("name,dims,extra", _builds(), ids=[f"{n}-{d}d" for n, d, _ in _builds()])
def test_method_contract(name, dims, extra):
    m = _build(name, dims, extra)
    size = m.required_patch_size or 16
    g = torch.Generator().manual_seed(0)
    shape = (2, m.in_channels, *([size] * dims))
    batch = Batch(image=torch.rand(shape, generator=g), mask=torch.ones((2, 1, *shape[2:])))
    # One optimisation step per stage (a statistics pass for models that accumulate instead of learning).
    for stage in m.stages:
        m.train()
        losses = m.optimization_step(batch, stage, m.configure_optimizers(stage))
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), (stage, losses)
    m.eval()
    with torch.no_grad():
        out = m.predict(batch.image, batch.mask)
        again = m.predict(batch.image, batch.mask)
    assert isinstance(out, AnomalyOutput)
    assert out.anomaly_map.shape == (2, 1, *shape[2:]) and torch.isfinite(out.anomaly_map).all()
    assert out.reconstruction is None or out.reconstruction.shape == shape
    deterministic = torch.equal(out.anomaly_map, again.anomaly_map)
    # hparams: plain data naming the class, from which a run folder rebuilds the method.
    assert m.hparams["kind"] == type(m).__name__ and json.loads(json.dumps(m.hparams)) == m.hparams
    # State-dict round trip into the method rebuilt from its hparams, as inference.json does from a checkpoint.
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = type(m).rebuild(m.hparams)
    assert type(m2) is type(m) and m2.hparams == m.hparams and m2.stages == m.stages
    m2.load_state_dict(torch.load(buf, weights_only=True))
    m2.eval()
    with torch.no_grad():
        out2 = m2.predict(batch.image, batch.mask)
    if deterministic:
        assert torch.allclose(out2.anomaly_map, out.anomaly_map, atol=1e-6)
    # A traced forward (the bundle's ckpt_export path) gives the map. Diffusion methods draw their noise from a
    # seeded generator that a trace does not replay, so for them only the traced map's shape is checked.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(m, batch.image, check_trace=False)
        exported = traced(batch.image)
    assert exported.shape == out.anomaly_map.shape
    if deterministic and not isinstance(m, DiffusionMethod):
        assert torch.allclose(exported, m(batch.image), atol=1e-5)
