"""Device helpers: the seeded random input that counting and timing run on."""

import torch

from auglocal_fx._device import random_input


def test_random_input_is_seeded_and_continues_a_given_generator():
    reference = torch.Generator().manual_seed(0)
    expected = torch.randn(2, 3, 4, 4, generator=reference)
    assert torch.equal(random_input((3, 4, 4), 2), expected)  # a fresh seed-0 generator by default
    labels = torch.randint(0, 5, (2,), generator=reference)
    given = torch.Generator().manual_seed(0)
    assert torch.equal(random_input([3, 4, 4], 2, generator=given), expected)
    assert torch.equal(torch.randint(0, 5, (2,), generator=given), labels)  # the labels drawn after it
    assert random_input((3,), dtype=torch.float64).dtype == torch.float64
