"""conftest.missing: a missing prerequisite skips a test, saying what and how to provide it, except
under MEGATRON_RMT_REQUIRE_ALL=1 (`make test`, CI), where it fails; a GPU is never required."""

import pytest
from conftest import REQUIRE_ALL, missing, require_module


def test_missing_skips_by_default_and_says_so(monkeypatch):
    monkeypatch.delenv(REQUIRE_ALL, raising=False)
    with pytest.raises(pytest.skip.Exception, match="vLLM is missing: build .venv-vllm; with"):
        missing("vLLM", "build .venv-vllm")


def test_missing_fails_when_everything_is_required(monkeypatch):
    monkeypatch.setenv(REQUIRE_ALL, "1")
    with pytest.raises(pytest.fail.Exception, match="the asset X is missing .* check out shared"):
        missing("the asset X", "check out shared")


def test_a_gpu_is_never_required(monkeypatch):
    monkeypatch.setenv(REQUIRE_ALL, "1")
    with pytest.raises(pytest.skip.Exception, match="a CUDA GPU is missing"):
        missing("a CUDA GPU", "run on a GPU machine", ci_has_it=False)


def test_require_module_imports_or_routes_to_missing(monkeypatch):
    assert require_module("json", "stdlib").dumps(1) == "1"
    monkeypatch.setenv(REQUIRE_ALL, "1")
    with pytest.raises(pytest.fail.Exception, match="the Python module no_such_mod_xyz is missing"):
        require_module("no_such_mod_xyz", "pip install it")
