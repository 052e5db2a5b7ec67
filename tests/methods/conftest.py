from tests.train.conftest import tiny_run  # noqa: F401  (shared fixture)
