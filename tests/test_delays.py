import numpy as np
import pytest
from hypothesis import given, strategies as st

from slm.errors import SlmError
from slm.strategies.delays import delay, undelay, valid_mask


def test_delay_shifts_each_stream_and_pads():
    grid = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    out = delay(grid, [0, 1, 2], fill=-1)
    np.testing.assert_array_equal(out, [[1, 2, 3, -1, -1], [-1, 4, 5, 6, -1], [-1, -1, 7, 8, 9]])
    np.testing.assert_array_equal(valid_mask(3, [0, 1, 2]), out != -1)


@given(
    delays=st.lists(st.integers(0, 4), min_size=1, max_size=5),
    steps=st.integers(0, 7),
    batch=st.integers(1, 3),
)
def test_undelay_inverts_delay(delays, steps, batch):
    rng = np.random.default_rng(len(delays) * 100 + steps)
    grid = rng.integers(0, 50, size=(batch, len(delays), steps))
    out = delay(grid, delays, fill=-7)
    assert out.shape == (batch, len(delays), steps + max(delays))
    np.testing.assert_array_equal(undelay(out, delays), grid)
    np.testing.assert_array_equal(valid_mask(steps, delays), (out[0] != -7))


def test_bad_delays_are_refused():
    with pytest.raises(SlmError, match="K=2"):
        delay(np.zeros((3, 4), int), [0, 1], fill=0)
    with pytest.raises(SlmError, match=">= 0"):
        delay(np.zeros((2, 4), int), [0, -1], fill=0)
    with pytest.raises(SlmError, match="shorter"):
        undelay(np.zeros((2, 1), int), [0, 3])
