"""The runner's engine layout reaches what the dispatch layout left as
vLLM's: `show`/`simulate`'s derived values (the `engine_layout` JSON key
beside `derived`), the routed rows' width (rounded only where the engine
itself rounds for a backend whose kernels it runs) and the dispatch
capacity check (the engine's rows per rank). vLLM runners see no change."""

import json
import pickle

import families_sglang as FS
import families_trtllm as FT
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cli
from scenarios.dispatch_layout import VLLM_LAYOUT, EngineScenario, engine_scenario
from scenarios.runners import RUNNERS
from scenarios.sglang import SGLANG_RULES
from scenarios.spec import ScenarioError
from scenarios.strategies import hybrid_scenarios, moe_scenarios
from scenarios.trtllm import TRTLLM_RULES
from sim import simulate

VLLM_RULES = RUNNERS["fixed"].engine_rules

# The motivating SGLang deployment in miniature: TP 4, DeepEP, no DP attention
# (vLLM runs no all-to-all here; SGLang dispatches each rank's slice).
SG_TP4_DEEPEP = FS._s("sg-tp4-deepep", {"hidden": 100}, {"tp": 4, "ep": True, "backend": "deepep_high_throughput"},
                      tokens=8)
# Under DP attention both engines run DeepEP LL; only vLLM rounds 128 up to 2048.
SG_DPATTN_LL = FS.DS_DPATTN_DEEPEP
# TensorRT-LLM's all-gather fallback where vLLM would round 100 up (DeepEP's 512 bytes).
TRT_FALLBACK_ODD = FT.DS_ADP_DEEPEP_FALLBACK.with_(**{"model.hidden": 100})


