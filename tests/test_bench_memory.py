"""benchmarks/bench_memory.py runs each checkout's child in that checkout: the paths it is given are this
directory's."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import bench_memory as bm  # noqa: E402


def test_a_relative_bundle_is_the_one_named_here(tmp_path, monkeypatch):
    seen = {}

    def fake_run(args, **kw):
        seen["bundle"], seen["cwd"], seen["path"] = args[3], kw["cwd"], kw["env"].get("PYTHONPATH")
        out = {"VmHWM": 1, "VmRSS": 1, "RssAnon": 1, "load_s": 0, "source": str(Path(kw["cwd"]) / "edgemtp" / "x")}
        return subprocess.CompletedProcess(args, 0, json.dumps(out), "")

    monkeypatch.setattr(bm.subprocess, "run", fake_run)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # not this checkout: the child's must be replaced
    (tmp_path / "b.bundle").mkdir()
    monkeypatch.chdir(tmp_path)
    bm.run(bm.ROOT, Path("b.bundle"), 2, "none")
    assert Path(seen["bundle"]) == tmp_path / "b.bundle" and Path(seen["bundle"]).is_absolute()
    # the child runs in the checkout and imports its edgemtp (the fake's "source" cannot tell another one)
    assert Path(seen["cwd"]) == Path(seen["path"]) == bm.ROOT.resolve()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_childs_status_reading_closes_its_file():
    """The child read /proc/self/status through an open() never closed: a ResourceWarning in each run."""
    code = bm.STATUS + "import json; print(json.dumps(status_mb()))"
    r = subprocess.run([sys.executable, "-W", "always::ResourceWarning", "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "ResourceWarning" not in r.stderr, r.stderr
    assert set(json.loads(r.stdout)) == {"VmHWM", "VmRSS", "RssAnon"}
