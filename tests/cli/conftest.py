from tests.train.conftest import _one_thread, tiny_run  # noqa: F401  (shared fixtures)
