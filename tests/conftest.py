import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

#: Test files that run whole models through llama.cpp's tools or Ray (minutes in all).
#: They are marked ``slow``; ``scripts/test.sh -m "not slow"`` is the fast local subset.
SLOW_FILES = {
    "test_archs.py",
    "test_eval_cmd.py",
    "test_farm.py",
    "test_farm_ray.py",
    "test_farm_ray_cluster.py",
    "test_imatrix_cmd.py",
    "test_quality_archs.py",
    "test_routing.py",
    "test_split.py",
    "test_vs_llama_quantize_iq.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
