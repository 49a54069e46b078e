"""tools/run_gpu_kit.sh, the GPU machine's entry point, refuses a missing or damaged kit in one
line before it installs anything (the kit itself: tools/build_gpu_kit.sh, docs/gpu.md)."""

import hashlib
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(kit, tmp_path):
    env = dict(os.environ, KIT=str(kit), SITE=str(tmp_path / "site"))
    return subprocess.run(
        ["bash", f"{ROOT}/tools/run_gpu_kit.sh"], capture_output=True, text=True, env=env,
        timeout=60,
    )  # fmt: skip


def test_no_kit_is_one_line_and_exit_1(tmp_path):
    out = _run(tmp_path / "absent", tmp_path)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip().count("\n") == 0 and "make gpu-kit" in out.stderr


def test_a_damaged_wheel_is_refused_before_installing(tmp_path):
    kit = tmp_path / "kit"
    kit.mkdir()
    wheel = kit / "x-1.0-py3-none-any.whl"
    wheel.write_bytes(b"not really a wheel")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (kit / "SHA256SUMS").write_text(f"{digest}  ./{wheel.name}\n")
    wheel.write_bytes(b"changed on the way")
    out = _run(kit, tmp_path)
    assert out.returncode == 1 and "is damaged" in out.stderr
    assert not (tmp_path / "site").exists()
