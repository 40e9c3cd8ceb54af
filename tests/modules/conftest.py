import pytest

# every module test runs on one intra-op thread (tests/conftest.py: one_thread)
_one_thread = pytest.fixture(autouse=True, scope="module")(lambda one_thread: None)
