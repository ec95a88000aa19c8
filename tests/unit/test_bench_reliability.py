"""``kvtier bench reliability`` at test size, asserting its goals (real server processes).

Every attack refused (and the owner still served), fuzzing without unclear
answers or crashes, a load of mixed ops that fills and churns the store with
0 errors and the server's RSS within capacity + 5 % of its idle size, and a
warm restart under readers with no wrong bytes and every entry back.
"""

from __future__ import annotations

from kvtier.benches.reliability import run_reliability_bench


def test_reliability_goals_hold_at_test_size() -> None:
    r = run_reliability_bench(clients=4, ops=1500, min_size="256KiB", max_size="1MiB",
                              capacity="512MiB", fuzz_cases=100, attempts=3)
    attacks = r["attacks"]
    owner = attacks.pop("owner still served")
    assert owner["served"] == 1, owner
    assert all(a["served"] == 0 for a in attacks.values()), attacks
    f = r["fuzz"]
    assert f["cases"] >= 100 and f["unclear_answers"] == 0 and f["server_crashes"] == 0, f
    assert f["data_kept"], f
    load = r["load"]
    assert load["errors"] == 0, load["error_examples"]
    assert load["evictions"] > 0, load  # the store was full and churned
    assert load["store_bytes"] <= load["capacity_bytes"], load
    assert load["rss_growth_vs_capacity"] <= 1.05, load
    restart = r["restart"]
    assert restart["wrong_bytes"] == 0 and restart["seconds_to_recover"] is not None, restart
    assert restart["entries_after"] == restart["entries_before"], restart
