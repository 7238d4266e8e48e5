"""Hypothesis profiles: `ci` (derandomized, bounded; selected by CI=true) and `dev`; the
repository root as a fixture."""
import os

import pytest
from hypothesis import HealthCheck, settings

from tests import REPO

settings.register_profile("ci", derandomize=True, max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("dev", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") == "true" else "dev"))


@pytest.fixture(scope="session")
def repo_root():
    """The checkout's root: the folder of pyproject.toml, README.md and docs/."""
    return REPO
