"""The collapse guard on synthetic metric streams, and on a run made to collapse."""

import pytest

from prefcli.errors import PrefcliError
from prefcli.guard import CollapseGuard, RunCollapsed, Thresholds, distinct_2


def feed(guard, key, values):
    for v in values:
        guard.observe({key: v})


def test_distinct_2_by_hand():
    assert distinct_2([1, 2, 3, 4]) == 1.0
    assert distinct_2([5, 5, 5, 5, 5]) == pytest.approx(1 / 4)  # bigrams (5,5) x4, one distinct
    assert distinct_2([1, 2, 1, 2, 1]) == pytest.approx(2 / 4)
    assert distinct_2([7]) == 1.0


def test_falling_chosen_logprob_stops_the_run_with_the_fix():
    guard = CollapseGuard("stop", "preference", "--rpo-alpha 1 or a lower --lr")
    # start: mean -20 over 5 values; then a slide to -49 (the collapse)
    with pytest.raises(RunCollapsed) as e:
        feed(guard, "logps/chosen", [-20] * 5 + [-20 - 3 * i for i in range(1, 11)])
    msg = str(e.value)
    assert "chosen log-prob fell" in msg and "--rpo-alpha 1 or a lower --lr" in msg
    assert e.value.exit_code == 1 and isinstance(e.value, PrefcliError)


def test_threshold_is_max_of_nats_and_share_of_start():
    # start -20: threshold max(10, 0.5 * 20) = 10 nats. A steady -29 (9 below) passes; -31 fires.
    ok = CollapseGuard("stop", "preference")
    feed(ok, "logps/chosen", [-20] * 5 + [-29] * 30)
    bad = CollapseGuard("stop", "preference")
    with pytest.raises(RunCollapsed, match=r"fell 11 nats below its start \(-20.0 -> -31.0\)"):
        feed(bad, "logps/chosen", [-20] * 5 + [-31] * 10)
    # start -60: threshold 30 nats; a fall of 20 is fine
    long_replies = CollapseGuard("stop", "preference")
    feed(long_replies, "logps/chosen", [-60] * 5 + [-80] * 30)


def test_one_noisy_batch_does_not_fire():
    guard = CollapseGuard("stop", "preference")
    feed(guard, "logps/chosen", [-20] * 5 + [-22, -21, -60, -20, -21, -22, -20, -21, -19, -20] * 3)
    assert guard.warning is None  # window mean -24.4: within 10 nats


def test_warn_mode_records_once_and_trains_on():
    guard = CollapseGuard("warn", "preference", "--rpo-alpha 1 or a lower --lr")
    feed(guard, "logps/chosen", [-20] * 5 + [-50] * 20)
    assert guard.warning.startswith("chosen log-prob fell 30 nats")
    assert guard.summary() == {"guard_warning": guard.warning}


def test_off_watches_nothing_and_bad_mode_is_refused():
    guard = CollapseGuard("off", "preference")
    feed(guard, "logps/chosen", [-20] * 5 + [-500] * 20)
    assert guard.summary() == {}
    fn = lambda m, b: (0, {})  # noqa: E731
    assert guard.watch(fn) is fn
    with pytest.raises(PrefcliError, match="--guard loud"):
        CollapseGuard("loud")


def test_rl_replies_shrinking_or_repeating():
    shrink = CollapseGuard("stop", "rl", "a higher --kl-coef or a lower --lr")
    with pytest.raises(RunCollapsed, match=r"replies shrank from 30.0 to 1.0 tokens: rerun with a higher --kl-coef"):
        feed(shrink, "reply_len", [30] * 5 + [1] * 10)
    concise = CollapseGuard("stop", "rl")  # 30 -> 12 tokens is learning concision, not collapse
    feed(concise, "reply_len", [30] * 5 + [12] * 30)
    repeat = CollapseGuard("stop", "rl")
    with pytest.raises(RunCollapsed, match=r"distinct-2 0.95 -> 0.25"):
        feed(repeat, "distinct2", [0.95] * 5 + [0.25] * 10)
    fine = CollapseGuard("stop", "rl")
    feed(fine, "distinct2", [0.95] * 5 + [0.85] * 30)


def test_watch_feeds_each_micro_batch():
    guard = CollapseGuard("stop", "preference", thresholds=Thresholds(warmup=1, window=1))
    values = iter([-20.0, -21.0, -45.0])
    fn = guard.watch(lambda model, batch: (0.0, {"logps/chosen": next(values)}))
    fn(None, None)
    fn(None, None)
    with pytest.raises(RunCollapsed):
        fn(None, None)
