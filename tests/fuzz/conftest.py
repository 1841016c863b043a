"""Hypothesis profiles for the parser fuzz tests: `nlsr-ci` (bounded, derandomized: the same examples each run, no
example database) is the default; NLSR_FUZZ_PROFILE=nlsr-dev explores new random examples."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                                       HealthCheck.filter_too_much]}
settings.register_profile("nlsr-ci", max_examples=100, derandomize=True, database=None, print_blob=True, **_COMMON)
settings.register_profile("nlsr-dev", max_examples=500, **_COMMON)
settings.load_profile(os.environ.get("NLSR_FUZZ_PROFILE", "nlsr-ci"))
