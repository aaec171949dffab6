"""The README's "Testing your own runner" example, run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _example() -> tuple[str, dict]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    block = next(b for b in blocks if "@given(moe_scenarios" in b)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    return block, namespace


def test_readme_example_fails_on_its_bug():
    _block, ns = _example()
    with pytest.raises(AssertionError, match="DOUBLE_REDUCTION"):
        ns["test_my_runner"]()


def test_readme_example_finds_its_bug_in_100_of_100_seeded_runs():
    from twin.search.detection import detects

    block, ns = _example()
    strategy = eval(re.search(r"@given\((.*)\)\n", block).group(1), ns)  # noqa: S307 - our own README
    missed = [seed for seed in range(100) if not detects(ns["MyRunner"], seed, strategy)]
    assert not missed, f"missed with seeds {missed}"


def test_readme_verify_example_lists_the_finding():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    block = next(b for b in blocks if "assert_verified(" in b)
    _b, ns = _example()
    exec(compile(block, str(README), "exec"), ns)  # noqa: S102 - our own README
    from scenarios.space import restrict, space_axes

    # The README's call on the default space takes ~20 s; the same helper on a
    # slice of it that still holds the bug (tp = dp = 2 with EP) is checked here.
    small = restrict(space_axes("default"), tp=(2,), dp=(2,), ep=(True,), platform=("cpu",),
                     backend=("allgather_reducescatter", "deepep_low_latency"))
    with pytest.raises(AssertionError, match="DOUBLE_REDUCTION@shared_all_reduce"):
        ns["assert_verified"](ns["MyRunner"], space=small)
