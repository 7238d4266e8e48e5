"""Verdicts and goals, in one form for every program that measures: a check is a dict
``{check, value, goal, passed, kind}`` (kind "correctness" or "timing"); a timing check also
carries ``ok`` (the goal as a predicate) and ``remeasure`` (times both sides again,
interleaved), so that a miss on a noisy machine is timed again before it counts."""
from __future__ import annotations

__all__ = ["check", "timing_check", "plain_checks", "settle_timing", "verdicts"]


def check(name, value, goal, passed, kind="correctness"):
    """A verdict that is decided once (a correctness check, or a goal measured on a GPU)."""
    return {"check": name, "value": value, "goal": goal, "passed": bool(passed), "kind": kind}


def timing_check(name, value, goal, ok, remeasure):
    """A timing verdict: ``ok(value)`` decides it, ``remeasure()`` times it again (interleaved)
    and returns the new value."""
    return {**check(name, value, goal, ok(value), kind="timing"), "ok": ok, "remeasure": remeasure}


def plain_checks(checks):
    """The checks as JSON can hold them (without the ``ok`` and ``remeasure`` callables)."""
    return [{k: v for k, v in c.items() if k not in ("remeasure", "ok")} for c in checks]


def settle_timing(checks):
    """A timing verdict that missed is timed again (interleaved) before it counts as missed."""
    for c in checks:
        if c.get("kind") == "timing" and not c["passed"] and c.get("remeasure") is not None:
            c["first_value"] = c["value"]
            c["value"] = c["remeasure"]()
            c["passed"] = bool(c["ok"](c["value"]))
            c["remeasured"] = True
    return checks


def verdicts(results):
    """[(passed, kind, line)] for a results dict: one per kernel row (correctness: within the
    tolerance) and one per performance check."""
    lines = []
    for row in results.get("kernels", []):
        if "within_tolerance" not in row:
            continue
        lines.append((row["within_tolerance"], "correctness",
                      f"{row['backend']} {row['alignment']} keep {row['keep_ratio']}: max relative deviation "
                      f"{row['max_rel_dev']:.1e} from the {row['judged_against']}"))
    for c in results.get("performance_checks", []):
        again = f" (first measured {c['first_value']:.2f}, timed again)" if c.get("remeasured") else ""
        lines.append((c["passed"], c.get("kind", "correctness"), f"{c['check']} = {c['value']:.2f} (goal {c['goal']})"
                      f"{again}"))
    return [(ok, kind, f"[{'PASS' if ok else 'FAIL'}] {'(timing) ' if kind == 'timing' else ''}{text}")
            for ok, kind, text in lines]
