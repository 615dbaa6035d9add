import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub from tests

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("IRPT_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data; the test is skipped with a reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real test data not found at {path} (expected ../shared/data beside the repo)")
    return path


@pytest.fixture(scope="session")
def real_sources_yaml(tmp_path_factory) -> Path:
    sirst = shared_path("sirst")
    roadscene = shared_path("roadscene")
    msrs = shared_path("msrs20")
    path = tmp_path_factory.mktemp("sources") / "sources.yaml"
    path.write_text(f"""
sources:
  - name: sirst
    root: {sirst / 'images'}
    glob: "*.png"
    boxes: {{format: voc, path: {sirst / 'masks'}}}
    masks: {{path: {sirst / 'masks'}, suffix: _pixels0.png}}
  - name: roadscene
    root: {roadscene / 'cropinfrared'}
  - name: msrs
    root: {msrs / 'ir'}
    boxes: {{format: yolo, path: {msrs / 'labels_ir'}, classes: [person, bicycle, car]}}
""")
    return path


@pytest.fixture(scope="session")
def real_build(real_sources_yaml, tmp_path_factory):
    """All three real sets built once (2 workers, shards of 200 samples)."""
    from data_tools.build import build_shards
    from data_tools.cli import DEFAULT_BUILD_CONFIG
    from data_tools.config import load_config
    from data_tools.sources import load_sources

    out = tmp_path_factory.mktemp("real_shards")
    cfg = load_config(DEFAULT_BUILD_CONFIG, ["shards.max_samples=200"])
    manifest = build_shards(load_sources(real_sources_yaml), cfg, out, workers=2, progress=False)
    return out, manifest
