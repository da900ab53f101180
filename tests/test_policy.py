"""The operator's delta policy: what a request may change about an enforced filter and an optional delta."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cmc_edge.errors import InputError, PolicyError
from cmc_edge.runtime.policy import DeltaPolicy, build_policies, resolve_alphas

FILTER = DeltaPolicy("filter", alpha=1.5, mode="enforced", min_alpha=1.0)
JSON = DeltaPolicy("json", alpha=1.0, mode="optional")
BOTH = (FILTER, JSON)


@pytest.mark.parametrize("request_kw, alphas", [
    ({}, [1.5, 1.0]),                                           # nothing asked: the operator's alphas
    ({"by_name": {"json": 0.0}}, [1.5, 0.0]),                   # an optional delta switched off by name
    ({"by_name": {"filter": 1.0}}, [1.0, 1.0]),                 # the filter down to its floor, not below
    ({"by_name": {"filter": 3.0, "json": 0.5}}, [3.0, 0.5]),    # raising the filter is fine
    ({"alphas": [2.0, 0.0]}, [2.0, 0.0]),                       # the positional form
    ({"alpha": 1.2}, [1.2, 1.2]),                               # the one-for-all form
])
def test_allowed_requests(request_kw, alphas):
    assert resolve_alphas(BOTH, **request_kw) == alphas


@pytest.mark.parametrize("request_kw, why", [
    ({"by_name": {"filter": 0.0}}, "switch it off"),
    ({"by_name": {"filter": -1.5}}, "invert it"),
    ({"by_name": {"filter": 0.99}}, "below the operator's floor"),
    ({"alphas": [0.0, 1.0]}, "switch it off"),                  # the old forms obey the same policy
    ({"alpha": 0.0}, "switch it off"),
    ({"alpha": -1.0}, "invert it"),
    ({"by_name": {"json": -2.0}}, "'json' cannot be inverted"),  # an inverted copy of the filter would cancel it
    ({"alphas": [1.5, -0.5]}, "'json' cannot be inverted"),
])
def test_enforced_filter_cannot_be_lowered(request_kw, why):
    with pytest.raises(PolicyError, match=why) as e:
        resolve_alphas(BOTH, **request_kw)
    assert "'filter'" in str(e.value) and "enforce" in str(e.value)


def test_an_optional_delta_may_be_inverted_only_where_nothing_is_enforced():
    assert resolve_alphas((JSON,), by_name={"json": -2.0}) == [-2.0]
    assert resolve_alphas(BOTH, by_name={"json": -0.0}) == [1.5, 0.0]        # -0: switched off, not inverted
    anti = DeltaPolicy("anti", alpha=-1.0, mode="optional")                  # the operator's sign is what counts
    assert resolve_alphas((FILTER, anti), by_name={"anti": -3.0}) == [1.5, -3.0]
    with pytest.raises(PolicyError, match="'anti' cannot be inverted"):
        resolve_alphas((FILTER, anti), by_name={"anti": 1.0})


@pytest.mark.parametrize("request_kw, problem", [
    ({"by_name": {"nope": 1.0}}, "no delta named 'nope'"),
    ({"alphas": [1.0]}, "needs 2 numbers"),
    ({"alpha": 1.0, "by_name": {"json": 1.0}}, "both"),
    ({"by_name": {"json": float("nan")}}, "finite"),
    ({"by_name": {"json": 1e6}}, "finite number in"),
])
def test_malformed_requests_are_input_errors(request_kw, problem):
    with pytest.raises(InputError, match=problem):
        resolve_alphas(BOTH, **request_kw)


def test_a_negative_enforced_alpha_keeps_its_sign():
    p = DeltaPolicy("anti", alpha=-1.0, mode="enforced")
    assert p.check(-2.0) == -2.0
    with pytest.raises(PolicyError, match="invert"):
        p.check(1.0)


@pytest.mark.parametrize("kw, problem", [
    ({"alpha": 0.0, "mode": "enforced"}, "alpha is 0"),
    ({"alpha": 1.0, "mode": "enforced", "min_alpha": 2.0}, "floor"),
    ({"alpha": 1.0, "mode": "optional", "min_alpha": 0.5}, "no alpha floor"),
    ({"alpha": 1.0, "mode": "sometimes"}, "'enforced' or 'optional'"),
])
def test_bad_policies(kw, problem):
    with pytest.raises(InputError, match=problem):
        DeltaPolicy("d", **kw)


def test_unlearning_bundles_are_enforced_by_default_and_the_operator_decides():
    deltas = [SimpleNamespace(name="filter", alpha=1.0, objective="unlearn-idk"),
              SimpleNamespace(name="json", alpha=1.0, objective="sft"),
              SimpleNamespace(name="old", alpha=1.0, objective=None)]
    assert [p.mode for p in build_policies(deltas)] == ["enforced", "optional", "optional"]
    pol = build_policies(deltas, enforce=["json=0.5"], optional=["filter"])
    assert [(p.mode, p.min_alpha) for p in pol] == [("optional", None), ("enforced", 0.5), ("optional", None)]
    with pytest.raises(InputError, match="no loaded delta is named 'nope'"):
        build_policies(deltas, enforce=["nope"])
    with pytest.raises(InputError, match="both"):
        build_policies(deltas, enforce=["json"], optional=["json"])
    with pytest.raises(InputError, match="not a number"):
        build_policies(deltas, enforce=["json=lots"])


def test_models_listing_shows_no_paths():
    assert FILTER.describe() == {"name": "filter", "alpha": 1.5, "policy": "enforced", "min_alpha": 1.0}
    assert JSON.describe() == {"name": "json", "alpha": 1.0, "policy": "optional"}
