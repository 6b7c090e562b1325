import pytest

from nsa_parallel import NSAConfig


def test_defaults_are_the_papers():
    c = NSAConfig()
    assert (c.compress_block_size, c.compress_stride, c.select_block_size, c.num_selected_blocks, c.window_size) == (
        32, 16, 64, 16, 512)


@pytest.mark.parametrize("kwargs, message", [
    ({"select_block_size": 40}, "select_block_size (40) must be a multiple of compress_stride (16)"),
    ({"compress_block_size": 40}, "compress_block_size (40) must be a multiple of compress_stride (16)"),
    ({"compress_stride": 64}, "compress_block_size (32) must be a multiple of compress_stride (64)"),
    ({"num_selected_blocks": 2}, "num_selected_blocks (2) must be at least 3"),
    ({"window_size": 0}, "window_size (0) must be positive"),
    ({"compress_stride": -16}, "compress_stride (-16) must be positive"),
    ({"select_block_size": 64.0}, "select_block_size (64.0) must be an integer"),
    ({"num_selected_blocks": True}, "num_selected_blocks (True) must be an integer"),
])
def test_invalid_config_names_field_and_rule(kwargs, message):
    with pytest.raises(ValueError) as err:
        NSAConfig(**kwargs)
    assert message in str(err.value)


def test_block_counts():
    c = NSAConfig()
    assert c.num_compressed(31) == 0
    assert c.num_compressed(32) == 1
    assert c.num_compressed(65536) == (65536 - 32) // 16 + 1
    assert c.num_select_blocks(1) == 1
    assert c.num_select_blocks(64) == 1
    assert c.num_select_blocks(65) == 2
