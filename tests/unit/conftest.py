"""tests/unit starts no Ray: a test here that leaves Ray initialized in this process fails (and Ray is shut down, so
the tests after it are not slowed or confused by it). Such a test belongs in tests/e2e, marked `ray`."""

import sys

import pytest


def ray_initialized() -> bool:
    ray = sys.modules.get("ray")  # never imported here: a test that did not import Ray cannot have started it
    return ray is not None and ray.is_initialized()


@pytest.fixture(autouse=True)
def no_ray_in_unit_tests(request):
    already = ray_initialized()  # e.g. `pytest tests/e2e tests/unit`: the session's cluster from an e2e test
    yield
    if not already and ray_initialized():
        sys.modules["ray"].shutdown()
        pytest.fail(f"{request.node.nodeid} started Ray, but tests/unit starts no Ray: move it to tests/e2e and "
                    "mark it `ray` (pytestmark = pytest.mark.ray)", pytrace=False)
