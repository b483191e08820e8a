import os

import pytest


def pytest_collection_modifyitems(config, items):
    # Slow tests use the real zoo backbones (PyPI downloads + conversions): run them with `-m slow` or RUN_SLOW=1.
    if os.environ.get("RUN_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow or RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
