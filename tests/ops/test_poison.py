"""The poisoning fixture itself: a kernel that leaves an output unwritten must be caught."""

import torch


def test_empty_is_nan_poisoned():
    assert torch.empty(3, 4).isnan().all()
    assert torch.empty_like(torch.zeros(2, dtype=torch.bfloat16)).isnan().all()
    assert torch.zeros(2).new_empty((5,)).isnan().all()
    assert torch.empty((2, 3), dtype=torch.float16).isnan().all()


def test_empty_uint8_is_0xa5():
    assert (torch.empty(7, dtype=torch.uint8) == 0xA5).all()


def test_other_dtypes_untouched():
    t = torch.empty(3, dtype=torch.int64)
    assert t.dtype == torch.int64 and t.shape == (3,)
