"""Scenario validation, derived quantities, TOML round trip."""

import pytest

from scenarios.loader import catalog, load, parse_toml
from scenarios.spec import ParallelConfig, Runtime, Scenario, ScenarioError, scenario_to_toml


def bad(**kw):
    with pytest.raises(ScenarioError) as exc:
        Scenario().with_(**kw)
    return str(exc.value)


def test_validation_names_field_and_rule():
    assert bad(**{"model.hidden": 0}).startswith("model.hidden: must be > 0")
    assert bad(**{"model.top_k": 9}).startswith("model.top_k: top_k 9 > num_experts 8")
    assert "not divisible by moe_tp=3" in bad(**{"parallel.tp": 3})
    assert bad(**{"parallel.backend": "nccl_magic"}).startswith("parallel.backend: unknown backend")
    # A token-routing backend without EP is ignored (as the engine does), not rejected.
    ignored = Scenario().with_(**{"parallel.backend": "deepep_low_latency", "parallel.dp": 2})
    assert ignored.parallel.backend_ignored and ignored.effective_backend == "allgather_reducescatter"
    assert bad(**{"runtime.profile": "tpu"}).startswith("runtime.profile: unknown profile")
    assert bad(**{"runtime.platform": "metal"}).startswith("runtime.platform")
    assert bad(**{"model.num_experts": -1}).startswith("model.num_experts")
    assert bad(**{"parallel.eplb": True}).startswith("parallel.eplb")
    assert "finite" in bad(**{"model.routed_scaling_factor": float("inf")})
    assert bad(**{"workload.tokens": 10**8}).startswith("workload.tokens: at most")


def test_malformed_toml_and_unknown_field():
    with pytest.raises(ScenarioError, match="not valid TOML"):
        parse_toml("[model\nhidden = 3")
    with pytest.raises(ScenarioError, match=r"model\.hiden: unknown field"):
        parse_toml("[model]\nhiden = 3")
    with pytest.raises(ScenarioError, match=r"model\.hidden: must be int"):
        parse_toml('[model]\nhidden = "big"')


def test_derived_quantities():
    sp = Scenario().with_(**{"parallel.tp": 2, "parallel.dp": 2, "parallel.ep": True,
                             "parallel.backend": "deepep_low_latency"})
    assert sp.sp and sp.moe_ep == 4 and sp.moe_tp == 1 and sp.use_all2all_kernels
    two = sp.with_(**{"parallel.backend": "flashinfer_nvlink_two_sided"})
    assert not two.sp and two.use_fi_two_sided
    one_prev = sp.with_(**{"parallel.backend": "flashinfer_nvlink_one_sided", "parallel.version": "previous"})
    assert not one_prev.sp and sp.with_(**{"parallel.backend": "flashinfer_nvlink_one_sided"}).sp
    tp_only = Scenario().with_(**{"parallel.tp": 4})
    assert tp_only.moe_tp == 4 and not tp_only.sp and tp_only.effective_backend == "none"
    assert sp.with_(**{"workload.tokens": 5}).sp_tokens == 3


def test_catalog_round_trips_through_toml():
    entries = catalog()
    assert len(entries) >= 17
    for e in entries:
        s = load(e.name)
        assert parse_toml(scenario_to_toml(s)) == s


def test_unknown_scenario_lists_catalog():
    with pytest.raises(ScenarioError, match="unknown scenario 'nope'.*r1-sp-deepep"):
        load("nope")


def test_next_layer_fusion_rule():
    base = Scenario(parallel=ParallelConfig(tp=2), runtime=Runtime(allreduce_fusion=True))
    assert base.next_layer_fuses_reduce and base.derived()["next_layer_fuses_reduce"]
    assert "fused-AR-next" in base.summary_line()
    assert not base.with_(**{"runtime.allreduce_fusion": False}).next_layer_fuses_reduce
    assert not base.with_(**{"parallel.tp": 1}).next_layer_fuses_reduce
    assert not base.with_(**{"parallel.dp": 2}).next_layer_fuses_reduce  # DP attention: no fusion
    assert base.with_(**{"workload.tokens": 2048}).next_layer_fuses_reduce
    assert not base.with_(**{"workload.tokens": 2049}).next_layer_fuses_reduce
    # The layer completes the sum itself before a non-linear transform: nothing to defer.
    latent = {"model.latent_dim": 64}
    assert base.with_(**latent).next_layer_fuses_reduce
    assert not base.with_(**latent, **{"model.transform_nonlinear": True}).next_layer_fuses_reduce


def test_scenario_caches_derived_values_but_pickles_as_its_fields():
    """Derived quantities and the hash are cached on the instance; a pickle
    or copy carries the fields only (a hash is salted per process)."""
    import copy
    import pickle
    from dataclasses import fields

    s = load("r3-tp-decode")
    h, width = hash(s), s.kernel_width
    assert "_hash" in vars(s) and "kernel_width" in vars(s)
    names = {f.name for f in fields(s)}
    for other in (pickle.loads(pickle.dumps(s)), copy.copy(s), copy.deepcopy(s)):
        assert set(vars(other)) == names
        assert other == s and hash(other) == h and other.kernel_width == width
    changed = s.with_(**{"parallel.tp": 1})
    assert changed.world == 1 and s.world == 2 and hash(changed) != h
