import os

from hypothesis import HealthCheck, settings

from moe_twin_kernels import set_triton_mode

# Before any test imports flashinfer (which imports triton): see set_triton_mode.
set_triton_mode()

# No test process calibrates the cpu profile on its first real run (~20 s
# each); tests of the auto-calibration clear this themselves. Inherited by
# the CLI subprocesses the tests start.
os.environ["MOE_TWIN_NO_AUTOCALIBRATE"] = "1"

settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")
