"""The wheel a GPU user installs: built here from the checkout, then read back. It carries the
license, the metadata (classifiers, bounded extras, the transformers the code needs), a long
description without relative links, and of the trained fixtures only the demo's model."""

import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import mla_plugin
from mla_plugin.fixtures import PACKAGED_FIXTURES, TRAINED_FIXTURES, trained_fixture
from tests.paths import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("mla_plugin-*.whl")
    return zipfile.ZipFile(path)


def _metadata(wheel: zipfile.ZipFile):
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    return Parser().parsestr(wheel.read(name).decode())


def test_wheel_metadata(wheel):
    meta = _metadata(wheel)
    assert meta["Version"] == mla_plugin.__version__
    assert meta["License-Expression"] == "Apache-2.0"
    assert any(n.endswith("licenses/LICENSE") for n in wheel.namelist())
    assert "Apache License" in (REPO / "LICENSE").read_text() and "Version 2.0, January 2004" in (
        REPO / "LICENSE").read_text()
    classifiers = meta.get_all("Classifier")
    assert "Topic :: Scientific/Engineering :: Artificial Intelligence" in classifiers
    requires = meta.get_all("Requires-Dist")
    assert "transformers>=5" in requires  # rope_parameters: transformers 5 configs
    assert 'vllm<0.34,>=0.32; extra == "vllm"' in requires
    assert 'sglang==0.5.23; extra == "sglang"' in requires
    assert 'datasets; extra == "datasets"' in requires
    assert not any("flashinfer" in r for r in requires), requires  # no code imports it
    assert "gpu" not in meta.get_all("Provides-Extra")


def test_long_description_has_no_relative_links(wheel):
    body = _metadata(wheel).get_payload()
    assert "mla_plugin" in body and "--attention-backend mla_plugin" in body
    links = re.findall(r"\]\(([^)]+)\)", body) + re.findall(r'(?:src|href)="([^"]+)"', body)
    relative = [link for link in links if not re.match(r"https?://", link)]
    assert relative == [], relative


def test_wheel_ships_the_demo_fixture_only(wheel):
    names = wheel.namelist()
    trained = {n.split("/")[3] for n in names if n.startswith("mla_plugin/fixtures/trained/")}
    assert trained == set(PACKAGED_FIXTURES) == {"deepseek-v2-tiny"}
    assert "mla_plugin/fixtures/trained/deepseek-v2-tiny/model.safetensors" in names
    assert "mla_plugin/fixtures/assets/tokenizer.json" in names
    assert not any(n.startswith(("tests/", "scripts/", "benchmarks/", "examples/")) for n in names)
    size = Path(wheel.filename).stat().st_size
    assert size < 15e6, f"wheel is {size / 1e6:.1f} MB"
    entry_points = wheel.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "mla-plugin = mla_plugin.cli:main" in entry_points
    assert "[vllm.general_plugins]" in entry_points and "[sglang.srt.plugins]" in entry_points


def test_test_fixtures_live_under_tests():
    for name in TRAINED_FIXTURES:
        path = trained_fixture(name)
        root = REPO / ("mla_plugin/fixtures/trained" if name in PACKAGED_FIXTURES else "tests/fixtures/trained")
        assert path == root / name and (path / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="unknown fixture"):
        trained_fixture("no-such-fixture")
