"""The per-stream record of a run: its counts, its state machine and where its state chain starts."""

from __future__ import annotations

import pytest

from actors.streams import IllegalTransition, RunningPipeline, RunSummary, StreamState, StreamStatus


def test_a_stream_that_ends_is_done_once_its_last_window_is_taken_by_the_sink():
    st = StreamStatus("a")
    assert (st.state, st.asks_source, st.takes_windows, st.open) == (StreamState.RUNNING, True, True, True)
    first, second, end = st.requested(), st.requested(), st.requested()
    assert (first, second, end, st.in_flight) == (0, 1, 2, 3)
    st.released(end)  # the source's end of stream
    st.source_ended()
    assert st.state is StreamState.ENDING and not st.asks_source and st.takes_windows and st.open
    st.to_sink(first)
    st.to_sink(second)
    assert (st.in_flight, st.at_sink, st.open, st.state) == (0, 2, False, StreamState.ENDING)
    st.written()
    assert st.state is StreamState.ENDING
    st.written()
    assert (st.state, st.windows, st.at_sink, st.finished, st.error) == (StreamState.DONE, 2, 0, True, None)
    assert str(st.state) == "done"  # what the display and the summary print


def test_a_source_failure_keeps_the_windows_before_it_then_fails_the_stream():
    st = StreamStatus("a")
    window, end = st.requested(), st.requested()
    st.released(end)
    st.source_ended("DecodeError: truncated packet")
    assert st.state is StreamState.ENDING and st.takes_windows  # window 0 still goes to the model
    st.to_sink(window)
    st.written()
    assert (st.state, st.error, st.windows) == (StreamState.FAILED, "DecodeError: truncated packet", 1)


def test_a_model_failure_fails_the_stream_at_once_and_keeps_the_first_error():
    st = StreamStatus("a")
    seq = st.requested()
    st.fail("RuntimeError: boom")
    assert (st.state, st.takes_windows, st.asks_source, st.open) == (StreamState.FAILED, False, False, False)
    st.released(seq)
    assert st.state is StreamState.FAILED and st.error == "RuntimeError: boom"
    unopened = StreamStatus("b")
    unopened.source_ended("SourceOpenError: gone")
    assert unopened.state is StreamState.FAILED  # nothing was in flight: it settles at once


def test_finish_stops_a_running_stream_and_fails_an_ending_one_with_an_error():
    running = StreamStatus("a")
    running.requested()
    running.finish()
    assert running.state is StreamState.STOPPED
    ending = StreamStatus("b")
    ending.requested()
    ending.source_ended()
    ending.finish()
    assert ending.state is StreamState.STOPPED  # its window never reached the sink
    broken = StreamStatus("c")
    broken.requested()
    broken.source_ended("DecodeError: x")
    broken.finish()
    assert broken.state is StreamState.FAILED
    done = StreamStatus("d")
    done.source_ended()
    done.finish()
    assert done.state is StreamState.DONE


@pytest.mark.parametrize("final", [StreamState.DONE, StreamState.FAILED, StreamState.STOPPED])
def test_a_final_state_refuses_every_change(final):
    st = StreamStatus("a")
    st.state = final
    with pytest.raises(IllegalTransition, match=f"stream 'a': {final.value} -> ending"):
        st.source_ended()
    with pytest.raises(IllegalTransition, match=f"{final.value} -> failed"):
        st.fail("RuntimeError: late")
    st.finish()  # a no-op on a final state
    assert st.state is final


def test_a_stream_ends_once_and_an_ended_stream_cannot_run_again():
    st = StreamStatus("a")
    st.requested()
    st.source_ended()
    with pytest.raises(IllegalTransition, match="ending -> ending"):
        st.source_ended()
    st.fail("RuntimeError: boom")
    with pytest.raises(IllegalTransition, match="failed -> failed"):
        st.fail("RuntimeError: again")


def test_counts_refuse_a_window_that_is_not_in_flight():
    st = StreamStatus("a")
    seq = st.requested()
    st.to_sink(seq)
    with pytest.raises(KeyError):
        st.released(seq)


def test_the_chain_restarts_at_the_lowest_window_without_a_result():
    st = StreamStatus("a")
    seqs = [st.requested() for _ in range(5)]
    assert st.starts_chain(0) and not st.starts_chain(1)
    st.to_sink(seqs[0])
    st.to_sink(seqs[1])
    st.restart_chain()  # windows 2, 3 and 4 have no result: 2 starts the new chain
    assert st.chain_from == 2 and st.starts_chain(2) and not st.starts_chain(3)
    for seq in seqs[2:]:
        st.to_sink(seq)
    st.restart_chain()  # nothing in flight: the next window asked for starts it
    assert st.chain_from == st.next_seq == 5


