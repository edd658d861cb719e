"""The run's typed state: what a checkpoint stores, read back the same, and read from checkpoints written
before the stream had a state_dict."""

from llmray.train.state import TrainState


def test_train_state_round_trips_through_json():
    state = TrainState(step=6, tokens=6144, history=[{"step": 6, "loss": 5.1}], stream={"epoch": 1, "position": 2,
                       "offset": 40}, resumes=[{"step": 3}], world_size=2, n_params=10, vocab_size=1000,
                       recipe={"run": {"seed": 1}})
    assert TrainState.from_json(state.to_json()) == state


def test_a_checkpoint_from_before_the_stateful_stream_reads_its_cursor_as_the_stream_position():
    old = {"step": 6, "tokens": 10, "history": [], "cursor": {"epoch": 0, "position": 1, "offset": 3},
           "world_size": 2, "recipe": {}}
    state = TrainState.from_json(old)
    assert state.stream == {"epoch": 0, "position": 1, "offset": 3} and state.step == 6 and state.world_size == 2
    assert TrainState.from_json({**old, "cursor": None}).stream == {}  # saved before its first step
