"""The dispatch layout is the runner's engine's: vLLM's rules give exactly
the Scenario's derived answers (so nothing changes for vLLM runners); a
runner's `engine_rules` decides what dispatch, combine, the routed tokens
and the expert loads follow, in the simulator and on real ranks."""

import families_sglang as FS
import families_trtllm as FT
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scenarios.dispatch_layout import VLLM_LAYOUT, DispatchLayout
from scenarios.runners import RUNNERS, SGLangRunner, TRTLLMRunner
from scenarios.sglang import SGLANG_RULES
from scenarios.strategies import hybrid_scenarios, moe_scenarios
from scenarios.trtllm import TRTLLM_RULES
from scenarios.workload import expert_loads, rank_token_ids
from sim import simulate

VLLM_RULES = RUNNERS["fixed"].engine_rules


@settings(max_examples=150)
@given(st.one_of(moe_scenarios(platforms=("cpu", "cuda", "rocm")), hybrid_scenarios()))
def test_vllm_rules_are_the_scenarios_answers(s):
    for dl in (VLLM_RULES, VLLM_LAYOUT):
        assert dl.all2all_kernels(s) == s.use_all2all_kernels
        assert dl.dispatch_backend(s) == s.effective_backend
        assert dl.slices_tokens(s) == s.sp
        assert dl.max_rows(s) == s.sp_tokens
        assert all(dl.layer_rows(s, d) == s.layer_rows(d) for d in range(s.parallel.dp))
        for r in range(s.world):
            assert dl.dispatch_group(s, r) == s.dispatch_group(r)
            assert dl.rank_rows(s, r) == s.rank_rows(r)
            assert rank_token_ids(s, r, dl) == rank_token_ids(s, r)
        assert expert_loads(s, dl) == expert_loads(s)


def test_each_runner_names_its_engines_layout():
    assert isinstance(VLLM_RULES, DispatchLayout)
    assert SGLangRunner.engine_rules is SGLANG_RULES and TRTLLMRunner.engine_rules is TRTLLM_RULES


@pytest.mark.parametrize("s, rows", [(FS.QWEN3_DEEPEP_TP4, [0, 1, 2, 3, 4, 5, 6, -1]), (FS.DS_DEEPEP_TP2, [0, 1, 2, 3, 4, -1])])
def test_sglang_slices_are_what_each_rank_dispatches(s, rows):
    """Under SGLang's layout each rank routes its own slice (the tokens the
    dispatch's received rows and the expert loads are counted from)."""
    tp = s.parallel.tp
    assert sum((rank_token_ids(s, r, SGLANG_RULES) for r in range(tp)), []) == rows
    assert rank_token_ids(s, 0) == list(range(s.dp_tokens(0)))  # vLLM's: no slicing at dp = 1
    # Each token-expert pair is computed once over the ranks (sliced: no tp copies).
    assert sum(p for p, _a in expert_loads(s, SGLANG_RULES)) == s.dp_tokens(0) * s.model.top_k


def test_a_runner_class_without_rules_gets_vllms_layout():
    """The interpreters ask the runner class; a subclass of the base keeps
    vLLM's rules, so the DeepEP-without-DP-attention scenario has no dispatch
    for it (backend none, as before)."""
    trace = simulate(FS.DS_DEEPEP_TP2.with_(runner="fixed"), "fixed")
    assert "dispatch" not in [st.name for st in trace.steps[0]] and not trace.hazards


def test_trtllm_fallback_loads_count_every_gathered_token():
    s = FT.DS_ADP_DEEPEP_FALLBACK
    pairs = sum(p for p, _a in expert_loads(s, TRTLLM_RULES))
    assert pairs == s.total_tokens * s.model.top_k


def test_the_trace_notes_where_the_engines_layout_is_not_vllms():
    """The scenario's derived quantities are vLLM's; a run under another
    engine's layout says so in one note, a vLLM run never."""
    notes = simulate(FS.DS_DEEPEP_TP2, "sglang").notes
    assert any("(sglang's rules): all-to-all kernels on, backend deepep_high_throughput, tokens sliced" in n
               for n in notes)
    fallback = simulate(FT.DS_ADP_DEEPEP_FALLBACK, "trtllm").notes
    assert any("backend allgather_reducescatter" in n for n in fallback)
    assert not any("dispatch layout" in n for n in simulate(FT.DS_ADP_DEEPEP, "trtllm").notes)  # same as vLLM's
    assert not any("dispatch layout" in n for n in simulate(FS.DS_DEEPEP_TP2.with_(runner="fixed"), "fixed").notes)