def test_a_source_that_lost_a_call_resumes_at_its_lowest_window_not_delivered():
    # Calls 0..5 ask for windows 10, 11, 13 (12 was empty), 14, ...; the pool died after answering
    # call 3 but before answering call 2, and call 5 had not come back.
    st = StreamStatus("a", start_window=10)
    seqs = [st.requested() for _ in range(6)]
    st.decoded(1, 11)  # replies overtake each other
    st.decoded(0, 10)
    assert st.next_window == 12
    st.to_sink(seqs[0])
    st.decoded(3, 14)
    assert (st.next_window, st.delivered) == (12, 3)  # call 2 has not answered
    st.lost(2)
    assert st.after_loss(3) and st.after_loss(5) and not st.after_loss(1)
    st.restart_chain()  # a model restart now: window 14 (seq 3) will be given up, so 1 starts the chain
    assert st.chain_from == 1
    st.lost(seqs[5])  # a call the pool had not answered
    assert st.give_up() == [3]  # window 14 leaves the run: decoded again after window 11
    assert (st.in_flight, st.delivered, st.next_window) == (2, 2, 12)  # seqs 1 and 4 (4: an answer to come)
    st.released(seqs[4])  # its answer, after the lost call, is dropped by the runner
    st.source_restarted()
    assert (st.chain_from, st.next_seq, st.after_loss(7)) == (6, 6, False)
    assert st.requested() == 6
    st.decoded(6, 12)
    assert st.next_window == 13


def test_the_run_totals_are_sums_of_the_stream_records():
    streams = {sid: StreamStatus(sid) for sid in ("a", "b")}
    p = RunningPipeline(None, None, {}, streams)
    for _ in range(3):
        streams["a"].requested()
    streams["b"].to_sink(streams["b"].requested())
    assert (p.in_flight, p.at_sink, p.windows) == (3, 1, 0)
    streams["b"].written()
    assert (p.in_flight, p.at_sink, p.windows) == (3, 0, 1)


def test_summary_exit_codes_follow_the_stream_states():
    def summary(*states: StreamState) -> RunSummary:
        streams = {}
        for i, state in enumerate(states):
            streams[f"s{i}"] = StreamStatus(f"s{i}", state=state)
        return RunSummary(streams, wall_s=1.0)

    assert summary(StreamState.DONE, StreamState.STOPPED).exit_code == 0
    assert summary(StreamState.DONE, StreamState.FAILED).exit_code == 3
    assert summary(StreamState.DONE, StreamState.FAILED).failed == ["s1"]
    assert summary(StreamState.FAILED, StreamState.FAILED).exit_code == 1


def test_a_window_lost_after_delivery_sends_the_stream_back_to_it():
    # Windows 10..14 were delivered (calls 0..4), 10 is written; 11 and 12 are at the model when the
    # node holding window 11's data leaves; call 5 has not answered.
    st = StreamStatus("a", start_window=10)
    seqs = [st.requested() for _ in range(6)]
    for seq in seqs[:5]:
        st.decoded(seq, 10 + seq)
    st.to_sink(seqs[0])
    st.rewind(1, 11, given_up=4)  # windows 11..14 leave the run
    assert (st.next_window, st.delivered, st.in_flight, st.at_sink) == (11, 1, 0, 1)
    assert st.chain_from == st.next_seq == 6 and st.starts_chain(st.requested())
    st.decoded(6, 11)
    assert st.next_window == 12


def test_a_stream_whose_source_ended_runs_again_when_its_last_windows_are_lost():
    st = StreamStatus("a")
    a, b, end = st.requested(), st.requested(), st.requested()
    st.decoded(a, 0)
    st.decoded(b, 1)
    st.decoded(end, None)
    st.released(end)
    st.source_ended()
    st.rewind(b, 1, given_up=1)
    assert st.state is StreamState.RUNNING and st.asks_source and st.next_window == 1
    st.to_sink(a)
    st.written()
    assert st.state is StreamState.RUNNING  # not done: window 1 is decoded again


def test_a_result_lost_before_the_sink_took_it_sends_an_ended_stream_back_to_its_window():
    # Windows 10 and 11 went to the sink after the source ended; 10 is taken, 11's result is lost
    # with its replica's node: the stream does not end but decodes 11 again in a new chain.
    st = StreamStatus("a", start_window=10)
    first, second, end = st.requested(), st.requested(), st.requested()
    st.decoded(first, 10)
    st.decoded(second, 11)
    st.decoded(end, None)
    st.released(end)
    st.source_ended()
    st.to_sink(first)
    st.to_sink(second)
    st.written()
    st.result_lost()
    assert st.state is StreamState.ENDING and st.at_sink == 0 and st.windows == 1
    st.rewind(second, 11, given_up=1)
    assert st.state is StreamState.RUNNING and (st.next_window, st.delivered) == (11, 1)
    assert st.starts_chain(st.requested())
