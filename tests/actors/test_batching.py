"""The driver's bounds on a stream's calls: an equal share of the run's slots when they are scarce."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from actors.batching import fair_share, send_now


def test_a_fair_share_caps_each_stream_when_the_run_bound_is_scarce():
    assert fair_share(16, 32, 8) == 4  # 8 paced streams: 4 slots each, not 16 for the first two
    assert fair_share(4, 32, 2) == 4  # plenty: the per-stream bound decides
    assert fair_share(4, 32, 64) == 1  # more streams than slots: one each, never zero
    assert fair_share(4, 32, 0) == 4


@given(per_stream=st.integers(1, 64), total=st.integers(1, 256), asking=st.integers(1, 300))
def test_the_shares_never_starve_a_stream_and_fill_the_run_when_they_can(per_stream, total, asking):
    share = fair_share(per_stream, total, asking)
    assert 1 <= share <= per_stream
    if asking * per_stream >= total:  # the streams could fill the run: their shares do
        assert asking * share >= total or share == per_stream


def test_send_now_sends_a_full_batch_or_feeds_an_idle_model():
    assert send_now(8, 16, 8) and send_now(1, 0, 8)
    assert not send_now(3, 8, 8) and not send_now(0, 0, 8)
