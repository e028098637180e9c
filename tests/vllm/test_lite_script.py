"""scripts/deepseek_v2_lite_gla.py runs end to end (on the trained fixture, CPU settings)."""

import json
import os
import subprocess
import sys

from mla_plugin.fixtures import trained_fixture
from tests.converters import calibration_text
from tests.paths import REPO, wikitext_file


def test_lite_script_on_the_fixture(tmp_path):
    out = tmp_path / "rows.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts/deepseek_v2_lite_gla.py"), "--model", str(trained_fixture("deepseek-v2-tiny")),
         "--tp", "1", "--cpu", "--mla-backend", "CPU_MLA", "--dtype", "float32", "--window", "128", "--max-windows", "4",
         "--calib-tokens", "2048", "--calib-window", "128", "--calib-text", str(calibration_text()),
         "--text", str(wikitext_file("test.raw.txt")), "--work", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["setting"]: r["ppl"] for r in json.loads(out.read_text())}
    assert len(rows) == 8 and all(1 < p < 4096 for p in rows.values()), rows
    mla = rows["MLA"]
    # this fixture's heads use H (d_nope + d_v) = d_c latent directions: each group's own
    # subspace of d_c / g is exact, so group-pca (converted from bf16 weights) is MLA
    for calibrate in ("none", "logit+output"):
        assert abs(rows[f"grouped, group-pca, calibrate {calibrate}"] / mla - 1) < 1e-3, rows
    assert rows["naive GLA load (grouped, local norm)"] > mla * 1.03, rows
    assert rows["partitioned, hadamard, calibrated logit"] < rows["naive GLA load (grouped, local norm)"], rows
    assert "| MLA |" in proc.stdout
