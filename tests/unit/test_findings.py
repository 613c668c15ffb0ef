"""Findings carry one machine-readable code per failed check (``Finding.codes``, keys of ``FINDING_CODES``), and the
command line's summary table has a short text for every code ``circuit_finding`` can emit.

Oracles: the codes ``circuit_finding`` can emit are read from its source (every ``fail("<code>", ...)`` call, with
``ast``) and collected by driving every check to fail; the expected short texts are written out by hand.
"""
from __future__ import annotations

import ast
import inspect
import textwrap

import pytest

from circuit_discovery.cli import SHORT_REASONS, _short_reasons
from circuit_discovery.pipeline.report_stage import FINDING_CODES, Finding, circuit_finding

OK = {"held_out_faithfulness": 0.9, "held_out_ci": [0.75, 1.0], "random_baseline_p": 0.005, "node_share": 0.05,
      "validated": True, "degenerate": False}
MEETS = {"meets_bar": True, "layers_below_bar": []}
BELOW = {"meets_bar": False, "layers_below_bar": [0, 1, 2, 5], "advice": "retrain"}


def _source_codes() -> set[str]:
    """The codes of every ``fail(code, reason)`` call in :func:`circuit_finding`'s source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(circuit_finding)))
    codes = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "fail":
            first = node.args[0]
            assert isinstance(first, ast.Constant) and isinstance(first.value, str), ast.dump(node)
            codes.add(first.value)
    return codes


#: (metrics, kind, the codes expected): one case per check of circuit_finding, and some combinations
CASES = [
    (None, "component", ("no_validation",)),
    ({**OK, "degenerate": True}, "component", ("degenerate",)),
    ({**OK, "held_out_faithfulness": None}, "component", ("held_out_faithfulness",)),
    ({**OK, "held_out_faithfulness": 0.5}, "component", ("held_out_faithfulness",)),
    ({**OK, "held_out_ci": [0.4, 1.0]}, "component", ("held_out_faithfulness",)),
    ({**OK, "random_baseline_p": 0.03}, "component", ("random_baseline",)),
    ({**OK, "random_baseline_p": None}, "component", ("random_baseline",)),
    ({**OK, "node_share": 0.2}, "component", ("circuit_size",)),
    ({**OK, "validated": False}, "component", ("not_validated",)),
    (OK, "feature", ("dictionary_quality_unknown",)),
    ({**OK, "dictionary_quality": BELOW}, "feature", ("dictionary_quality",)),
    ({**OK, "held_out_faithfulness": 0.5, "random_baseline_p": 0.5, "node_share": 0.3, "dictionary_quality": BELOW},
     "feature", ("held_out_faithfulness", "random_baseline", "circuit_size", "dictionary_quality")),
    (None, "feature", ("no_validation", "dictionary_quality_unknown")),
]


def test_every_code_circuit_finding_can_emit_is_registered_and_has_a_cli_short_text():
    emitted = _source_codes()
    assert emitted, "circuit_finding records its failed checks with fail(code, reason)"
    assert emitted <= set(FINDING_CODES), f"codes missing from FINDING_CODES: {emitted - set(FINDING_CODES)}"
    assert set(FINDING_CODES) <= emitted, f"codes circuit_finding never emits: {set(FINDING_CODES) - emitted}"
    missing = set(FINDING_CODES) - set(SHORT_REASONS)
    assert not missing, f"codes without a short text in cli.SHORT_REASONS: {missing}"
    assert set(SHORT_REASONS) <= set(FINDING_CODES), "cli.SHORT_REASONS has codes circuit_finding does not emit"


def test_the_cases_fail_every_check():
    assert {c for _, _, codes in CASES for c in codes} == set(FINDING_CODES)


@pytest.mark.parametrize(("metrics", "kind", "codes"), CASES)
def test_circuit_finding_sets_one_code_per_reason(metrics, kind, codes):
    fnd = circuit_finding(metrics, kind)
    assert not fnd.finding
    assert fnd.codes == codes
    assert len(fnd.reasons) == len(fnd.codes) and all(fnd.reasons)


def test_a_finding_has_no_codes():
    fnd = circuit_finding(OK)
    assert fnd.finding and fnd.codes == () and fnd.reasons == ()
    assert circuit_finding({**OK, "dictionary_quality": MEETS}, "feature") == Finding(True)


def test_finding_rejects_codes_that_do_not_match_its_reasons():
    with pytest.raises(ValueError, match="one code per reason"):
        Finding(False, ("a reason",))
    with pytest.raises(ValueError, match="unknown finding code"):
        Finding(False, ("a reason",), None, ("no_such_check",))


@pytest.mark.parametrize(("metrics", "kind", "short"), [
    (None, "component", ["not validated"]),
    ({**OK, "degenerate": True}, "component", ["degenerate"]),
    ({**OK, "held_out_faithfulness": None}, "component", ["held-out f"]),
    ({**OK, "held_out_ci": [0.4, 1.0], "random_baseline_p": 0.02}, "component", ["held-out f", "random p"]),
    ({**OK, "node_share": 0.2}, "component", ["size"]),
    ({**OK, "validated": False}, "component", ["not validated"]),
    (OK, "feature", ["dictionaries"]),
    ({**OK, "random_baseline_p": 0.3, "node_share": 0.3, "dictionary_quality": BELOW}, "feature",
     ["random p", "size", "dictionaries"]),
    (None, "feature", ["not validated", "dictionaries"]),
])
def test_cli_short_reasons_come_from_the_codes(metrics, kind, short):
    assert _short_reasons(circuit_finding(metrics, kind).codes) == short


def test_cli_short_reasons_say_each_text_once():
    assert _short_reasons(("dictionary_quality_unknown", "dictionary_quality")) == ["dictionaries"]
    assert _short_reasons(()) == ["not validated"]
