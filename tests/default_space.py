"""verify's enumeration of the whole default space, once per runner per test
process: test_verify checks what it finds and test_explore_enum checks that
explore's enumeration phase agrees with it (each run costs 20-60 s)."""

from functools import cache

from twin.search.verify import VerifyResult, verify


@cache
def verified_default(runner: str) -> VerifyResult:
    # Two jobs: the multi-process enumeration (the CLI's default is every core).
    return verify(runner, jobs=2)