def _cli(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _toml(tmp_path, s):
    from scenarios.spec import scenario_to_toml

    f = tmp_path / f"{s.name}.toml"
    f.write_text(scenario_to_toml(s))
    return str(f)


# ---- the width: rounded only where the engine rounds for the backend it runs ----


@settings(max_examples=150)
@given(st.one_of(moe_scenarios(platforms=("cpu", "cuda", "rocm")), hybrid_scenarios()))
def test_vllm_layout_width_is_the_scenarios(s):
    for dl in (VLLM_RULES, VLLM_LAYOUT):
        assert engine_scenario(s, dl) is s
        assert dl.backend_width(s) == s.backend_width and dl.kernel_width(s) == s.kernel_width
        assert dl.library_width_note(s) is None
        summary = dl.summary(s)
        derived = s.derived()
        assert all(summary[k] == derived[k] for k in summary if k in derived)


@settings(max_examples=100)
@given(st.one_of(moe_scenarios(platforms=("cpu", "cuda")), hybrid_scenarios()))
def test_sglang_and_trtllm_hand_the_backend_the_models_width(s):
    for dl in (SGLANG_RULES, TRTLLM_RULES):
        assert dl.backend_width(s) is None and dl.kernel_width(s) == s.model.kernel_width
        try:
            view = engine_scenario(s, dl)
        except ScenarioError:
            continue  # the engine's capacity check (its rows), tested below
        assert isinstance(view, EngineScenario) and isinstance(view, type(s))
        assert view.kernel_width == s.model.kernel_width and view.padded == s.model.padded
        assert view.to_dict() == s.to_dict() and view != s
        again = pickle.loads(pickle.dumps(view))  # the real ranks' payload
        assert type(again).__name__ == type(view).__name__ and again.to_dict() == s.to_dict()
        assert again.kernel_width == view.kernel_width
        assert engine_scenario(view, dl) is view and engine_scenario(view, VLLM_RULES) is view


def test_values_change_where_vllm_rounds_and_the_engine_does_not():
    assert SG_DPATTN_LL.kernel_width == 2048 and SG_DPATTN_LL.padded  # vLLM's rounding of DeepEP LL
    assert SGLANG_RULES.kernel_width(SG_DPATTN_LL) == 128
    assert TRT_FALLBACK_ODD.kernel_width == 256  # vLLM would run DeepEP HT here and round
    assert not TRTLLM_RULES.all2all_kernels(TRT_FALLBACK_ODD) and TRTLLM_RULES.kernel_width(TRT_FALLBACK_ODD) == 100
    assert SG_TP4_DEEPEP.kernel_width == 100 and SGLANG_RULES.all2all_kernels(SG_TP4_DEEPEP)
    note = SGLANG_RULES.library_width_note(SG_TP4_DEEPEP)
    assert note is not None and "100 unrounded" in note and "256" in note
    assert TRTLLM_RULES.library_width_note(TRT_FALLBACK_ODD) is None  # no all-to-all kernels run


@pytest.mark.parametrize("s,runner", [(SG_DPATTN_LL, "sglang"), (TRT_FALLBACK_ODD, "trtllm")], ids=["sglang", "trtllm"])
def test_sim_routed_kernel_works_in_the_engines_width(s, runner):
    trace = simulate(s, runner)
    for r, steps in trace.steps.items():
        names = [st.name for st in steps]
        assert "pad_routed_input" not in names, (r, names)
        experts = [st for st in steps if st.name == "routed_experts"]
        assert experts and all(st.out_shape[-1] == s.model.hidden for st in experts)
    assert not trace.hazards, [str(h) for h in trace.hazards]
    padded = simulate(s, "fixed") if runner == "trtllm" else None  # vLLM's program on the same scenario pads
    if padded is not None:
        assert any(st.name == "pad_routed_input" for st in padded.steps[0])


def test_sim_notes_a_width_the_library_would_refuse():
    trace = simulate(SG_TP4_DEEPEP, "sglang")
    assert any("unrounded" in n for n in trace.notes), trace.notes
    assert not any("unrounded" in n for n in simulate(SG_TP4_DEEPEP, "fixed").notes)


@pytest.mark.slow
@pytest.mark.parametrize("s,runner", [(SG_DPATTN_LL, "sglang"), (TRT_FALLBACK_ODD, "trtllm")], ids=["sglang", "trtllm"])
def test_real_runs_in_the_engines_width(s, runner):
    from twin.check.crosscheck import check

    res = check(s, runner, timeout_s=120)
    assert all(c.correct for c in res.real.output_checks.values()), [c.to_dict() for c in res.real.output_checks.values()]
    assert res.agree and not res.verdicts, res.to_dict()
    for steps in res.real.steps.values():
        assert "pad_routed_input" not in [st.name for st in steps]


# ---- the dispatch capacity: the engine's rows per rank ----


def test_capacity_check_uses_the_engines_rows():
    tight = SG_TP4_DEEPEP.with_(**{"parallel.max_dispatch_tokens": 1})  # vLLM: no dispatch, no check
    assert simulate(tight, "fixed").latency_us > 0
    with pytest.raises(ScenarioError, match="2 rows per rank under sglang's layout.*capacity 1") as err:
        simulate(tight, "sglang")
    assert err.value.field_name == "parallel.max_dispatch_tokens"
    fits = SG_TP4_DEEPEP.with_(**{"parallel.max_dispatch_tokens": 2})  # 8 tokens over tp 4: slices of 2
    assert not simulate(fits, "sglang").hazards


def test_cli_refuses_over_the_engines_capacity_in_one_line(tmp_path, capsys):
    f = _toml(tmp_path, SG_TP4_DEEPEP.with_(**{"parallel.max_dispatch_tokens": 1}))
    code, _out, err = _cli(capsys, "simulate", f, "--runner", "sglang")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "parallel.max_dispatch_tokens" in err
    assert _cli(capsys, "simulate", f, "--runner", "fixed")[0] == 0


# ---- show / simulate: the engine's values beside vLLM's derived ----


def test_show_json_adds_engine_layout_only_for_another_engine(tmp_path, capsys):
    f = _toml(tmp_path, SG_TP4_DEEPEP)
    code, plain, _ = _cli(capsys, "show", f, "--json")
    assert code == 0 and "engine_layout" not in json.loads(plain)
    code, vllm, _ = _cli(capsys, "show", f, "--json", "--runner", "fixed")
    assert code == 0 and vllm == plain
    code, out, _ = _cli(capsys, "show", f, "--json", "--runner", "sglang")
    doc = json.loads(out)
    assert code == 0 and doc["derived"] == json.loads(plain)["derived"]  # vLLM's, keys unchanged
    eng = doc["engine_layout"]
    assert eng["engine"] == "sglang" and eng["use_all2all_kernels"] and eng["sp"]
    assert eng["effective_backend"] == "deepep_high_throughput" and eng["rows_per_rank"] == 2
    assert eng["kernel_width"] == 100 and eng["backend_kernel_width"] is None and not eng["backend_rounds_hidden"]
    assert not doc["derived"]["use_all2all_kernels"] and doc["derived"]["rows_per_rank"] == 8


def test_show_text_prints_the_engines_values(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one line per row
    f = _toml(tmp_path, SG_TP4_DEEPEP)
    code, out, _ = _cli(capsys, "show", f, "--runner", "sglang")
    assert code == 0 and "effective_backend=deepep_high_throughput" in out and "rows_per_rank=2," in out
    assert "follow sglang's layout" in out and "effective_backend=none" in out  # vLLM's, named as such
    code, out, _ = _cli(capsys, "show", f)
    assert code == 0 and "effective_backend=none" in out and "layout" not in out.split("name =")[0]


def test_simulate_json_and_text_carry_the_engine_layout(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    f = _toml(tmp_path, TRT_FALLBACK_ODD)
    code, out, _ = _cli(capsys, "simulate", f, "--json", "--runner", "trtllm")
    doc = json.loads(out)
    assert code == 0 and doc["engine_layout"]["effective_backend"] == "allgather_reducescatter"
    assert doc["engine_layout"]["kernel_width"] == 100 and doc["derived"]["kernel_width"] == 256
    code, out, _ = _cli(capsys, "simulate", f, "--json", "--runner", "fixed")
    assert code == 0 and "engine_layout" not in json.loads(out)
    code, out, _ = _cli(capsys, "simulate", f, "--runner", "trtllm")
    assert code == 0 and "kernel_width=100," in out and "follow trtllm's layout" in out


def test_a_recording_scenario_keeps_logging_through_the_engine_view():
    """verify logs what a run reads: the engine's view must not drop the
    scenario-level reads (it is a subclass of the scenario's own class)."""
    from twin.search.verify_record import reads, recording

    with reads() as log:
        simulate(recording(SG_TP4_DEEPEP), "sglang", what_if=False)
    top = {path for path in log.consulted() if "." not in path}
    assert {"kernel_width", "padded"} & top and "group" in top, sorted(top)


def test_a_width_above_the_compiled_sizes_is_noted_not_refused():
    wide = FS._s("sg-tp2-ll-wide", {"hidden": 10240}, {"tp": 2, "ep": True, "backend": "deepep_low_latency"})
    assert not wide.use_all2all_kernels  # vLLM runs no DeepEP here: valid as written
    note = SGLANG_RULES.library_width_note(wide)
    assert note is not None and "largest compiled size" in note
    assert engine_scenario(wide, SGLANG_RULES).kernel_width == 10240


def test_an_engine_that_only_keeps_the_width_is_not_vllms():
    from scenarios.dispatch_layout import DispatchLayout, keeps_vllm_rules

    class Unrounded(DispatchLayout):
        def rounds_hidden(self, s):
            return False

    assert keeps_vllm_rules(VLLM_LAYOUT) and not keeps_vllm_rules(Unrounded())
    assert engine_scenario(SG_DPATTN_LL, Unrounded()).kernel_width == 128
